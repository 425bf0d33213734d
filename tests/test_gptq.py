"""GPTQ against round-to-nearest on the same weights and inputs: the algorithm must earn its keep."""

import pytest
import torch

from conftest import quantize_matrix

from llmq.calib.statistics import HessianCollector
from llmq.core.scheme import QuantScheme
from llmq.methods.grids.integer import group_qparams


def correlated_inputs(tokens=4096, features=128, seed=0):
    """Activations with a few loud channels and strong correlations, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5
    x = torch.randn(tokens, features, generator=g) @ (torch.eye(features) + 2 * mix)
    x[:, :4] *= 8
    return x


def output_error(w, w_hat, x):
    return ((x @ (w - w_hat).T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()


def quantize(name, w, x, scheme, **options):
    return quantize_matrix(name, w, scheme, x, **options)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 64, False), (3, 32, False), (2, 64, False),
                                                   (8, -1, True), (4, -1, False)])
def test_gptq_output_error_below_rtn(bits, group, symmetric):
    x = correlated_inputs()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(2))
    scheme = QuantScheme(bits, group, symmetric)
    rtn = output_error(w, quantize("rtn", w, x, scheme).dequantize(), x)
    gptq = output_error(w, quantize("gptq", w, x, scheme).dequantize(), x)
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_act_order_uses_static_groups_and_beats_rtn():
    x = correlated_inputs(seed=3)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    scheme = QuantScheme(4, 32, False)
    q = quantize("gptq", w, x, scheme, act_order=True)
    # Static groups: the scales are fixed from the original weights, group g covers columns [32g, 32g + 32).
    scale, zero = group_qparams(w, scheme, torch.float32)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero_point.float(), zero)
    assert output_error(w, q.dequantize(), x) < 0.8 * output_error(w, quantize("rtn", w, x, scheme).dequantize(), x)


def test_gptq_with_mse_search_beats_plain_gptq_at_3_bits():
    x = correlated_inputs(seed=5)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(6)) ** 3
    scheme = QuantScheme(3, 64, True)
    plain = output_error(w, quantize("gptq", w, x, scheme).dequantize(), x)
    searched = output_error(w, quantize("gptq", w, x, scheme, mse=True).dequantize(), x)
    assert searched < plain


def test_dead_inputs_are_zeroed_not_nan():
    x = correlated_inputs()
    x[:, 10] = 0  # an input channel that never fires: H_ii = 0
    w = torch.randn(8, 128)
    q = quantize("gptq", w, x, QuantScheme(4, 32, True)).dequantize()
    assert torch.isfinite(q).all()
    assert (q[:, 10] == 0).all()


def test_singular_hessian_raises_damping_and_still_quantizes(monkeypatch):
    messages = []
    monkeypatch.setattr("llmq.core.log.info", messages.append)
    x = torch.randn(8, 64) @ torch.randn(64, 64)  # rank 8 of 64
    w = torch.randn(16, 64)
    q = quantize("gptq", w, x, QuantScheme(4, 32, True), damp=1e-12).dequantize()
    assert torch.isfinite(q).all()
    assert messages and "retrying with" in messages[0]


def test_hessian_collector_is_exact_for_bf16_inputs():
    x = torch.randn(512, 64).to(torch.bfloat16)
    stats = HessianCollector(64, torch.device("cpu"))
    stats.add(x[:200])
    stats.add(x[200:])
    expected = 2 * (x.double().T @ x.double()) / 512
    assert torch.allclose(stats.hessian().double(), expected, rtol=1e-5, atol=1e-4)


def test_sink_weight_counts_each_windows_first_token_that_many_times():
    x = torch.randn(3, 10, 16)  # 3 calibration windows of 10 tokens
    original = x.clone()
    weighted = HessianCollector(16, torch.device("cpu"), sink_weight=5)
    weighted.add(x)
    assert torch.equal(x, original)  # the caller's activations are not scaled in place
    repeated = HessianCollector(16, torch.device("cpu"))
    repeated.add(torch.cat([x[:, :1].expand(3, 5, 16), x[:, 1:]], dim=1))  # first token written 5 times
    assert weighted.tokens == repeated.tokens == 3 * 14
    assert torch.allclose(weighted.hessian(), repeated.hessian(), rtol=1e-5, atol=1e-6)
    plain = HessianCollector(16, torch.device("cpu"))
    plain.add(x)
    assert not torch.allclose(plain.hessian(), weighted.hessian(), rtol=1e-3)


def _reference_sweep(W, Hinv, block_size, round_column):
    """The loop of the reference gptq.py, on W itself (columns strided in memory), for comparison."""
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            err1 = (W1[:, i] - round_column(i1 + i, W1, i)) / Hinv1[i, i]
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("grid", ["integer", "q4_k"])
def test_sweep_equals_the_reference_loop(monkeypatch, act_order, grid):
    """llmq's sweep (lazy blocks, rank-1 updates in place, any grid) against the reference gptq.py loop: the guard
    for any faster formulation of it (issue 14)."""
    from gguf import GGMLQuantizationType as T

    from llmq.core.config import MethodOptions
    from llmq.methods import gptq
    from llmq.methods.grids.integer import IntegerGrid
    from llmq.methods.grids.kquant import KQuantGrid

    x = correlated_inputs(features=512)
    w = torch.randn(192, 512, generator=torch.Generator().manual_seed(1))
    grid = IntegerGrid(QuantScheme(4, 64, False), torch.bfloat16) if grid == "integer" else KQuantGrid(T.Q4_K)

    def run():
        stats = HessianCollector(512, torch.device("cpu"))
        stats.add(x)
        return gptq.GPTQ(MethodOptions(act_order=act_order)).quantize(w, stats, grid).dequantize()

    ours = run()
    monkeypatch.setattr(gptq, "error_feedback_sweep", _reference_sweep)
    reference = run()
    assert torch.equal(ours, reference)  # same products, same order: bit for bit
