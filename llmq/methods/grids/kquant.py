"""GGUF's block types as Grids: the k-quants (and 32-wide legacy types) with their block scales, and the float types.

Fitting a k-quant grid runs llmq's block search (llmq/methods/grids/kquant_search.py; importance-weighted when
the harness collected an imatrix): it fixes every block's stored scale/min codes and so every sub-block's
effective scale and min. A rounding method then chooses the integers L in [0, qmax], column by column if it
likes (GPTQ), on the sub-block grid each column belongs to:

    symmetric types:  w = scale * (L - zero)      asymmetric types:  w = scale * L - min

Block layouts (the bytes) are in llmq/methods/grids/blocks.py; a BlockTensor is the codes of one weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from llmq.core.interfaces import Grid, GridFit
from llmq.core.records import record
from llmq.methods.grids.blocks import Codes, block_type, level_table
from llmq.methods.grids.kquant_search import encode, grid_of
from llmq.methods.grids.lattice import LATTICE_TYPES, IQ1BlockType

FLOAT_TYPES = (T.F32, T.F16, T.BF16)


record(T)  # a BlockTensor's block type, in checkpoints by name


def narrow_integers(L: torch.Tensor) -> torch.Tensor:
    """Block integers as uint8, or int16 for the lattice types' codebook indices (up to 2047); checked: a value
    outside the narrow type would wrap silently."""
    if L.dtype in (torch.uint8, torch.int16):
        return L
    if L.numel() and (L.min() < 0 or L.max() > 2047):
        raise ValueError(f"block integers outside 0..2047 ({L.min().item()}..{L.max().item()})")
    return L.to(torch.uint8 if not L.numel() or L.max() <= 255 else torch.int16)


@record
@dataclass
class BlockTensor:
    """A weight [rows, cols] in a GGUF block type: the codes of its blocks, row after row.

    The integers L (0..255 in every block type) are held as uint8, a quarter of int32's memory: a finished
    Llama-3-8B layer's results are 218M of them. They are widened only to be decoded or packed."""

    qtype: T
    codes: Codes
    shape: tuple[int, int]

    def __post_init__(self):
        self.codes = replace(self.codes, L=narrow_integers(self.codes.L))

    def _wide_codes(self) -> Codes:
        return replace(self.codes, L=self.codes.L.to(torch.int32))

    def dequantize(self) -> torch.Tensor:
        return block_type(self.qtype).values(self._wide_codes()).reshape(self.shape)

    def rows(self, rows: slice) -> BlockTensor:
        per_row = self.shape[1] // block_type(self.qtype).block_size
        blocks = slice(rows.start * per_row, rows.stop * per_row)
        cut = lambda t: None if t is None else t[blocks].clone()
        codes = Codes(d=cut(self.codes.d), L=cut(self.codes.L), sc=cut(self.codes.sc), dmin=cut(self.codes.dmin),
                      m=cut(self.codes.m), signs=cut(self.codes.signs))
        return BlockTensor(self.qtype, codes, (rows.stop - rows.start, self.shape[1]))

    def to_bytes(self) -> np.ndarray:
        """uint8 [rows, row_bytes] in llama.cpp's layout."""
        return block_type(self.qtype).pack(self._wide_codes()).reshape(self.shape[0], -1).numpy()


@record
@dataclass
class FloatTensor:
    """A weight a GGUF file stores as floats (F32 / F16 / BF16): the values it will read back."""

    qtype: T
    values: torch.Tensor  # float32 [rows, cols], already rounded to qtype

    def dequantize(self) -> torch.Tensor:
        return self.values

    def rows(self, rows: slice) -> FloatTensor:
        return replace(self, values=self.values[rows].to("cpu", copy=True))


class FloatGrid(Grid):
    """F32 / F16 / BF16: nothing to round; the values are kept in that float type."""

    rounds = False

    def __init__(self, qtype: T):
        self.qtype = qtype

    def fit(self, weight, importance=None) -> GridFit:
        raise TypeError(f"{self.qtype.name} stores floats; there is no grid to fit")

    def keep(self, weight: torch.Tensor) -> FloatTensor:
        dtype = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[self.qtype]
        return FloatTensor(self.qtype, weight.to(dtype).float())


