"""GGUF's lattice i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, and IQ1_S / IQ1_M): bit layouts, decoding.

A super-block of 256 weights has one fp16 scale d and a 4-bit scale code per sub-block. Its weights come in
groups of 8 (IQ2) or 4 (IQ3), each group one entry of a fixed codebook of non-negative magnitudes (points of
the E8 lattice for IQ2, of a cubic one for IQ3) with a sign per weight:

    w = db[sub] * codebook[index[group]][k] * (-1 if sign bit k else 1)

The signs come in masks of 8. IQ2_XXS, IQ2_XS and IQ3_XXS store 7 bits of each mask: the 8th makes the
number of negatives even (gguf-py's `ksigns` table), so an encoder must choose signs of even parity. The
codebooks are gguf-py's (`init_grid`), the same numbers llama.cpp's kernels use; `values` decodes with
gguf-py's float32 operations in its order, so decoding is bit-exact with `gguf.quants.dequantize`.

Codes of a lattice block: d [n], L = codebook indices [n, groups], sc = scale codes [n, sub-blocks],
signs = 8-bit sign masks [n, block_size / 8]. IQ1_S / IQ1_M differ (IQ1BlockType): signed entries in {-1, 0, 1}
shifted by +-1/8, `signs` holding the shift's sign.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmq.methods.grids.blocks import (
    BlockType,
    Codes,
    _f16_bytes,
    _read_f16,
    _split,
    from_le_bytes,
    le_bytes,
    pack_fields,
    unpack_fields,
)


class LatticeBlockType(BlockType, qtype=None):
    """A lattice type: `group` weights per codebook entry, `sub_size` weights per scale code, `parity`: 7 stored
    sign bits per 8 weights (even number of negatives)."""

    group: int
    parity: bool
    _codebook: torch.Tensor | None = None

    def __init_subclass__(cls, qtype):
        super().__init_subclass__(qtype=qtype)
        cls._codebook = None

    @classmethod
    def codebook(cls) -> torch.Tensor:
        """float32 [entries, group] magnitudes (gguf-py's grid for this type)."""
        if cls._codebook is None:
            reference = gguf_quants._type_traits[cls.qtype]
            reference.init_grid()
            cls._codebook = torch.from_numpy(np.ascontiguousarray(reference.grid.reshape(-1, cls.group)).copy())
        return cls._codebook

    scale_step: float  # a sub-block's scale is d * (0.5 + code) * scale_step

    @classmethod
    def sub_scale(cls, d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        """The scale of each sub-block, [n, n_sub], from d [n] and the codes: d * (0.5 + sc) * step, as gguf-py
        computes it (IQ3_S's d * (1 + 2 sc) is the same number: a factor of 2 rounds nothing)."""
        return d[:, None] * (0.5 + sc.to(torch.float32)) * cls.scale_step

    @classmethod
    def scale_factor(cls, sc: torch.Tensor) -> torch.Tensor:
        """sub_scale / d for codes sc (float): what an encoder inverts."""
        return cls.sub_scale(torch.ones(sc.shape[:-1]), sc)

    @classmethod
    def grid(cls, codes: Codes):
        return cls.sub_scale(codes.d, codes.sc), None

    @classmethod
    def values(cls, codes: Codes) -> torch.Tensor:
        n = codes.d.shape[0]
        db = cls.sub_scale(codes.d, codes.sc)  # [n, n_sub]
        magnitudes = cls.codebook().index_select(0, codes.L.reshape(-1).long()).reshape(n, -1, cls.sub_size)
        signs = sign_factors(codes.signs).reshape(n, -1, cls.sub_size)
        return (db.unsqueeze(-1) * magnitudes * signs).reshape(n, cls.block_size)


def sign_factors(masks: torch.Tensor) -> torch.Tensor:
    """8-bit sign masks [...] -> float32 factors [..., 8]: -1 where bit k is set, else 1."""
    return torch.where(unpack_fields(masks, 1, 8) == 0, 1.0, -1.0)


def _seven_bit_signs(masks: torch.Tensor) -> torch.Tensor:
    """Sign masks [..., 4] -> the 28 bits IQ2_XXS / IQ3_XXS store (7 per mask; the 8th is parity)."""
    return pack_fields(masks.to(torch.int64) & 127, 7)


def _parity_masks(seven: torch.Tensor) -> torch.Tensor:
    """7 stored bits -> the full 8-bit mask (bit 7 set when the 7 bits hold an odd number of negatives)."""
    seven = seven.to(torch.int64) & 127
    odd = unpack_fields(seven, 1, 7).sum(-1) & 1
    return (seven | (odd << 7)).to(torch.int32)


def _nibble_pairs(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [n, 2k] -> [n, k] bytes, code 2j in the low nibble of byte j and 2j+1 in its high one."""
    return pack_fields(codes.reshape(codes.shape[0], -1, 2), 4).to(torch.uint8)


def _read_nibble_pairs(data: torch.Tensor) -> torch.Tensor:
    return unpack_fields(data, 4, 2).reshape(data.shape[0], -1).to(torch.int32)


class IQ2_XXS(LatticeBlockType, qtype=GGMLQuantizationType.IQ2_XXS):
    """66 bytes / 256 weights (2.06 bits). Per sub-block of 32, two uint32:

        a = codebook indices of its 4 groups of 8 (one byte each)
        b = 7 sign bits of each group (bits 0-6, 7-13, 14-20, 21-27) | scale code << 28
        db = d * (0.5 + sc) * 0.25,   codebook: 256 points of 8 magnitudes in {8, 25, 43}
    """

    sub_size, qmax, group, parity, scale_step = 32, 255, 8, True, 0.25

    @classmethod
    def pack(cls, codes):
        n = codes.d.shape[0]
        a = pack_fields(codes.L.reshape(n, 8, 4), 8)
        b = _seven_bit_signs(codes.signs.reshape(n, 8, 4)) | (codes.sc.to(torch.int64) << 28)
        return torch.cat([_f16_bytes(codes.d), le_bytes(torch.stack([a, b], -1).reshape(n, 16), 4)], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        d, qs = _split(data, [2, 64])
        words = from_le_bytes(qs, 4).reshape(n, 8, 2)
        a, b = words[..., 0], words[..., 1]
        index = unpack_fields(a, 8, 4)
        signs = _parity_masks(unpack_fields(b, 7, 4))
        return Codes(d=_read_f16(d), L=index.reshape(n, 32).to(torch.int32), sc=(b >> 28).to(torch.int32),
                     signs=signs.reshape(n, 32))


class IQ2_XS(LatticeBlockType, qtype=GGMLQuantizationType.IQ2_XS):
    """74 bytes / 256 weights (2.31 bits).

        d          : fp16
        qs[32]     : uint16 per group of 8: codebook index (9 bits) | 7 sign bits << 9
        scales[8]  : two 4-bit codes per byte (sub-blocks of 16: low nibble first)
        db = d * (0.5 + sc) * 0.25,   codebook: 512 points of 8 magnitudes in {8, 25, 43}
    """

    sub_size, qmax, group, parity, scale_step = 16, 511, 8, True, 0.25

    @classmethod
    def pack(cls, codes):
        words = codes.L.to(torch.int64) | ((codes.signs.to(torch.int64) & 127) << 9)
        return torch.cat([_f16_bytes(codes.d), le_bytes(words, 2), _nibble_pairs(codes.sc)], dim=1)

    @classmethod
    def unpack(cls, data):
        d, qs, scales = _split(data, [2, 64, 8])
        words = from_le_bytes(qs, 2)
        return Codes(d=_read_f16(d), L=(words & 511).to(torch.int32), sc=_read_nibble_pairs(scales),
                     signs=_parity_masks(words >> 9))


class IQ2_S(LatticeBlockType, qtype=GGMLQuantizationType.IQ2_S):
    """82 bytes / 256 weights (2.56 bits).

        d          : fp16
        qs[32]     : low 8 bits of each group's codebook index
        signs[32]  : the 8 sign bits of each group of 8
        qh[8]      : high 2 bits of the indices of groups 4i..4i+3 (bits 0-1, 2-3, 4-5, 6-7)
        scales[8]  : two 4-bit codes per byte (sub-blocks of 16)
        db = d * (0.5 + sc) * 0.25,   codebook: 1024 points of 8 magnitudes in {8, 25, 43}
    """

    sub_size, qmax, group, parity, scale_step = 16, 1023, 8, False, 0.25

    @classmethod
    def pack(cls, codes):
        index = codes.L.to(torch.int64)
        high = pack_fields((index >> 8).reshape(index.shape[0], 8, 4), 2).to(torch.uint8)
        return torch.cat([_f16_bytes(codes.d), (index & 0xFF).to(torch.uint8), codes.signs.to(torch.uint8), high,
                          _nibble_pairs(codes.sc)], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        d, qs, signs, qh, scales = _split(data, [2, 32, 32, 8, 8])
        high = unpack_fields(qh, 2, 4).reshape(n, 32)
        index = (qs.to(torch.int64) | (high << 8)).to(torch.int32)
        return Codes(d=_read_f16(d), L=index, sc=_read_nibble_pairs(scales), signs=signs.to(torch.int32))


class IQ3_XXS(LatticeBlockType, qtype=GGMLQuantizationType.IQ3_XXS):
    """98 bytes / 256 weights (3.06 bits).

        d          : fp16
        qs[64]     : codebook index of each group of 4
        8 x uint32 : per sub-block of 32, 7 sign bits of each of its 4 masks of 8 | scale code << 28
        db = d * (0.5 + sc) * 0.5,   codebook: 256 points of 4 magnitudes in {4, 12, 20, 28, 36, 44, 52, 62}
    """

    sub_size, qmax, group, parity, scale_step = 32, 255, 4, True, 0.5

    @classmethod
    def pack(cls, codes):
        n = codes.d.shape[0]
        words = _seven_bit_signs(codes.signs.reshape(n, 8, 4)) | (codes.sc.to(torch.int64) << 28)
        return torch.cat([_f16_bytes(codes.d), codes.L.to(torch.uint8), le_bytes(words, 4)], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        d, qs, rest = _split(data, [2, 64, 32])
        words = from_le_bytes(rest, 4)
        signs = _parity_masks(unpack_fields(words, 7, 4))
        return Codes(d=_read_f16(d), L=qs.to(torch.int32), sc=(words >> 28).to(torch.int32), signs=signs.reshape(n, 32))


class IQ3_S(LatticeBlockType, qtype=GGMLQuantizationType.IQ3_S):
    """110 bytes / 256 weights (3.44 bits).

        d          : fp16
        qs[64]     : low 8 bits of each group of 4's codebook index
        qh[8]      : bit k of byte i = high bit of group 8i + k
        signs[32]  : the 8 sign bits of each 8 weights
        scales[4]  : two 4-bit codes per byte (sub-blocks of 32)
        db = d * (1 + 2 sc),   codebook: 512 points of 4 magnitudes in {1, 3, ..., 15}
    """

    sub_size, qmax, group, parity, scale_step = 32, 511, 4, False, 2.0

    @classmethod
    def pack(cls, codes):
        index = codes.L.to(torch.int64)
        high = pack_fields((index >> 8).reshape(index.shape[0], 8, 8), 1).to(torch.uint8)
        return torch.cat([_f16_bytes(codes.d), (index & 0xFF).to(torch.uint8), high, codes.signs.to(torch.uint8),
                          _nibble_pairs(codes.sc)], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        d, qs, qh, signs, scales = _split(data, [2, 64, 8, 32, 4])
        high = unpack_fields(qh, 1, 8).reshape(n, 64)
        index = (qs.to(torch.int64) | (high << 8)).to(torch.int32)
        return Codes(d=_read_f16(d), L=index, sc=_read_nibble_pairs(scales), signs=signs.to(torch.int32))


class IQ1BlockType(LatticeBlockType, qtype=None):
    """IQ1_S / IQ1_M: signed codebook entries of 8 weights in {-1, 0, 1}, shifted by +-1/8 (`signs`: 1 = -1/8),
    w = d * (2 sc + 1) * (codebook[index][k] + shift), 3-bit scale codes."""

    group, parity, delta = 8, False, 0.125
    delta_size: int  # weights sharing one shift

    @classmethod
    def sub_scale(cls, d, sc):
        return d[:, None] * (2 * sc.to(torch.float32) + 1)

    @classmethod
    def values(cls, codes: Codes) -> torch.Tensor:
        n = codes.d.shape[0]
        dl = cls.sub_scale(codes.d, codes.sc)
        grid = cls.codebook().index_select(0, codes.L.reshape(-1).long()).reshape(n, -1, cls.delta_size)
        shift = torch.where(codes.signs == 0, cls.delta, -cls.delta).to(torch.float32).unsqueeze(-1)
        shifted = (grid + shift).reshape(n, -1, cls.sub_size)
        return (dl.unsqueeze(-1) * shifted).reshape(n, cls.block_size)


class IQ1_S(IQ1BlockType, qtype=GGMLQuantizationType.IQ1_S):
    """50 bytes / 256 weights (1.56 bits).

        d        : fp16
        qs[32]   : low 8 bits of each group of 8's codebook index (11 bits)
        qh[8]    : uint16 per sub-block of 32: high 3 bits of its 4 indices (bits 0-2, 3-5, 6-8, 9-11),
                   scale code (bits 12-14), shift sign (bit 15)
        w = d * (2 sc + 1) * (codebook[index] +- 1/8),   codebook: 2048 points of 8 values in {-1, 0, 1}
    """

    sub_size, qmax, delta_size = 32, 2047, 32

    @classmethod
    def pack(cls, codes):
        n = codes.d.shape[0]
        index = codes.L.to(torch.int64)
        qh = pack_fields((index >> 8).reshape(n, 8, 4), 3)
        qh |= (codes.sc.to(torch.int64) << 12) | (codes.signs.to(torch.int64) << 15)
        return torch.cat([_f16_bytes(codes.d), (index & 0xFF).to(torch.uint8), le_bytes(qh, 2)], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        d, qs, qh = _split(data, [2, 32, 16])
        qh = from_le_bytes(qh, 2)
        index = qs.to(torch.int64) | (unpack_fields(qh, 3, 4).reshape(n, 32) << 8)
        return Codes(d=_read_f16(d), L=index.to(torch.int32), sc=((qh >> 12) & 7).to(torch.int32),
                     signs=(qh >> 15).to(torch.int32))


class IQ1_M(IQ1BlockType, qtype=GGMLQuantizationType.IQ1_M):
    """56 bytes / 256 weights (1.75 bits).

        qs[32]     : low 8 bits of each group of 8's codebook index
        qh[16]     : a nibble per group (low nibble first): high 3 bits of its index, shift sign in bit 3
        scales[4]  : uint16 each: four 3-bit scale codes (one per 16 weights) in bits 0-11, and in bits 12-15
                     a nibble of the fp16 d (scales[k] holds bits 4k..4k+3)
        w = d * (2 sc + 1) * (codebook[index] +- 1/8)
    """

    sub_size, qmax, delta_size = 16, 2047, 8

    @classmethod
    def pack(cls, codes):
        n = codes.d.shape[0]
        index = codes.L.to(torch.int64)
        nibbles = (index >> 8) | (codes.signs.to(torch.int64) << 3)  # [n, 32]
        d_bits = codes.d.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
        words = pack_fields(codes.sc.reshape(n, 4, 4), 3) | (unpack_fields(d_bits, 4, 4) << 12)
        return torch.cat([(index & 0xFF).to(torch.uint8), _nibble_pairs(nibbles), le_bytes(words, 2)], dim=1)

    @classmethod
    def unpack(cls, data):
        n = data.shape[0]
        qs, qh, scales = _split(data, [32, 16, 8])
        words = from_le_bytes(scales, 2)
        d = pack_fields(words >> 12, 4).to(torch.int16).view(torch.float16).to(torch.float32)
        nibbles = _read_nibble_pairs(qh)
        index = qs.to(torch.int32) | ((nibbles & 7) << 8)
        return Codes(d=d, L=index, sc=unpack_fields(words, 3, 4).reshape(n, 16).to(torch.int32), signs=nibbles >> 3)


LATTICE_TYPES = (GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ2_XS, GGMLQuantizationType.IQ2_S,
                 GGMLQuantizationType.IQ3_XXS, GGMLQuantizationType.IQ3_S, GGMLQuantizationType.IQ1_S,
                 GGMLQuantizationType.IQ1_M)

__all__ = ["LATTICE_TYPES", "IQ1BlockType", "LatticeBlockType", "sign_factors"]
