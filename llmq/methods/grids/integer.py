"""The integer grid every weight-only method rounds to, in compressed-tensors' convention.

A weight row is split into groups of `group_size` input columns (per-channel: one group per row). Each group
has a scale s and, when asymmetric, an integer zero point z; integers are signed:

    q = clamp(round(w / s) + z, qmin, qmax)        qmin = -2**(bits-1), qmax = 2**(bits-1) - 1
    w_hat = (q - z) * s                           (exact in float32; cast to the compute dtype at use)

Symmetric grids have z = 0 and s = max|w| / ((qmax - qmin) / 2), the GPTQ convention (the grid reaches
-max|w| exactly and stops one step short on the positive side). Asymmetric grids cover [min(w, 0), max(w, 0)].

Scales are rounded to their storage dtype (the model's dtype) *before* the integers are chosen, so the
integers are the best ones for the scale that will actually be stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.errors import LlmqError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantScheme:
    """What grid a weight is rounded to. group_size=-1 means one group per output row (per-channel)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise LlmqError(f"--bits {self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and (self.group_size < 1 or self.group_size % 8):
            raise LlmqError(f"--group-size {self.group_size} is not supported; use a multiple of 8 (32, 64, 128) or -1")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


@dataclass
class QuantizedTensor:
    """A quantized 2-D weight: signed integers, one scale (and zero point) per (row, group)."""

    qweight: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # [out, n_groups], storage dtype
    zero_point: torch.Tensor | None  # int8 [out, n_groups]; None when symmetric
    scheme: QuantScheme

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero_point, self.scheme.group_size_for(self.qweight.shape[1]))

    def rows(self, rows: slice) -> QuantizedTensor:
        """Some rows as an independent QuantizedTensor on the CPU (no storage shared with the others)."""
        own = lambda t: None if t is None else t[rows].to("cpu", copy=True)
        return QuantizedTensor(own(self.qweight), own(self.scale), own(self.zero_point), self.scheme)


def check_group_divides(name: str, in_features: int, scheme: QuantScheme) -> None:
    """Refuse up front a group size that no loader of the format can read (compressed-tensors needs equal groups)."""
    if scheme.group_size == -1 or in_features % scheme.group_size == 0:
        return
    fits = [g for g in (256, 192, 128, 96, 64, 32) if in_features % g == 0 and g < scheme.group_size]
    hint = f"--group-size {fits[0]}" if fits else "--group-size -1"
    raise LlmqError(
        f"--group-size {scheme.group_size} does not divide {name} (in_features {in_features}); use {hint} or -1"
    )


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size]."""
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size)


def qparams_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32 holding storage-dtype values) and zero point (float32 integers) for a range per group."""
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    span = scheme.qmax - scheme.qmin
    if scheme.symmetric:
        scale = torch.maximum(-wmin, wmax) / (span / 2)
    else:
        scale = (wmax - wmin) / span
    # An all-zero group: any positive scale reconstructs it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).float()
    if scheme.symmetric:
        return scale, None
    zero = (scheme.qmin - torch.round(wmin / scale)).clamp(scheme.qmin, scheme.qmax)
    return scale, zero


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
    g = _grouped(qweight.float(), group_size)
    z = None if zero_point is None else zero_point.float().unsqueeze(-1)
    w = dequantize_values(g, scale.float().unsqueeze(-1), z)
    return w.reshape(qweight.shape)


def group_qparams(
    w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-(row, group) scale and zero point of a float32 [out, in] weight; [out, n_groups] each.

    With mse=True, shrink each group's range towards zero (grid of 100 steps, down to 20% of it) and keep the
    range whose rounding error sum |w - w_hat|^2.4 is smallest: the clipping search of the GPTQ reference.
    """
    g = _grouped(w, scheme.group_size_for(w.shape[1]))
    wmin, wmax = g.amin(dim=-1), g.amax(dim=-1)
    scale, zero = qparams_from_range(wmin, wmax, scheme, scale_dtype)
    if not mse:
        return scale, zero
    best_err = torch.full_like(wmin, float("inf"))
    for step in range(80):
        shrink = 1 - step / 100
        s, z = qparams_from_range(wmin * shrink, wmax * shrink, scheme, scale_dtype)
        zq = None if z is None else z.unsqueeze(-1)
        q = quantize_values(g, s.unsqueeze(-1), zq, scheme)
        err = (dequantize_values(q, s.unsqueeze(-1), zq) - g).abs_().pow_(2.4).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        if zero is not None:
            zero = torch.where(better, z, zero)
    return scale, zero


def round_to_nearest(
    weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Plain rounding of a float32 [out, in] weight: integers (held as float), scale and zero point per group."""
    group_size = scheme.group_size_for(weight.shape[1])
    scale, zero = group_qparams(weight, scheme, scale_dtype, mse=mse)
    expand = lambda t: None if t is None else t.repeat_interleave(group_size, dim=1)
    return quantize_values(weight, expand(scale), expand(zero), scheme), scale, zero


def to_quantized_tensor(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme, scale_dtype: torch.dtype
) -> QuantizedTensor:
    """Pack the float-held integers and parameters into their storage dtypes."""
    return QuantizedTensor(
        qweight=q.to(torch.int8),
        scale=scale.to(scale_dtype),
        zero_point=None if zero is None else zero.to(torch.int8),
        scheme=scheme,
    )