class KQuantGrid(Grid):
    """One GGUF block type (Q2_K..Q6_K, Q4_0..Q8_0, TQ1_0/TQ2_0, IQ4_NL/IQ4_XS/MXFP4, the lattice IQ1-IQ3); its fit
    is llmq's block search."""

    weighted = True

    def __init__(self, qtype: T, importance: torch.Tensor | None = None):
        """`importance`: the input importance to weigh the fit by when the method brings none (an imatrix file's)."""
        self.qtype, self.importance = qtype, importance

    @property
    def vector_size(self) -> int:
        """Columns GPTQ rounds together: 8 for the lattice types (LatticeFit), else 1."""
        return LatticeFit.vector_size if self.qtype in LATTICE_TYPES else 1

    def fit(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> GridFit:
        if self.qtype in LATTICE_TYPES:
            return LatticeFit(self.qtype, weight, importance if importance is not None else self.importance)
        fit = LevelFit if block_type(self.qtype).levels is not None else KQuantFit
        return fit(self.qtype, weight, importance if importance is not None else self.importance)

    def mismatch(self, quantized) -> str | None:
        if not isinstance(quantized, BlockTensor) or quantized.qtype != self.qtype:
            return f"quantized as {getattr(quantized, 'qtype', type(quantized).__name__)}, not {self.qtype.name}"
        return None


class KQuantFit(GridFit):
    """The block codes of the search; integers of a column are rounded on that column's sub-block grid."""

    def __init__(self, qtype: T, weight: torch.Tensor, importance: torch.Tensor | None):
        self.qtype, self.block = qtype, block_type(qtype)
        self.shape = tuple(weight.shape)
        codes = encode(weight, qtype, None if importance is None else importance.cpu())
        scale, minimum = grid_of(codes, qtype, self.shape[0])
        self.codes = replace(codes, L=narrow_integers(codes.L))  # held through the whole sweep: kept small
        self.scale = scale.to(weight.device)
        self.minimum = None if minimum is None else minimum.to(weight.device)
        self.device = weight.device
        # per sub-block, contiguous over the rows (round_column): scale, its inverse as round() takes it, minimum
        self._by_sub_block = (self.scale.T.contiguous(), self._inverse(self.scale).T.contiguous(),
                              None if self.minimum is None else self.minimum.T.contiguous())

    @staticmethod
    def _inverse(scale: torch.Tensor) -> torch.Tensor:
        return torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))

    def _parameters(self, columns: torch.Tensor):
        sub = columns // self.block.sub_size
        return self.scale[:, sub], None if self.minimum is None else self.minimum[:, sub]

    def nearest(self) -> torch.Tensor:
        return self.codes.L.reshape(self.shape).to(self.device, torch.float32)

    def position(self, w, columns):
        scale, minimum = self._parameters(columns)
        inverse = self._inverse(scale)
        return w * inverse + self.block.zero if minimum is None else (w + minimum) * inverse

    def round(self, w, columns):
        # the same operations as the search's own re-rounding (kquant_search.round_to_grid), per column
        scale, minimum = self._parameters(columns)
        inverse = self._inverse(scale)
        if minimum is None:
            return torch.mul(w, inverse).round_().add_(self.block.zero).clamp_(0, self.block.qmax)
        return torch.add(w, minimum).mul_(inverse).round_().clamp_(0, self.block.qmax)

    def clamp(self, q):
        return q.clamp(0, self.block.qmax)

    def value(self, q, columns):
        scale, minimum = self._parameters(columns)
        return scale * (q - self.block.zero) if minimum is None else scale * q - minimum

    def round_column(self, w, column, integers):
        sub = column // self.block.sub_size
        scale, inverse = self._by_sub_block[0][sub], self._by_sub_block[1][sub]
        if self.minimum is None:
            q = torch.mul(w, inverse, out=integers).round_().add_(self.block.zero).clamp_(0, self.block.qmax)
            return scale * (q - self.block.zero)
        minimum = self._by_sub_block[2][sub]
        q = torch.add(w, minimum, out=integers).mul_(inverse).round_().clamp_(0, self.block.qmax)
        return scale * q - minimum

    def result(self, integers: torch.Tensor) -> BlockTensor:
        codes = replace(self.codes, L=narrow_integers(integers.to("cpu")).reshape(-1, self.block.block_size))
        return BlockTensor(self.qtype, codes, self.shape)


