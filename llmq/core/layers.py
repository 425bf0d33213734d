"""How a decoder layer's Linears are grouped: the type the architecture maps (llmq/calib/arch.py) fill in.

Groups are listed in execution order inside a layer; the Linears of one group read the same input tensor, so
they share calibration statistics. For activation-aware scaling (AWQ) each group also names the sub-block
whose output the scales must preserve, and the operation that produces the group's input, into which the
scales are folded.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    linears: tuple[str, ...]  # Linears (relative to a decoder layer) reading the same input
    block: str  # the sub-block (attention, MLP, or the Linear itself) whose output AWQ compares
    prev: str | None  # the norm or Linear whose output is the group's input; None: nothing to fold into
    prev_rows: str = "all"  # "second_half": only the second half of a fused Linear's rows feed the group


@dataclass(frozen=True)
class LayerMap:
    layers: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    groups: tuple[LinearGroup, ...]  # in execution order
    norm_offset: float = 0.0  # 1.0 where RMSNorm multiplies by (1 + weight), as Gemma does


def linear_at(model: nn.Module, name: str) -> nn.Linear | None:
    """The Linear at dotted `name`, or None where the model has no module there or it is not a Linear (a
    checkpoint naming it does not belong to this config)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None
