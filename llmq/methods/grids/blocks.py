"""GGUF block layouts: pack quantized integers and their scales into llama.cpp's bytes, and back.

One class per block type, registered by its GGML type id. Every type decodes the same way: a block of
`block_size` weights is split into sub-blocks of `sub_size`, each with an effective float32 scale and either
a min (asymmetric types), a fixed integer zero (symmetric types) or a table of levels (codebook types), and

    asymmetric:  w = scale * L - min     symmetric:  w = scale * (L - zero)     codebook:  w = scale * levels[L]

with L an unsigned integer in [0, qmax] (a 4-bit index into the 16 levels for IQ4_NL, IQ4_XS and MXFP4). The
scales themselves are stored as integer codes under one fp16 super-scale per block (k-quants) or directly in fp16
(the 32-wide legacy types). `Codes` holds those stored integers; `grid()` turns them into the effective
scale/min exactly as gguf-py's decoders compute them (same float32 operations in the same order), so `decode` is
bit-exact with `gguf.quants.dequantize`. The lattice i-quants (IQ1-IQ3: codebook entries of 4 or 8 weights) are
in lattice.py, on the same Codes.

The choice of codes (the search) lives in llmq/methods/grids/kquant_search.py; this module is only the bit layout.
It sits with the grids (not with the GGUF target) because the block types *are* grids: methods round onto
them, the GGUF target writes their bytes, the runtime decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmq.core.records import record

QK_K = 256


@record
@dataclass
class Codes:
    """The stored numbers of n blocks (torch tensors; integers as int32, d/dmin as float32 holding fp16 values)."""

    d: torch.Tensor  # [n] super-scale (or the scale, for 32-wide types)
    L: torch.Tensor  # [n, block_size] unsigned quantized weights
    sc: torch.Tensor | None = None  # [n, n_sub] integer sub-block scales (k-quants)
    dmin: torch.Tensor | None = None  # [n] super-scale of the mins (asymmetric k-quants) or the fp16 min (Q4_1/Q5_1)
    m: torch.Tensor | None = None  # [n, n_sub] integer sub-block mins (asymmetric k-quants)
    signs: torch.Tensor | None = None  # [n, block_size / 8] sign masks, bit k set = weight k negative (lattice types)


def fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back to float32, as the stored value will read."""
    return x.to(torch.float16).to(torch.float32)


# ---- bit-plane helpers -------------------------------------------------------------------------------------
# Most layouts put `k` fields of `bits` bits into one byte, taking field i from element i * width + j for byte j:
#     byte[j] = v[j] | v[width + j] << bits | v[2 * width + j] << 2 * bits | ...


