"""How much of a decoder a run stores quantized: the share of its matrix weights, and where the rest is and why.

A run summarises it (`92.3% of the decoder's matrix weights stored quantized`), and when more than
`UNQUANTIZED_NOTE` of them stay in the model's dtype it names them and the reason, so that no model comes out
mostly unquantized without a line saying so (a MoE whose experts are 3-D parameters discovery cannot see, or
whose fused layout the target cannot store).

Counted from shapes only (a lazy model's skeleton has them): every floating-point parameter of two or more
dimensions inside the decoder layers. Routers and other small matrices llmq leaves in the model's dtype count
as unquantized, which is what they are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from llmq.calib.harness import Plan
from llmq.core.layers import DecoderLayout

UNQUANTIZED_NOTE = 0.05  # more than this share left unquantized is named in the summary


@dataclass
class Coverage:
    total: int  # elements of the decoder's matrix weights
    quantized: int  # of them, stored quantized
    left: dict[str, int]  # reason -> elements left unquantized for it
    examples: dict[str, list[str]]  # reason -> a few kinds of tensor (layer index dropped)

    @property
    def fraction(self) -> float:
        return self.quantized / max(self.total, 1)

    def note(self) -> str | None:
        """One line naming what stays unquantized, when it is more than UNQUANTIZED_NOTE of the weights."""
        if 1 - self.fraction <= UNQUANTIZED_NOTE:
            return None
        parts = [f"{count / self.total:.1%} {reason} ({', '.join(self.examples[reason])})"
                 for reason, count in sorted(self.left.items(), key=lambda kv: -kv[1])]
        return f"llmq: {1 - self.fraction:.1%} of the decoder's matrix weights stay unquantized: " + "; ".join(parts)


def _kind(name: str, layers_path: str) -> str:
    """`model.layers.3.mlp.experts.gate_up_proj` -> `mlp.experts.gate_up_proj` (expert numbers dropped too)."""
    tail = name.removeprefix(layers_path + ".").split(".", 1)[-1]
    return ".".join("<e>" if part.isdigit() else part for part in tail.split("."))


def decoder_coverage(model: nn.Module, layout: DecoderLayout, discovered: set[str], quantizable: set[str],
                     plan: Plan) -> Coverage:
    """`discovered`: every Linear discovery found (full names); `quantizable`: those the target can hold quantized;
    `plan`: the target's plan, whose float parts (a GGUF mixture's F16 tensors) stay unquantized."""
    stored = set()
    for index, layer_map in enumerate(layout.maps):
        prefix = f"{layout.layers}.{index}"
        for group in layer_map.groups:
            for part in plan([f"{prefix}.{name}" for name in group.linears]):
                if part.grid.rounds:
                    stored.update(part.linears)
    total = quantized = 0
    left: Counter = Counter()
    examples: dict[str, list[str]] = {}
    layers = model.get_submodule(layout.layers)
    for name, parameter in layers.named_parameters(prefix=layout.layers):
        if parameter.dim() < 2 or not parameter.is_floating_point():
            continue
        count, module = parameter.numel(), name.rpartition(".")[0]
        total += count
        if name.endswith(".weight") and module in stored:
            quantized += count
            continue
        if module in quantizable:
            reason = "kept in float by the format's mixture"
        elif module in discovered:
            reason = "in a layout this format cannot store quantized"
        else:
            reason = "not Linears llmq discovers (routers, or weights of another kind)"
        left[reason] += count
        kinds = examples.setdefault(reason, [])
        if _kind(name, layout.layers) not in kinds and len(kinds) < 3:
            kinds.append(_kind(name, layout.layers))
    return Coverage(total, quantized, dict(left), examples)
