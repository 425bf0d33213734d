"""FP8 E4M3 weights with one scale per output row: the weight half of vLLM's native FP8 scheme (Hopper and newer).

    s = max|w_row| / 448            rounded to its storage dtype first, so the codes are the best for the stored s
    q = e4m3(clamp(w / s, +-448))   round to nearest even on the E4M3 grid (torch's float8_e4m3fn cast)
    w_hat = q * s                   exact in float32 (a 4-bit significand times a storage-dtype scale)

The grid is not uniform, but a method needs nothing more than rounding and values, so GPTQ's error feedback
rounds onto it as onto an integer grid. "Integers" here are the E4M3 values themselves, held as float32.
"""

from __future__ import annotations

import torch

from llmq.core.interfaces import Grid, GridFit
from llmq.core.scheme import FP8_MAX, QuantizedTensor, QuantScheme
from llmq.methods.grids.inputs import StaticInputScale


def fp8_round(v: torch.Tensor) -> torch.Tensor:
    """The nearest E4M3 values of v (clamped to +-448 first: the cast does not saturate), as float32."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def fp8_row_scale(weight: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1] float32 holding storage-dtype values; an all-zero row gets 1 (any scale reconstructs it)."""
    scale = weight.abs().amax(dim=1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).float()


class Fp8Grid(StaticInputScale, Grid):
    """E4M3 codes, one scale per row stored in `scale_dtype` (the model's dtype)."""

    def __init__(self, scheme: QuantScheme, scale_dtype: torch.dtype):
        self.scheme, self.scale_dtype = scheme, scale_dtype

    def fit(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> Fp8Fit:
        return Fp8Fit(self, weight)


class Fp8Fit(GridFit):
    def __init__(self, grid: Fp8Grid, weight: torch.Tensor):
        self.grid, self.weight = grid, weight
        self.scale = fp8_row_scale(weight, grid.scale_dtype)

    def nearest(self) -> torch.Tensor:
        return fp8_round(self.weight / self.scale)

    def position(self, w, columns):
        return w / self.scale

    def round(self, w, columns):
        return fp8_round(w / self.scale)

    def clamp(self, q):
        return q.clamp(-FP8_MAX, FP8_MAX)

    def value(self, q, columns):
        return q * self.scale

    def result(self, integers: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(qweight=integers.to(torch.float8_e4m3fn), scale=self.scale.to(self.grid.scale_dtype),
                               zero_point=None, scheme=self.grid.scheme)
