"""The integer grid and round-to-nearest, checked against first principles."""

import pytest
import torch
from conftest import quantize_matrix

from llmq.core.errors import LlmqError
from llmq.core.scheme import QuantScheme
from llmq.methods.grids.integer import group_qparams


def _weight(rows=16, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, symmetric):
    w = _weight()
    scheme = QuantScheme(bits, 32, symmetric)
    q = quantize_matrix("rtn", w, scheme, scale_dtype=torch.float32)
    assert q.qweight.dtype == torch.int8
    assert int(q.qweight.min()) >= scheme.qmin and int(q.qweight.max()) <= scheme.qmax
    step = q.scale.repeat_interleave(32, dim=1)
    err = (q.dequantize() - w).abs()
    # Asymmetric grids cover every value; symmetric ones clip only the top of the positive side.
    inside = torch.ones_like(w, dtype=torch.bool) if not symmetric else w <= scheme.qmax * step
    assert (err[inside] <= step[inside] / 2 + 1e-6).all()


def test_symmetric_grid_is_gptq_convention():
    w = torch.tensor([[-3.0, 1.0, 0.5, 2.0] * 8])
    scale, zero = group_qparams(w, QuantScheme(4, 32, True), torch.float32)
    assert zero is None
    assert scale.item() == pytest.approx(3.0 / 7.5)


def test_asymmetric_grid_reaches_both_ends():
    w = torch.linspace(-1.0, 3.0, 32).reshape(1, 32)
    q = quantize_matrix("rtn", w, QuantScheme(4, 32, False), scale_dtype=torch.float32)
    assert int(q.qweight.min()) == -8 and int(q.qweight.max()) == 7
    assert q.dequantize().min().item() == pytest.approx(-1.0, abs=0.14)
    assert q.dequantize().max().item() == pytest.approx(3.0, abs=0.14)


def test_scales_are_rounded_to_storage_dtype_before_rounding_weights():
    w = _weight(cols=64)
    q = quantize_matrix("rtn", w, QuantScheme(4, 64, False), scale_dtype=torch.bfloat16)
    assert q.scale.dtype == torch.bfloat16
    # The stored integers are round-to-nearest for the *stored* scale.
    scale = q.scale.float().repeat_interleave(64, dim=1)
    zero = q.zero_point.float().repeat_interleave(64, dim=1)
    expected = (torch.round(w / scale) + zero).clamp(-8, 7)
    assert torch.equal(q.qweight.float(), expected)


def test_mse_clipping_search_lowers_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    scheme = QuantScheme(3, 64, True)
    plain = quantize_matrix("rtn", w, scheme, scale_dtype=torch.float32).dequantize()
    clipped = quantize_matrix("rtn", w, scheme, mse=True).dequantize()
    assert (clipped - w).pow(2).sum() < 0.9 * (plain - w).pow(2).sum()


def test_per_channel_has_one_group_per_row():
    q = quantize_matrix("rtn", _weight(), QuantScheme(4, -1, True), scale_dtype=torch.float32)
    assert q.scale.shape == (16, 1)


def test_all_zero_group_round_trips_exactly():
    w = torch.zeros(2, 32)
    for symmetric in (True, False):
        q = quantize_matrix("rtn", w, QuantScheme(4, 32, symmetric), scale_dtype=torch.float32)
        assert torch.equal(q.dequantize(), w)


def test_bad_scheme_values_are_refused():
    with pytest.raises(LlmqError, match="--bits 5"):
        QuantScheme(5, 128, True)
    with pytest.raises(LlmqError, match="--group-size 100"):
        QuantScheme(4, 100, True)


def _grids():
    from gguf import GGMLQuantizationType as T

    from llmq.methods.grids.fp8 import Fp8Grid
    from llmq.methods.grids.integer import IntegerGrid
    from llmq.methods.grids.kquant import KQuantGrid
    from llmq.methods.grids.nf4 import Nf4Grid
    from llmq.methods.grids.ternary import TernaryGrid, TernaryScheme

    return {
        "int4 g32 sym": IntegerGrid(QuantScheme(4, 32, True), torch.bfloat16),
        "int3 g64 asym": IntegerGrid(QuantScheme(3, 64, False), torch.float16),
        "q4_k (scale and minimum)": KQuantGrid(T.Q4_K),
        "q6_k (scale only)": KQuantGrid(T.Q6_K),
        "q3_k": KQuantGrid(T.Q3_K),
        "nf4": Nf4Grid(QuantScheme(4, 64, True), torch.bfloat16),
        "fp8": Fp8Grid(QuantScheme(8, -1, True, weight_type="float"), torch.bfloat16),
        "ternary": TernaryGrid(TernaryScheme("group", 64), torch.bfloat16),
    }


@pytest.mark.parametrize("name", list(_grids()))
def test_round_column_is_round_then_value_bit_for_bit(name):
    """GPTQ's sweep rounds through GridFit.round_column, which grids override with faster paths: each must give the
    integers of round() and the values of value(), exactly, on columns moved off the fitted weights (after a
    refit too, where the grid has one)."""
    from llmq.core.interfaces import GridFit

    g = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 256, generator=g) * 0.05
    fit = _grids()[name].fit(weight, torch.rand(256, generator=g) + 0.1)
    if fit.refit_group_size:
        fit.refit(fit.refit_group_size, weight[:, fit.refit_group_size : 2 * fit.refit_group_size] * 1.7)
    moved = weight + torch.randn(24, 256, generator=g) * 0.02
    for column in (0, 5, 31, 32, 100, 255):
        fast_integers, plain_integers = torch.empty(24), torch.empty(24)
        fast = fit.round_column(moved[:, column].contiguous(), column, fast_integers)
        plain = GridFit.round_column(fit, moved[:, column].contiguous(), column, plain_integers)
        assert torch.equal(fast_integers, plain_integers) and torch.equal(fast, plain)
        assert torch.equal(plain_integers, fit.round(moved[:, column : column + 1], torch.tensor([column]))[:, 0])
