"""How a decoder layer's Linears are grouped: what discovery (llmq/calib/discover.py) finds, per layer.

Groups are listed in execution order inside a layer; the Linears of one group read the same input tensor, so
they share calibration statistics. For activation-aware scaling (AWQ) each group also names the sub-block
whose output the scales must preserve, and the operation that produces the group's input, into which the
scales can be folded exactly (checked numerically when the layer was discovered).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    linears: tuple[str, ...]  # Linears (relative to a decoder layer) reading the same input, in call order
    block: str | None  # a sub-block whose input is the group's input (attention, MLP, the Linear); None: the Linears
    prev: str | None  # the norm or Linear whose output, scaled, scales the group's input exactly; None: no fold
    prev_rows: str = "all"  # which of prev's output rows feed the group: "all", "first_half", "second_half"
    norm_offset: float = 0.0  # prev is a norm computing x * (offset + weight): 1.0 for Gemma's
    expert: bool = False  # the Linears of one routed expert (they may see few calibration tokens)


@dataclass(frozen=True)
class LayerMap:
    """One decoder layer's groups."""

    groups: tuple[LinearGroup, ...]  # in execution order

    @property
    def linears(self) -> list[str]:
        return [name for group in self.groups for name in group.linears]


@dataclass
class DecoderLayout:
    """Where the decoder layers are and each layer's groups (layers differ: dense then MoE, interleaved)."""

    layers: str  # dotted path from the loaded model to the ModuleList of decoder layers
    maps: list[LayerMap]  # one per layer
    notes: list[str] = field(default_factory=list)  # one line each, for the log (folds refused, Linears left)

    def only(self, names) -> DecoderLayout:
        """The layout restricted to some Linears (full names); groups left empty are dropped."""
        maps = []
        for index, layer_map in enumerate(self.maps):
            prefix = f"{self.layers}.{index}."
            groups = []
            for group in layer_map.groups:
                kept = tuple(name for name in group.linears if prefix + name in names)
                if kept:
                    groups.append(dataclasses.replace(group, linears=kept) if kept != group.linears else group)
            maps.append(LayerMap(tuple(groups)))
        return DecoderLayout(self.layers, maps, self.notes)


def linear_at(model: nn.Module, name: str) -> nn.Linear | None:
    """The Linear at dotted `name`, or None where the model has no module there or it is not a Linear (a
    checkpoint naming it does not belong to this config)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None
