"""NF4 (Dettmers et al., QLoRA, 2023): 4-bit NormalFloat codes with one absmax per 64 weights, the absmax values
themselves quantized to 8 bits ("double quantization"), as bitsandbytes stores a pre-quantized 4-bit checkpoint.

One Linear's weight [rows, cols] is read as a flat row-major sequence cut into blocks of 64 (cols a multiple of
64, so a block is 64 consecutive columns of one row):

    absmax_b   = max |w| over block b                                    float32
    offset     = mean_b absmax_b                                          one float per Linear
    qabsmax_b  = 8-bit dynamic code of (absmax_b - offset), one float32 scale per 256 blocks (bitsandbytes'
                 quantize_blockwise, its own bytes)
    absmax'_b  = dynamic_map[qabsmax_b] * nested_absmax[b // 256] + offset     what every loader multiplies by
    w_hat      = NF4[q] * absmax'_b,    q in 0..15,  NF4 the 16 NormalFloat levels (bitsandbytes' table)

bitsandbytes' own quantize_4bit picks q from the exact absmax and stores absmax' anyway. Here the grid is the
stored one: q is the nearest level of w / absmax' (ties to the lower level, as its bucketize does), so a
method rounds onto exactly what the loader computes, and GPTQ's error feedback sees the real grid. The levels
and the double quantization come from bitsandbytes (installed with `pip install bitsandbytes`); decoding needs
only the stored tensors (llmq/runtime/nf4.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.core.errors import LlmqError
from llmq.core.interfaces import Grid, GridFit
from llmq.core.records import record
from llmq.core.scheme import QuantScheme

NESTED_BLOCK = 256  # blocks per scale of the double quantization (bitsandbytes' fixed choice)


def _bitsandbytes():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        raise LlmqError("NF4 needs bitsandbytes for its tables and double quantization: pip install bitsandbytes") from None
    return bnb_functional


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 values, ascending, float32 (bitsandbytes' table)."""
    return _bitsandbytes().get_4bit_type("nf4", device="cpu").float()


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(qabsmax uint8, nested_absmax float32, nested_map float32 [256], offset) of the blocks' absmax values, by
    bitsandbytes' quantize_blockwise (so the bytes are its own)."""
    offset = absmax.mean()
    qabsmax, state = _bitsandbytes().quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCK)
    return qabsmax, state.absmax.float(), state.code.float(), float(offset.item())


def stored_absmax(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor,
                  offset: float) -> torch.Tensor:
    """absmax' per block, as loaders decode it from the stored tensors."""
    nested = nested_absmax.repeat_interleave(NESTED_BLOCK)[: qabsmax.numel()]
    return nested_map[qabsmax.long()] * nested + offset


@record
@dataclass
class Nf4Tensor:
    """One Linear's weight in NF4: codes [rows, cols] (0..15, unpacked) and its double-quantized block absmax."""

    codes: torch.Tensor  # uint8 [rows, cols]
    qabsmax: torch.Tensor  # uint8 [blocks]
    nested_absmax: torch.Tensor  # float32 [ceil(blocks / 256)]
    nested_map: torch.Tensor  # float32 [256]
    levels: torch.Tensor  # float32 [16]
    offset: float
    blocksize: int
    dtype: str  # the model's dtype, which the quant state names

    def absmax(self) -> torch.Tensor:
        return stored_absmax(self.qabsmax, self.nested_absmax, self.nested_map, self.offset)

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        values = self.levels[self.codes.long()].reshape(-1, self.blocksize) * self.absmax()[:, None]
        return values.reshape(rows, cols)

    def rows(self, rows: slice) -> Nf4Tensor:
        """The whole weight only: its absmax values are double-quantized over all of its blocks."""
        if (rows.start or 0) != 0 or rows.stop not in (None, self.codes.shape[0]):
            raise ValueError("an NF4 weight's rows cannot be cut: plan one part per Linear")
        return Nf4Tensor(*(value.to("cpu", copy=True) if torch.is_tensor(value) else value
                           for value in (self.codes, self.qabsmax, self.nested_absmax, self.nested_map, self.levels,
                                         self.offset, self.blocksize, self.dtype)))


class Nf4Grid(Grid):
    """NF4 with per-64 absmax, double-quantized; `dtype` is the model's (named in the stored quant state)."""

    def __init__(self, scheme: QuantScheme, dtype: torch.dtype):
        self.scheme, self.dtype = scheme, dtype
        self.levels = nf4_levels()
        self.bounds = (self.levels[1:] + self.levels[:-1]) / 2

    def fit(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> Nf4Fit:
        return Nf4Fit(self, weight)


class Nf4Fit(GridFit):
    def __init__(self, grid: Nf4Grid, weight: torch.Tensor):
        rows, cols = weight.shape
        block = grid.scheme.group_size
        if cols % block:
            raise LlmqError(f"NF4 blocks of {block} need in_features divisible by {block} (got {cols})")
        self.grid, self.weight, self.block = grid, weight, block
        absmax = weight.detach().float().abs().reshape(-1, block).amax(1).cpu()
        self.qabsmax, self.nested_absmax, self.nested_map, self.offset = double_quantize(absmax)
        scale = stored_absmax(self.qabsmax, self.nested_absmax, self.nested_map, self.offset)
        self.scale = scale.reshape(rows, cols // block).to(weight.device)  # absmax' per (row, block of columns)
        self.levels, self.bounds = grid.levels.to(weight.device), grid.bounds.to(weight.device)

    def _scale(self, columns: torch.Tensor) -> torch.Tensor:
        return self.scale[:, columns // self.block]

    def _nearest(self, position: torch.Tensor) -> torch.Tensor:
        # position = w / absmax', clamped to [-1, 1]; the level at or below each midpoint wins a tie
        return torch.bucketize(position.clamp(-1, 1), self.bounds).float()

    def nearest(self) -> torch.Tensor:
        columns = torch.arange(self.weight.shape[1], device=self.weight.device)
        return self.round(self.weight.float(), columns)

    def position(self, w, columns):
        scale = self._scale(columns)
        return torch.where(scale != 0, w / scale, torch.zeros_like(w))

    def round(self, w, columns):
        return self._nearest(self.position(w, columns))

    def clamp(self, q):
        return q.clamp(0, 15)

    def value(self, q, columns):
        return self.levels[q.long()] * self._scale(columns)

    def result(self, integers: torch.Tensor) -> Nf4Tensor:
        return Nf4Tensor(integers.to("cpu", torch.uint8), self.qabsmax, self.nested_absmax, self.nested_map,
                         self.levels.cpu(), self.offset, self.block, str(self.grid.dtype).removeprefix("torch."))
