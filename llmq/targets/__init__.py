"""Output formats, by name: one registry. A new format is one Target subclass plus one line in TARGETS."""

from __future__ import annotations

from llmq.core.config import QuantizeConfig
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Method
from llmq.targets.base import RunReport, Target
from llmq.targets.bitnet import BitNetTarget
from llmq.targets.bnb import BitsAndBytesTarget
from llmq.targets.compressed_tensors import CompressedTensorsTarget
from llmq.targets.gguf.target import GGUFTarget

TARGETS: dict[str, type[Target]] = {
    CompressedTensorsTarget.name: CompressedTensorsTarget,
    GGUFTarget.name: GGUFTarget,
    BitNetTarget.name: BitNetTarget,
    BitsAndBytesTarget.name: BitsAndBytesTarget,
}


def _target_class(name: str) -> type[Target]:
    if name not in TARGETS:
        raise LlmqError(f"--format {name} is not supported; use one of {', '.join(TARGETS)}")
    return TARGETS[name]


def default_method(config: QuantizeConfig) -> str:
    """The method a run uses when none is named: the target's default (gptq; rtn for gguf, as llama-quantize; rtn
    for a 16-bit cast, which rounds nothing and needs no data)."""
    if config.scheme.is_cast:
        return "rtn"
    name = config.target.format
    return _target_class(CompressedTensorsTarget.name if name == "auto" else name).default_method


def build_target(config: QuantizeConfig, method: Method) -> Target:
    """The run's target, checked against its method and flags; `auto` is bitnet for ternary methods."""
    name = config.target.format
    if name == "auto":
        name = BitNetTarget.name if method.ternary else CompressedTensorsTarget.name
        if config.scheme.weight_type == "nf4":
            name = BitsAndBytesTarget.name
    target = _target_class(name)(config, method)
    target.check()
    return target


__all__ = ["TARGETS", "RunReport", "Target", "build_target", "default_method"]
