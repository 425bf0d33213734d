"""Dense little-endian bit packing of signed integers into int32 words (compressed-tensors `pack-quantized`).

Along the packed dimension, value i occupies bits [i * bits, (i + 1) * bits) of one long little-endian bit
string, cut into int32 words; each value is stored with an offset of 2**(bits - 1) so it is unsigned:

    bits=4, values v0..v7 -> one int32:   [ v7 | v6 | v5 | v4 | v3 | v2 | v1 | v0 ]   (v0 in the low nibble)
    bits=3, 32 values     -> three int32: v10 straddles words 0 and 1 (its low 2 bits end word 0)

A row of n values takes ceil(n * bits / 32) words.
"""

from __future__ import annotations

import math

import torch


def packed_words(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


_CHUNK_VALUES = 1 << 22  # values packed at once: the bit spelling takes 8 * bits bytes per value


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack a 2-D signed int8 tensor along `dim` (1: along rows, 0: down columns) into int32 words.

    Rows are packed a few million values at a time: spelling out a Llama-3-8B gate_proj's 58.7M values at once
    took 1.9 GB per intermediate."""
    if dim == 0:
        return pack_int32(values.T, bits, dim=1).T.contiguous()
    rows, n = values.shape
    step = max(1, _CHUNK_VALUES // max(n, 1))
    if rows > step:
        return torch.cat([_pack_rows(values[start : start + step], bits) for start in range(0, rows, step)])
    return _pack_rows(values, bits)


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    rows, n = values.shape
    if 32 % bits == 0:  # whole values per word: shift each into place (8x less work than spelling out bits)
        per_word = 32 // bits
        unsigned = values.to(torch.int64) + (1 << (bits - 1))
        unsigned = torch.nn.functional.pad(unsigned, (0, -n % per_word)).reshape(rows, -1, per_word)
        word_values = (unsigned << (torch.arange(per_word, device=values.device) * bits)).sum(dim=-1)
        return (word_values - ((word_values >> 31) << 32)).to(torch.int32)
    unsigned = values.to(torch.int64) + (1 << (bits - 1))
    padded = math.ceil(n / 32) * 32
    unsigned = torch.nn.functional.pad(unsigned, (0, padded - n))
    # Every run of 32 values fills exactly `bits` words: spell out its bits, regroup them by 32.
    bit_index = torch.arange(bits, device=values.device)
    bit_string = (unsigned.unsqueeze(-1) >> bit_index) & 1  # [rows, padded, bits]
    words = bit_string.reshape(rows, padded * bits // 32, 32)
    word_values = (words << torch.arange(32, device=values.device)).sum(dim=-1)  # < 2**32, fits int64
    packed = (word_values - ((word_values >> 31) << 32)).to(torch.int32)  # reinterpret as signed
    return packed[:, : packed_words(n, bits)].contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: the first `n` signed values along `dim`, as int8."""
    if dim == 0:
        return unpack_int32(packed.T, bits, n, dim=1).T.contiguous()
    rows = packed.shape[0]
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # No value straddles a word: shift each word right by 0, bits, 2*bits, ...
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        unsigned = ((packed.unsqueeze(-1) >> shifts) & mask).reshape(rows, -1)[:, :n]
    else:
        bit_string = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=packed.device)) & 1
        bit_string = bit_string.reshape(rows, -1)
        usable = (bit_string.shape[1] // bits) * bits
        per_value = bit_string[:, :usable].reshape(rows, -1, bits)[:, :n]
        unsigned = (per_value << torch.arange(bits, device=packed.device)).sum(dim=-1)
    return (unsigned - (1 << (bits - 1))).to(torch.int8)