class LevelFit(KQuantFit):
    """A codebook type's (IQ4_NL, IQ4_XS, MXFP4) block scales from the search; a weight is rounded to the nearest
    level of w / scale on its sub-block (w = scale * levels[L]), with the encoder's own arithmetic."""

    def __init__(self, qtype: T, weight: torch.Tensor, importance: torch.Tensor | None):
        super().__init__(qtype, weight, importance)
        table = level_table(self.block)
        self.table = replace(table, **{name: getattr(table, name).to(self.device)
                                       for name in ("values", "sorted_values", "code_of_sorted", "bounds")})

    def position(self, w, columns):
        """w in units of its sub-block's scale (the levels' axis, not the codes')."""
        scale, _ = self._parameters(columns)
        return w * self._inverse(scale)

    def round(self, w, columns):
        return self.table.nearest(self.position(w, columns)).float()

    def value(self, q, columns):
        scale, _ = self._parameters(columns)
        return scale * self.table.values.index_select(0, q.long().reshape(-1)).reshape(q.shape)

    def round_column(self, w, column, integers):
        sub = column // self.block.sub_size
        index = self.table.index(w * self._by_sub_block[1][sub])
        integers.copy_(self.table.code(index))
        return self._by_sub_block[0][sub] * self.table.level(index)


class LatticeFit(GridFit):
    """A lattice i-quant's codes from its encoder (llmq/methods/grids/lattice_search.py). Its integers are codebook
    entries of 8 or 4 weights with a sign mask per 8, not one integer per weight: round-to-nearest takes the
    encoder's codes whole; GPTQ rounds `vector_size` columns at a time (round_group) onto the sub-block scales the
    encoder chose, and those codes replace the encoder's. The codes live in the fit; result() ignores its
    argument (the per-column integers GPTQ keeps are not this grid's)."""

    vector_size = 8  # columns rounded together: one sign mask (IQ2: one codebook entry; IQ3: two)

    def __init__(self, qtype: T, weight: torch.Tensor, importance: torch.Tensor | None):
        self.qtype, self.shape, self.device = qtype, tuple(weight.shape), weight.device
        self.block = block_type(qtype)
        self.codes = encode(weight, qtype, None if importance is None else importance.cpu())
        rows, cols = self.shape
        # per row and sub-block, the stored scale; codes by (row, group of 8 columns) for round_group
        self.scale = self.block.sub_scale(self.codes.d, self.codes.sc).reshape(rows, -1)
        self.L = self.codes.L.reshape(rows, -1, 8 // self.block.group)  # [rows, cols / 8, entries per 8]
        self.signs = self.codes.signs.reshape(rows, -1)  # [rows, cols / 8]

    def nearest(self) -> torch.Tensor:
        return torch.empty(0)  # no integer per weight: the encoder's codes, kept in the fit, are the result

    def _per_column(self, *_):
        raise NotImplementedError(f"{self.qtype.name} rounds {self.vector_size} columns at a time (round_group)")

    position = round = clamp = value = round_column = _per_column

    def round_group(self, w: torch.Tensor, column: int, weight: torch.Tensor) -> torch.Tensor:
        """Round columns column..column+7 (w: [8, rows], their current values) by Σ weight_k (x - q)², weight [8]
        per column; returns their decoded values [8, rows] and keeps their codes."""
        from llmq.methods.grids.lattice_search import group_codes, iq1_group_codes

        x = w.T.to("cpu", torch.float32)  # [rows, 8]
        weight = weight.to("cpu", torch.float32).expand_as(x)
        scale = self.scale[:, column // self.block.sub_size]
        if issubclass(self.block, IQ1BlockType):  # signs are shifts: one per sub-block (IQ1_S, kept) or per group
            shared = self.block.delta_size > 8
            sign_column = column // self.block.delta_size
            index, signs, values = iq1_group_codes(self.block, x, weight, scale,
                                                   self.signs[:, sign_column] if shared else None)
            self.signs[:, sign_column] = signs.to(self.signs.dtype)
        else:
            index, signs, values = group_codes(self.block, x, weight, scale)
            self.signs[:, column // 8] = signs.to(self.signs.dtype)
        self.L[:, column // 8] = index.to(self.L.dtype)
        return values.T.to(w.device)

    def result(self, integers: torch.Tensor) -> BlockTensor:
        return BlockTensor(self.qtype, self.codes, self.shape)