def interleave(values: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """[..., k * width] small unsigned ints -> [..., width] bytes (k = 8 // bits fields per byte)."""
    k = values.shape[-1] // width
    v = values.reshape(*values.shape[:-1], k, width).to(torch.int32)
    shifts = (torch.arange(k, dtype=torch.int32) * bits).reshape(k, 1)
    return (v << shifts).sum(-2).to(torch.uint8)


def deinterleave(data: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `interleave`: [..., width] bytes -> [..., k * width] ints."""
    v = data.to(torch.int32).unsqueeze(-2)
    shifts = (torch.arange(k, dtype=torch.int32) * bits).reshape(k, 1)
    out = (v >> shifts) & ((1 << bits) - 1)
    return out.reshape(*data.shape[:-1], k * data.shape[-1])


def pack_fields(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Fields [..., k] of `bits` bits each -> int64 words [...], field i in bits i*bits .. (i+1)*bits - 1."""
    shifts = bits * torch.arange(values.shape[-1], dtype=torch.int64)
    return (values.to(torch.int64) << shifts).sum(-1)


def unpack_fields(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_fields`: words [...] -> int64 fields [..., k]."""
    shifts = bits * torch.arange(k, dtype=torch.int64)
    return (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


def le_bytes(words: torch.Tensor, width: int) -> torch.Tensor:
    """Unsigned words [..., k] of `width` bytes -> uint8 [..., k * width], little-endian (a uint16/uint32 array)."""
    return unpack_fields(words, 8, width).to(torch.uint8).reshape(*words.shape[:-1], -1)


def from_le_bytes(data: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `le_bytes`: uint8 [..., k * width] -> int64 words [..., k]."""
    return pack_fields(data.reshape(*data.shape[:-1], -1, width), 8)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _read_f16(data: torch.Tensor) -> torch.Tensor:
    return data.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def _split(data: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(data, sizes, dim=-1))


# ---- registry ----------------------------------------------------------------------------------------------

BLOCK_TYPES: dict[GGMLQuantizationType, type[BlockType]] = {}


class BlockType:
    qtype: GGMLQuantizationType
    block_size: int
    type_size: int
    sub_size: int
    qmax: int
    zero: int | None = None  # symmetric types: the integer that decodes to 0; None: asymmetric (scale * L - min)
    levels: tuple[int, ...] | None = None  # codebook types: w = scale * levels[L] (non-uniform; see LevelTable)

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None):
        if qtype is None:  # a family's base class (lattice.LatticeBlockType), not a type of its own
            return
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        BLOCK_TYPES[qtype] = cls

    @classmethod
    def grid(cls, codes: Codes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective (scale, min) per sub-block, [n, n_sub] each; min is None for symmetric types.

        k-quants: scale = d * sc, min = dmin * m; 32-wide types: scale = d, and Q4_1/Q5_1 store the additive
        offset itself in `dmin` (w = d * L + m), so min = -m. Codebook types (IQ4_NL, IQ4_XS, MXFP4) have no min.
        """
        scale = codes.d[:, None] if codes.sc is None else codes.d[:, None] * codes.sc.float()
        if cls.zero is not None or cls.levels is not None:
            return scale, None
        if codes.m is None:
            return scale, -codes.dmin[:, None]
        return scale, codes.dmin[:, None] * codes.m.float()

    @classmethod
    def pack(cls, codes: Codes) -> torch.Tensor:
        """-> uint8 [n, type_size]"""
        raise NotImplementedError

    @classmethod
    def unpack(cls, data: torch.Tensor) -> Codes:
        """uint8 [n, type_size] -> Codes"""
        raise NotImplementedError

    @classmethod
    def values(cls, codes: Codes) -> torch.Tensor:
        """Decoded weights [n, block_size] in float32, with gguf-py's operation order."""
        scale, minimum = cls.grid(codes)
        n = codes.L.shape[0]
        scale = scale.unsqueeze(-1)
        if cls.levels is not None:  # gguf-py: scale * float32(kvalues[L])
            L = codes.L.reshape(n, -1, cls.sub_size).long()
            level = level_table(cls).values.index_select(0, L.reshape(-1)).reshape(L.shape)
            return (scale * level).reshape(n, cls.block_size)
        L = codes.L.reshape(n, -1, cls.sub_size).to(torch.float32)
        if minimum is None:
            out = scale * (L - cls.zero)
        else:
            out = scale * L - minimum.unsqueeze(-1)
        return out.reshape(n, cls.block_size)

    @classmethod
    def decode(cls, data: torch.Tensor) -> torch.Tensor:
        """uint8 [..., k * type_size] -> float32 [..., k * block_size]"""
        shape = data.shape
        blocks = data.reshape(-1, cls.type_size)
        return cls.values(cls.unpack(blocks)).reshape(*shape[:-1], shape[-1] // cls.type_size * cls.block_size)


@dataclass(frozen=True)
class LevelTable:
    """A codebook type's levels for rounding: `values[L]` decodes code L; `sorted_values` ascending (duplicates
    such as MXFP4's +0/-0 dropped), `code_of_sorted` the code each stands for, `bounds` the midpoints between
    neighbours. The nearest level of a position p is code_of_sorted[bucketize(p, bounds)]: a tie goes to the
    lower level."""

    values: torch.Tensor  # float32 [codes]
    sorted_values: torch.Tensor
    code_of_sorted: torch.Tensor  # int32
    bounds: torch.Tensor

    # A lookup table for index(): every bound is a multiple of 1 / resolution, so the bounds below a position p
    # are those below ceil(p * resolution) in those units; lookup[k] counts the bounds at or below k - offset.
    # (torch.bucketize gives the same answers 5-10x slower: it was 75% of an IQ4_XS encode.)
    resolution: int = 0
    offset: int = 0
    lookup: torch.Tensor | None = None

    def __post_init__(self):
        for resolution in (1, 2, 4, 8, 16, 32, 64):
            units = self.bounds.double() * resolution
            if torch.equal(units, units.round()) and units.abs().max() < 4096:
                lo, hi = int(units.min()), int(units.max())
                steps = torch.arange(lo - 1, hi + 1, dtype=torch.float64, device=self.bounds.device)
                object.__setattr__(self, "resolution", resolution)  # (a frozen dataclass)
                object.__setattr__(self, "offset", 1 - lo)
                object.__setattr__(self, "lookup", torch.bucketize(steps, units, right=True))
                return

    def index(self, position: torch.Tensor) -> torch.Tensor:
        """Index (int64) into sorted_values of the level nearest to `position` (in units of the scale); a position
        on a bound goes to the lower level."""
        if self.lookup is None:
            return torch.bucketize(position, self.bounds)
        k = (position * self.resolution).ceil_().sub_(1).clamp_(-self.offset, self.lookup.numel() - 1 - self.offset)
        return self.lookup.index_select(0, k.add_(self.offset).long().reshape(-1)).reshape(position.shape)

    def level(self, index: torch.Tensor) -> torch.Tensor:
        # index_select, not advanced indexing: the latter is ~30x slower on CPU for a 16-entry table
        return self.sorted_values.index_select(0, index.reshape(-1)).reshape(index.shape)

    def code(self, index: torch.Tensor) -> torch.Tensor:
        return self.code_of_sorted.index_select(0, index.reshape(-1)).reshape(index.shape)

    def nearest(self, position: torch.Tensor) -> torch.Tensor:
        """Codes (int32) of the levels nearest to `position`."""
        return self.code(self.index(position))


_LEVEL_TABLES: dict[GGMLQuantizationType, LevelTable] = {}


def level_table(cls: type[BlockType]) -> LevelTable:
    if cls.qtype not in _LEVEL_TABLES:
        values = torch.tensor(cls.levels, dtype=torch.float32)
        unique = sorted(set(cls.levels))
        code = [cls.levels.index(v) for v in unique]  # first code of each value: MXFP4's 0 is code 0, not -0
        ordered = torch.tensor(unique, dtype=torch.float32)
        _LEVEL_TABLES[cls.qtype] = LevelTable(values, ordered, torch.tensor(code, dtype=torch.int32),
                                              (ordered[1:] + ordered[:-1]) / 2)
    return _LEVEL_TABLES[cls.qtype]


def _k_scale_bytes(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins in 12 bytes.

        byte 0..3   : sc[0..3]  (6 bits) | high 2 bits of sc[4..7] in bits 6-7
        byte 4..7   : m[0..3]   (6 bits) | high 2 bits of m[4..7]  in bits 6-7
        byte 8..11  : low 4 bits of sc[4..7] | low 4 bits of m[4..7] << 4
    """
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([first, second, third], dim=1).to(torch.uint8)


def _k_scale_codes(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = data.to(torch.int32)
    first, second, third = b[:, :4], b[:, 4:8], b[:, 8:]
    sc = torch.cat([first & 63, (third & 0xF) | ((first >> 6) << 4)], dim=1)
    m = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], dim=1)
    return sc, m


class Q2_K(BlockType, qtype=GGMLQuantizationType.Q2_K):
    """84 bytes / 256 weights (2.625 bits): asymmetric, 16 sub-blocks of 16, 4-bit scale and min codes.

        scales[16]  : sc[j] | m[j] << 4
        qs[64]      : per 128 weights, byte j holds L[j], L[j+32], L[j+64], L[j+96] (2 bits each, low first)
        d, dmin     : fp16
        w = d * sc[j] * L - dmin * m[j]
    """

    sub_size, qmax = 16, 3


    @classmethod
    def pack(cls, codes):
        n = codes.L.shape[0]
        scales = (codes.sc | (codes.m << 4)).to(torch.uint8)
        qs = interleave(codes.L.reshape(n, 2, 128), 2, 32).reshape(n, 64)
        return torch.cat([scales, qs, _f16_bytes(codes.d), _f16_bytes(codes.dmin)], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        scales, qs, d, dmin = _split(data, [16, 64, 2, 2])
        scales = scales.to(torch.int32)
        L = deinterleave(qs.reshape(n, 2, 32), 2, 4).reshape(n, 256)
        return Codes(d=_read_f16(d), L=L, sc=scales & 0xF, dmin=_read_f16(dmin), m=scales >> 4)


class Q3_K(BlockType, qtype=GGMLQuantizationType.Q3_K):
    """110 bytes / 256 weights (3.4375 bits): symmetric, 16 sub-blocks of 16, signed 6-bit scale codes.

        hmask[32]   : bit i of byte j = bit 2 of L[32 * i + j]
        qs[64]      : low 2 bits of L, laid out as Q2_K's qs
        scales[12]  : sc + 32 (6 bits): low nibbles of codes 0..7 in bytes 0..7 bits 0-3, of codes 8..15 in
                      bytes 0..7 bits 4-7; the high 2 bits of code j in byte 8 + j % 4 at bit 2 * (j // 4)
        d           : fp16
        w = d * sc[j] * (L - 4)
    """

    sub_size, qmax, zero = 16, 7, 4


    @classmethod
    def pack(cls, codes):
        n = codes.L.shape[0]
        L = codes.L.to(torch.int32)
        hmask = interleave(L >> 2, 1, 32)
        qs = interleave((L & 3).reshape(n, 2, 128), 2, 32).reshape(n, 64)
        code = codes.sc.to(torch.int32) + 32
        low = interleave(code & 0xF, 4, 8)
        high = interleave(code >> 4, 2, 4)
        return torch.cat([hmask, qs, low, high, _f16_bytes(codes.d)], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        hmask, qs, low, high, d = _split(data, [32, 64, 8, 4, 2])
        L = deinterleave(qs.reshape(n, 2, 32), 2, 4).reshape(n, 256) | (deinterleave(hmask, 1, 8) << 2)
        code = deinterleave(low, 4, 2) | (deinterleave(high, 2, 4) << 4)
        return Codes(d=_read_f16(d), L=L, sc=code - 32)


class Q4_K(BlockType, qtype=GGMLQuantizationType.Q4_K):
    """144 bytes / 256 weights (4.5 bits): asymmetric, 8 sub-blocks of 32, 6-bit scale and min codes.

        d, dmin     : fp16
        scales[12]  : see _k_scale_bytes
        qs[128]     : per 64 weights, byte j holds L[j] (low nibble) and L[j+32] (high nibble)
        w = d * sc[j] * L - dmin * m[j]
    """

    sub_size, qmax = 32, 15


    @classmethod
    def pack(cls, codes):
        n = codes.L.shape[0]
        qs = interleave(codes.L.reshape(n, 4, 64), 4, 32).reshape(n, 128)
        return torch.cat([_f16_bytes(codes.d), _f16_bytes(codes.dmin), _k_scale_bytes(codes.sc, codes.m), qs], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        d, dmin, scales, qs = _split(data, [2, 2, 12, 128])
        sc, m = _k_scale_codes(scales)
        L = deinterleave(qs.reshape(n, 4, 32), 4, 2).reshape(n, 256)
        return Codes(d=_read_f16(d), L=L, sc=sc, dmin=_read_f16(dmin), m=m)


class Q5_K(BlockType, qtype=GGMLQuantizationType.Q5_K):
    """176 bytes / 256 weights (5.5 bits): Q4_K plus a fifth bit per weight.

        d, dmin, scales[12] : as Q4_K
        qh[32]      : bit i of byte j = bit 4 of L[32 * i + j]
        qs[128]     : low 4 bits of L, laid out as Q4_K's qs
    """

    sub_size, qmax = 32, 31


    @classmethod
    def pack(cls, codes):
        n = codes.L.shape[0]
        L = codes.L.to(torch.int32)
        qh = interleave(L >> 4, 1, 32)
        qs = interleave((L & 0xF).reshape(n, 4, 64), 4, 32).reshape(n, 128)
        return torch.cat([_f16_bytes(codes.d), _f16_bytes(codes.dmin), _k_scale_bytes(codes.sc, codes.m), qh, qs],
                         dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        d, dmin, scales, qh, qs = _split(data, [2, 2, 12, 32, 128])
        sc, m = _k_scale_codes(scales)
        L = deinterleave(qs.reshape(n, 4, 32), 4, 2).reshape(n, 256) | (deinterleave(qh, 1, 8) << 4)
        return Codes(d=_read_f16(d), L=L, sc=sc, dmin=_read_f16(dmin), m=m)


class Q6_K(BlockType, qtype=GGMLQuantizationType.Q6_K):
    """210 bytes / 256 weights (6.5625 bits): symmetric, 16 sub-blocks of 16, int8 scale codes.

        ql[128]     : per 128 weights, 64 bytes; byte j holds the low 4 bits of L[j] and L[j+64]
        qh[64]      : per 128 weights, 32 bytes; byte j holds the high 2 bits of L[j], L[j+32], L[j+64], L[j+96]
        scales[16]  : int8
        d           : fp16
        w = d * sc[j] * (L - 32)
    """

    sub_size, qmax, zero = 16, 63, 32


    @classmethod
    def pack(cls, codes):
        n = codes.L.shape[0]
        L = codes.L.to(torch.int32).reshape(n, 2, 128)
        ql = interleave(L & 0xF, 4, 64).reshape(n, 128)
        qh = interleave(L >> 4, 2, 32).reshape(n, 64)
        scales = codes.sc.to(torch.int8).view(torch.uint8)
        return torch.cat([ql, qh, scales, _f16_bytes(codes.d)], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        ql, qh, scales, d = _split(data, [128, 64, 16, 2])
        low = deinterleave(ql.reshape(n, 2, 64), 4, 2)
        high = deinterleave(qh.reshape(n, 2, 32), 2, 4)
        L = (low | (high << 4)).reshape(n, 256)
        return Codes(d=_read_f16(d), L=L, sc=scales.contiguous().view(torch.int8).to(torch.int32))


def _scale_and_nibbles(codes: Codes) -> torch.Tensor:
    """Q4_0 and IQ4_NL: an fp16 scale, then 16 bytes of nibbles."""
    return torch.cat([_f16_bytes(codes.d), _nibbles(codes.L)], dim=1)


def _read_scale_and_nibbles(data: torch.Tensor) -> Codes:
    d, qs = _split(data, [2, 16])
    return Codes(d=_read_f16(d), L=deinterleave(qs, 4, 2))


def _nibbles(L: torch.Tensor) -> torch.Tensor:
    """32 weights -> 16 bytes: byte j holds L[j] (low nibble) and L[j+16] (high nibble)."""
    return interleave(L & 0xF, 4, 16)


def _high_bits(L: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 weights as one little-endian uint32: bit j = weight j."""
    bits = ((L.to(torch.int32) >> 4) & 1).reshape(L.shape[0], 4, 8)
    return (bits << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def _read_high_bits(qh: torch.Tensor) -> torch.Tensor:
    return ((qh.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(qh.shape[0], 32)


class Q4_0(BlockType, qtype=GGMLQuantizationType.Q4_0):
    """18 bytes / 32 weights: d (fp16), 16 bytes of nibbles (L[j] low, L[j+16] high); w = d * (L - 8)."""

    sub_size, qmax, zero = 32, 15, 8


    @classmethod
    def pack(cls, codes):
        return _scale_and_nibbles(codes)

    @classmethod
    def unpack(cls, data):
        return _read_scale_and_nibbles(data)


class Q4_1(BlockType, qtype=GGMLQuantizationType.Q4_1):
    """20 bytes / 32 weights: d, m (fp16), nibbles as Q4_0; w = d * L + m (here min = -m)."""

    sub_size, qmax = 32, 15


    @classmethod
    def pack(cls, codes):
        return torch.cat([_f16_bytes(codes.d), _f16_bytes(codes.dmin), _nibbles(codes.L)], dim=1)

    @classmethod
    def unpack(cls, data):
        d, m, qs = _split(data, [2, 2, 16])
        return Codes(d=_read_f16(d), L=deinterleave(qs, 4, 2), dmin=_read_f16(m))


class Q5_0(BlockType, qtype=GGMLQuantizationType.Q5_0):
    """22 bytes / 32 weights: d (fp16), qh (uint32: bit j = bit 4 of L[j]), low nibbles as Q4_0; w = d * (L - 16)."""

    sub_size, qmax, zero = 32, 31, 16


    @classmethod
    def pack(cls, codes):
        return torch.cat([_f16_bytes(codes.d), _high_bits(codes.L), _nibbles(codes.L)], dim=1)

    @classmethod
    def unpack(cls, data):
        d, qh, qs = _split(data, [2, 4, 16])
        return Codes(d=_read_f16(d), L=deinterleave(qs, 4, 2) | (_read_high_bits(qh) << 4))


class Q5_1(BlockType, qtype=GGMLQuantizationType.Q5_1):
    """24 bytes / 32 weights: d, m (fp16), qh and nibbles as Q5_0; w = d * L + m."""

    sub_size, qmax = 32, 31


    @classmethod
    def pack(cls, codes):
        return torch.cat([_f16_bytes(codes.d), _f16_bytes(codes.dmin), _high_bits(codes.L), _nibbles(codes.L)], dim=1)

    @classmethod
    def unpack(cls, data):
        d, m, qh, qs = _split(data, [2, 2, 4, 16])
        return Codes(d=_read_f16(d), L=deinterleave(qs, 4, 2) | (_read_high_bits(qh) << 4), dmin=_read_f16(m))


class Q8_0(BlockType, qtype=GGMLQuantizationType.Q8_0):
    """34 bytes / 32 weights: d (fp16), 32 int8; w = d * q. Here L = q + 128 so that L is unsigned."""

    sub_size, qmax, zero = 32, 255, 128


    @classmethod
    def values(cls, codes):
        # gguf-py multiplies int8 * d (operand order matters only for NaN payloads; kept identical anyway)
        return (codes.L - 128).to(torch.float32) * codes.d[:, None]

    @classmethod
    def pack(cls, codes):
        q = (codes.L.to(torch.int32) - 128).to(torch.int8).view(torch.uint8)
        return torch.cat([_f16_bytes(codes.d), q], dim=1)

    @classmethod
    def unpack(cls, data):
        d, q = _split(data, [2, 32])
        return Codes(d=_read_f16(d), L=q.contiguous().view(torch.int8).to(torch.int32) + 128)


# ---- ternary types (BitNet b1.58): L = t + 1 in {0, 1, 2}, one fp16 scale per 256 weights; w = d * (L - 1) ----


class TQ2_0(BlockType, qtype=GGMLQuantizationType.TQ2_0):
    """66 bytes / 256 weights: 64 bytes of 2-bit codes, then d (fp16).

    Each half of the block (128 weights) fills 32 bytes; byte j holds weights j, 32 + j, 64 + j, 96 + j:

        bits:     7 6  | 5 4  | 3 2  | 1 0
        weight:  96+j  | 64+j | 32+j |  j        (within the half)
    """

    sub_size, qmax, zero = 256, 2, 1

    @classmethod
    def pack(cls, codes):
        halves = codes.L.reshape(-1, 2, 128)
        return torch.cat([interleave(halves, 2, 32).reshape(-1, 64), _f16_bytes(codes.d)], dim=1)

    @classmethod
    def unpack(cls, data):
        qs, d = _split(data, [64, 2])
        return Codes(d=_read_f16(d), L=deinterleave(qs.reshape(-1, 2, 32), 2, 4).reshape(-1, 256))


# TQ1_0 packs five trits per byte (3^5 = 243 <= 256) as a base-3 number, first weight most significant,
# then stretches it to a fixed-point fraction of 256 (v * 256 / 243, rounded up) so that a decoder pulls
# trit k out with one multiply and a shift: ((byte * 3^k) mod 256) * 3 >> 8.
_TRIT_PLACES = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32)


def _trits_to_bytes(L: torch.Tensor, width: int, trits: int) -> torch.Tensor:
    """[n, trits * width] -> [n, width]: byte j = sum_k L[k * width + j] * 3^(4 - k), as a fraction of 256."""
    v = (L.reshape(L.shape[0], trits, width).to(torch.int32) * _TRIT_PLACES[:trits].reshape(trits, 1)).sum(1)
    return ((v * 256 + 242) // 243).to(torch.uint8)


def _bytes_to_trits(data: torch.Tensor, trits: int) -> torch.Tensor:
    """Inverse of `_trits_to_bytes`: [n, width] -> [n, trits * width]."""
    powers = torch.tensor([1, 3, 9, 27, 81][:trits], dtype=torch.int32).reshape(trits, 1)
    shifted = (data.to(torch.int32).unsqueeze(1) * powers) & 0xFF  # uint8 arithmetic wraps
    return ((shifted * 3) >> 8).reshape(data.shape[0], -1)


class TQ1_0(BlockType, qtype=GGMLQuantizationType.TQ1_0):
    """54 bytes / 256 weights: qs (48 bytes), qh (4 bytes), d (fp16); 1.69 bits per weight.

        qs[0:32]   weights   0..159, five per byte: byte j <- weights j, 32+j, 64+j, 96+j, 128+j
        qs[32:48]  weights 160..239, five per byte: byte j <- 160 + {j, 16+j, 32+j, 48+j, 64+j}
        qh[0:4]    weights 240..255, four per byte: byte j <- 240 + {j, 4+j, 8+j, 12+j} (lowest trit 0)
    """

    sub_size, qmax, zero = 256, 2, 1

    @classmethod
    def pack(cls, codes):
        L = codes.L
        return torch.cat([_trits_to_bytes(L[:, :160], 32, 5), _trits_to_bytes(L[:, 160:240], 16, 5),
                          _trits_to_bytes(L[:, 240:], 4, 4), _f16_bytes(codes.d)], dim=1)

    @classmethod
    def unpack(cls, data):
        qs0, qs1, qh, d = _split(data, [32, 16, 4, 2])
        L = torch.cat([_bytes_to_trits(qs0, 5), _bytes_to_trits(qs1, 5), _bytes_to_trits(qh, 4)], dim=1)
        return Codes(d=_read_f16(d), L=L)


# ---- codebook types: 4-bit codes index a table of levels, w = scale * levels[L] -------------------------------

# IQ4_NL's non-uniform levels (llama.cpp's kvalues_iq4nl): denser near zero, where most weights are
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# MXFP4's E2M1 values, doubled so they are integers (code 8 is -0); the E8M0 scale is halved to match
E2M1_LEVELS = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


class IQ4_NL(BlockType, qtype=GGMLQuantizationType.IQ4_NL):
    """18 bytes / 32 weights (4.5 bits): d (fp16), 16 bytes of nibbles as Q4_0; w = d * IQ4_LEVELS[L]."""

    sub_size, qmax, levels = 32, 15, IQ4_LEVELS

    @classmethod
    def pack(cls, codes):
        return _scale_and_nibbles(codes)

    @classmethod
    def unpack(cls, data):
        return _read_scale_and_nibbles(data)


class IQ4_XS(BlockType, qtype=GGMLQuantizationType.IQ4_XS):
    """136 bytes / 256 weights (4.25 bits): IQ4_NL's levels in 8 sub-blocks of 32, each with a 6-bit scale code.

        d           : fp16
        scales_h    : uint16; bits 2j, 2j+1 = high 2 bits of code j + 32
        scales_l[4] : byte j = low 4 bits of codes 2j (low nibble) and 2j+1 (high nibble), each + 32
        qs[128]     : per sub-block, 16 bytes of nibbles as Q4_0
        w = d * sc[j] * IQ4_LEVELS[L],  sc in -32..31
    """

    sub_size, qmax, levels = 32, 15, IQ4_LEVELS

    @classmethod
    def pack(cls, codes):
        n = codes.L.shape[0]
        code = codes.sc.to(torch.int32) + 32
        scales_h = le_bytes(pack_fields(code >> 4, 2)[:, None], 2)
        scales_l = pack_fields((code & 0xF).reshape(n, 4, 2), 4).to(torch.uint8)
        qs = _nibbles(codes.L.reshape(n * 8, 32)).reshape(n, 128)
        return torch.cat([_f16_bytes(codes.d), scales_h, scales_l, qs], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        d, scales_h, scales_l, qs = _split(data, [2, 2, 4, 128])
        high = unpack_fields(from_le_bytes(scales_h, 2)[:, 0], 2, 8)
        low = unpack_fields(scales_l, 4, 2).reshape(n, 8)
        L = deinterleave(qs.reshape(n * 8, 16), 4, 2).reshape(n, 256)
        return Codes(d=_read_f16(d), L=L, sc=((low | (high << 4)) - 32).to(torch.int32))


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """The scale an E8M0 byte e stands for, halved (ggml's e8m0_to_fp32_half): 2^(e - 128), exact in float32."""
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.to(torch.int32) - 128)


def e8m0_code(d: torch.Tensor) -> torch.Tensor:
    """The E8M0 byte of a power-of-two half scale d = 2^(e - 128) (inverse of e8m0_half)."""
    _, exponent = torch.frexp(d)  # d = 0.5 * 2^exponent
    return (exponent - 1 + 128).clamp_(0, 255).to(torch.uint8)


class MXFP4(BlockType, qtype=GGMLQuantizationType.MXFP4):
    """17 bytes / 32 weights (4.25 bits): e (E8M0), 16 bytes of nibbles as Q4_0; w = 2^(e - 128) * E2M1_LEVELS[L]
    (OCP MXFP4: E2M1 elements under one power-of-two scale; the levels doubled, the scale halved). Codes.d holds
    the halved scale 2^(e - 128) itself."""

    sub_size, qmax, levels = 32, 15, E2M1_LEVELS

    @classmethod
    def pack(cls, codes):
        return torch.cat([e8m0_code(codes.d).reshape(-1, 1), _nibbles(codes.L)], dim=1)

    @classmethod
    def unpack(cls, data):
        e, qs = _split(data, [1, 16])
        return Codes(d=e8m0_half(e.reshape(-1)), L=deinterleave(qs, 4, 2))


def block_type(qtype: GGMLQuantizationType) -> type[BlockType]:
    return BLOCK_TYPES[qtype]


def decode_tensor(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes -> float32 tensor of `shape` (PyTorch order: [rows, row_length])."""
    if qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy()).reshape(shape)
    if qtype == GGMLQuantizationType.F16:
        return torch.from_numpy(np.ascontiguousarray(data).view(np.float16).astype(np.float32)).reshape(shape)
    if qtype == GGMLQuantizationType.BF16:
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.int16).astype(np.int32) << 16)
        return raw.view(torch.float32).reshape(shape)
    raw = np.ascontiguousarray(data).view(np.uint8)
    if not raw.flags.writeable:  # a memory-mapped GGUF: torch wants its own copy
        raw = raw.copy()
    bytes_ = torch.from_numpy(raw).reshape(shape[0], -1)
    return block_type(qtype).decode(bytes_).reshape(shape)
