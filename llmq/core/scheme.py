"""The integer group grid of compressed-tensors: its scheme, its formulas and the tensor it produces.

A weight row is split into groups of `group_size` input columns (per-channel: one group per row). Each group
has a scale s and, when asymmetric, an integer zero point z; integers are signed:

    q = clamp(round(w / s) + z, qmin, qmax)        qmin = -2**(bits-1), qmax = 2**(bits-1) - 1
    w_hat = (q - z) * s                           (exact in float32; cast to the compute dtype at use)

These are shared by the methods that choose q, s and z (llmq/methods/grids/integer.py), the target that
writes them and the runtime that reads them back, so they live here, below all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.core.errors import LlmqError
from llmq.core.records import record

SUPPORTED_BITS = (2, 3, 4, 8)


WEIGHT_TYPES = ("int", "float")
FP8_MAX = 448.0  # the largest E4M3 value (torch.float8_e4m3fn)


@record
@dataclass(frozen=True)
class QuantScheme:
    """What grid a weight is rounded to. group_size=-1 means one group per output row (per-channel).

    weight_type "float" is FP8 E4M3 (8 bits, one scale per row: w_hat = e4m3(w / s) * s). act_bits 8 quantizes
    each Linear's input too, per token at run time (W8A8, in the weights' type): what serving engines run on
    int8 / FP8 tensor cores."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False  # asymmetric (zero points) by default: 0.7% larger, and clearly better
    weight_type: str = "int"
    act_bits: int | None = None

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise LlmqError(f"--bits {self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and (self.group_size < 1 or self.group_size % 8):
            raise LlmqError(f"--group-size {self.group_size} is not supported; use a multiple of 8 (32, 64, 128) or -1")
        if self.weight_type not in WEIGHT_TYPES:
            raise LlmqError(f"weight type {self.weight_type!r} is not supported; use int or float (FP8)")
        per_channel_8bit = self.bits == 8 and self.group_size == -1 and self.symmetric
        if self.weight_type == "float" and not per_channel_8bit:
            raise LlmqError("FP8 weights are 8 bits, symmetric, one scale per channel: use --scheme fp8 alone, "
                            "without --bits, --group-size or --asym")
        if self.act_bits is not None and (self.act_bits != 8 or not per_channel_8bit):
            raise LlmqError("quantized activations need 8-bit symmetric per-channel weights (W8A8): use --scheme "
                            "w8a8 or fp8 alone, or --bits 8 --group-size -1 --sym --act-bits 8")

    @property
    def name(self) -> str:
        """W4A16 g128 asym, W8A8 int8, W8A8 FP8: what the summary, the card and the output's name say."""
        if self.act_bits is not None:
            return f"W8A8 {'FP8' if self.weight_type == 'float' else 'int8'}"
        if self.weight_type == "float":
            return "W8A16 FP8"
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits}A16 {group} {'sym' if self.symmetric else 'asym'}"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


# Named schemes (`--scheme NAME`): what serving engines run on int8 / FP8 tensor cores, the fields each one fixes.
PRESETS = {
    "w8a8": {"bits": 8, "group_size": -1, "symmetric": True, "weight_type": "int", "act_bits": 8},
    "fp8": {"bits": 8, "group_size": -1, "symmetric": True, "weight_type": "float", "act_bits": 8},
}
_FLAG_OF = {"bits": "--bits", "group_size": "--group-size", "symmetric": "--sym/--asym", "act_bits": "--act-bits"}


def scheme_with_preset(name: str | None, fields: dict) -> QuantScheme:
    """The scheme of these fields, or of the named preset; a field set away from its default that the preset
    sets otherwise is refused (`--scheme fp8 --bits 4` means nothing)."""
    if name is None:
        return QuantScheme(**fields)
    if name not in PRESETS:
        raise LlmqError(f"--scheme {name} is unknown; use one of {', '.join(PRESETS)}")
    defaults = QuantScheme()
    clash = [_FLAG_OF.get(key, key) for key, value in fields.items()
             if value != getattr(defaults, key) and value != PRESETS[name].get(key, value)]
    if clash:
        raise LlmqError(f"--scheme {name} fixes {', '.join(clash)}; drop them")
    return QuantScheme(**{**fields, **PRESETS[name]})


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """Integers (as float) for w under broadcastable scale/zero."""
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(scheme.qmin, scheme.qmax)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(q - z) * s in float32: exact, since s holds a storage-dtype value and q - z is a small integer."""
    if zero is not None:
        q = q - zero
    return q * scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Full [out, in] float32 weight from integers and per-group parameters."""
    rows, cols = qweight.shape
    g = qweight.float().reshape(rows, cols // group_size, group_size)
    z = None if zero_point is None else zero_point.float().unsqueeze(-1)
    return dequantize_values(g, scale.float().unsqueeze(-1), z).reshape(rows, cols)


@record
@dataclass
class QuantizedTensor:
    """A weight on the integer grid: signed integers, one scale (and zero point) per (row, group)."""

    qweight: torch.Tensor  # int8 [out, in]; float8_e4m3fn for FP8 weights (the E4M3 values themselves)
    scale: torch.Tensor  # [out, n_groups], storage dtype
    zero_point: torch.Tensor | None  # int8 [out, n_groups]; None when symmetric
    scheme: QuantScheme

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero_point, self.scheme.group_size_for(self.qweight.shape[1]))

    def rows(self, rows: slice) -> QuantizedTensor:
        """Some rows as an independent QuantizedTensor on the CPU (no storage shared with the others)."""
        own = lambda t: None if t is None else t[rows].to("cpu", copy=True)
        return QuantizedTensor(own(self.qweight), own(self.scale), own(self.zero_point), self.scheme)
