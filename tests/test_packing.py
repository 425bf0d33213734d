"""Bit-exact packing: our words equal compressed-tensors' for every bit width, and unpack inverts pack."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from llmq.targets.packing import pack_int32, packed_words, unpack_int32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [576, 1536, 37, 32])
def test_round_trip_and_layout_match_compressed_tensors(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, n), generator=g).to(torch.int8)
    packed = pack_int32(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, packed_words(n, bits))
    assert torch.equal(packed, pack_to_int32(values, bits))
    assert torch.equal(unpack_int32(packed, bits, n), values)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size((7, n))), values)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_column_packing_for_zero_points(bits):
    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (45, 9)).to(torch.int8)
    packed = pack_int32(values, bits, dim=0)
    assert torch.equal(packed, pack_to_int32(values, bits, packed_dim=0))
    assert torch.equal(unpack_int32(packed, bits, 45, dim=0), values)


def test_known_4bit_word():
    # v0..v7 = -8..-1 -> unsigned 0..7, v0 in the low nibble: 0x76543210
    values = torch.arange(-8, 0, dtype=torch.int8).reshape(1, 8)
    assert pack_int32(values, 4).item() == 0x76543210


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_a_few_rows_at_a_time_gives_the_same_words(bits, monkeypatch):
    import llmq.targets.packing as packing

    torch.manual_seed(bits)
    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (37, 96), dtype=torch.int8)
    whole, down_columns = packing.pack_int32(values, bits), packing.pack_int32(values, bits, dim=0)
    monkeypatch.setattr(packing, "_CHUNK_VALUES", 5 * 96)  # 5 rows at a time, the last chunk 2 rows
    assert torch.equal(packing.pack_int32(values, bits), whole)
    assert torch.equal(packing.pack_int32(values, bits, dim=0), down_columns)
