"""FP8 E4M3 weights with one scale per output row: the weight half of vLLM's native FP8 scheme (Hopper and newer).

    s = max|w_row| / 448            rounded to its storage dtype first, so the codes are the best for the stored s
    q = e4m3(clamp(w / s, +-448))   round to nearest even on the E4M3 grid (torch's float8_e4m3fn cast)
    w_hat = q * s                   exact in float32 (a 4-bit significand times a storage-dtype scale)

The grid is not uniform, but a method needs nothing more than rounding and values, so GPTQ's error feedback
rounds onto it as onto an integer grid. "Integers" here are the E4M3 values themselves, held as float32.

FP8_BLOCK (DeepSeek-V3's layout) keeps one scale per 128 x 128 block instead (Fp8BlockGrid): each block's scale is
searched among a few steps below max|w| / 448, each rounded to its storage dtype first, for the least
importance-weighted squared error of the block (importance: the mean squared input of each column, when the run
calibrates; else plain squared error). Blocks at the bottom and right edges are partial.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmq.core.interfaces import Grid, GridFit
from llmq.core.scheme import FP8_BLOCK, FP8_MAX, BlockScaledTensor, QuantizedTensor, QuantScheme, expand_blocks
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


BLOCK_SCALE_STEPS = (1.0, 0.96875, 0.9375, 0.90625)  # multiples of max|w| / 448 each block's scale is chosen among


def _blocks(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> [ceil(rows / 128), 128, ceil(cols / 128), 128], the edges zero-padded: reduce over (1, 3)."""
    rows, cols = values.shape
    padded = F.pad(values, (0, -cols % FP8_BLOCK, 0, -rows % FP8_BLOCK))
    return padded.unflatten(0, (-1, FP8_BLOCK)).unflatten(2, (-1, FP8_BLOCK))


class Fp8BlockGrid(Grid):
    """FP8_BLOCK: E4M3 codes, one scale per 128 x 128 block stored in `scale_dtype` (the model's dtype)."""

    weighted = True

    def __init__(self, scheme: QuantScheme, scale_dtype: torch.dtype):
        self.scheme, self.scale_dtype = scheme, scale_dtype

    def fit(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> Fp8BlockFit:
        return Fp8BlockFit(self, weight, importance)

    def mismatch(self, quantized) -> str | None:
        if not isinstance(quantized, BlockScaledTensor) or quantized.scheme != self.scheme:
            return f"not {self.scheme.name}"
        return quantized.damage()


class Fp8BlockFit(GridFit):
    def __init__(self, grid: Fp8BlockGrid, weight: torch.Tensor, importance: torch.Tensor | None):
        self.grid, self.weight = grid, weight
        rows = weight.shape[0]
        peak = _blocks(weight.abs()).amax((1, 3)) / FP8_MAX
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))  # an all-zero block: any scale reconstructs it
        column_weight = None if importance is None else importance.to(weight.device, torch.float32)[None, :]
        best = None
        for step in BLOCK_SCALE_STEPS:
            scale = (peak * step).clamp(min=torch.finfo(grid.scale_dtype).tiny).to(grid.scale_dtype).float()
            full = expand_blocks(scale, rows, weight.shape[1])
            error = (fp8_round(weight / full) * full - weight).square_()
            error = _blocks(error if column_weight is None else error.mul_(column_weight)).sum((1, 3))
            if best is None:
                best, self.scale = error, scale
            else:
                better = error < best
                best, self.scale = torch.where(better, error, best), torch.where(better, scale, self.scale)
        self.row_scale = expand_blocks(self.scale, rows)  # [rows, column blocks]
        self._by_block = self.row_scale.T.contiguous()  # a block's scales contiguous, for round_column

    def _scales(self, columns):
        return self.row_scale[:, columns // FP8_BLOCK]

    def nearest(self) -> torch.Tensor:
        return self.round(self.weight, torch.arange(self.weight.shape[1], device=self.weight.device))

    def position(self, w, columns):
        return w / self._scales(columns)

    def round(self, w, columns):
        return fp8_round(w / self._scales(columns))

    def clamp(self, q):
        return q.clamp(-FP8_MAX, FP8_MAX)

    def value(self, q, columns):
        return q * self._scales(columns)

    def round_column(self, w, column, integers):
        scale = self._by_block[column // FP8_BLOCK]
        integers.copy_(fp8_round(w / scale))
        return integers * scale

    def result(self, integers: torch.Tensor) -> BlockScaledTensor:
        return BlockScaledTensor(values=integers.to("cpu", torch.float8_e4m3fn),
                                 scale=self.scale.to("cpu", self.grid.scale_dtype), scheme=self.grid.scheme)
