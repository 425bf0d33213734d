"""Quantization methods, by name: one registry. A new method is one module plus one line in METHODS.

A name may chain registry entries with `+`: layer transforms first, a rounding last (`awq+gptq` is AWQ's
scaling, then GPTQ's rounding). A transform named alone is followed by round-to-nearest (`awq`).
"""

from __future__ import annotations

from llmq.core.config import MethodOptions
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Method
from llmq.methods.awq import AWQ
from llmq.methods.bitnet import BitNet
from llmq.methods.compose import Composed
from llmq.methods.gptq import GPTQ
from llmq.methods.rotate import Rotate
from llmq.methods.rtn import RTN
from llmq.methods.smoothquant import SmoothQuant

METHODS: dict[str, type[Method]] = {
    RTN.name: RTN,
    GPTQ.name: GPTQ,
    AWQ.name: AWQ,
    BitNet.name: BitNet,
    SmoothQuant.name: SmoothQuant,
    Rotate.name: Rotate,
}


def method_names() -> list[str]:
    """Every registry name, and each transform composed with each rounding (for help texts and errors)."""
    roundings = [name for name, cls in METHODS.items() if cls.rounds]
    transforms = [name for name, cls in METHODS.items() if not cls.rounds]
    combined = [f"{t}+{r}" for t in transforms for r in roundings if r != RTN.name and not METHODS[r].ternary]
    return [*METHODS, *combined]


def build_method(name: str, options: MethodOptions | None = None) -> Method:
    """The method a name stands for (see the module docstring); one-line error for names it does not know."""
    options = options or MethodOptions()
    steps = []
    for part in name.split("+"):
        if part not in METHODS:
            raise LlmqError(f"unknown --method {name!r}; choose one of: {', '.join(method_names())}")
        steps.append(METHODS[part](options))
    if any(step.rounds for step in steps[:-1]):
        raise LlmqError(f"--method {name}: only the last of the +-joined methods may round; put transforms "
                        "(such as awq) first, e.g. awq+gptq")
    if not steps[-1].rounds:
        steps.append(RTN(options))
    return steps[0] if len(steps) == 1 else Composed(name, steps)


__all__ = ["METHODS", "Method", "MethodOptions", "build_method", "method_names"]
