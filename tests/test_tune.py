"""Scale tuning (llmq/methods/tune.py): the trainable form decodes exactly as the rounded weight, tuning lowers the
quantized model's KL to the original while keeping every integer code, and settings it cannot serve are refused
in one line before anything is loaded."""

import pytest
import torch
from conftest import save_tiny_model

from llmq import QuantizeConfig, quantize
from llmq.cli import main
from llmq.core.scheme import QuantizedTensor, QuantScheme
from llmq.methods.tune import ScaledCodes

IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("symmetric", [True, False])
def test_scaled_codes_decode_as_the_rounded_weight(symmetric):
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(-4 if symmetric else 0, 4 if symmetric else 8, (8, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(8, 2, generator=g).to(torch.bfloat16)
    zero = None if symmetric else torch.randint(0, 8, (8, 2), generator=g, dtype=torch.int8)
    result = QuantizedTensor(qweight, scale, zero, QuantScheme(3, 32, symmetric))
    module = ScaledCodes(result, None, torch.device("cpu"))
    assert torch.equal(module.weight(), result.dequantize().float())


def _kl(logits, reference):
    return torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


def test_tuning_lowers_the_kl_and_keeps_the_codes(tmp_path, smollm2_tokenizer_dir, calib_file):
    """GPTQ W2 g32 on a tiny Llama with loud channels, with and without 30 tuning steps: the tuned file's packed
    integers and zero points are the untuned one's, its scales differ, and its KL to the original on held-out
    tokens is lower (measured: 0.095 -> 0.059)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import llmq

    model_dir = save_tiny_model(tmp_path / "m", smollm2_tokenizer_dir, loud_channels=20.0)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(IDS).logits
    kl, tensors = {}, {}
    for steps in (0, 30):
        out = tmp_path / f"tuned-{steps}"
        result = quantize(str(model_dir), out, QuantizeConfig.of(
            method="gptq", bits=2, group_size=32, symmetric=False, tune_steps=steps, tune_lr=1e-3,
            calib=str(calib_file), samples=8, seqlen=64, device="cpu"))
        with torch.no_grad():
            kl[steps] = _kl(llmq.load(out, dtype=torch.float32)(IDS).logits, reference)
        tensors[steps] = load_file(out / "model.safetensors")
        assert ("scales tuned end to end for 30 steps" in result.calibration) == bool(steps)
    assert kl[30] < 0.8 * kl[0], kl
    scales = [key for key in tensors[0] if key.endswith("weight_scale")]
    assert scales and all(not torch.equal(tensors[0][key], tensors[30][key]) for key in scales)
    for key in tensors[0]:
        if not key.endswith("weight_scale"):
            assert torch.equal(tensors[0][key], tensors[30][key]), key  # codes, zero points, norms, embeddings


@pytest.mark.parametrize("argv, expect", [
    (["--tune-steps", "-1"], "--tune-steps must be 0 or more"),
    (["--tune-steps", "5", "--tune-lr", "2"], "--tune-lr a positive rate"),
    (["--tune-steps", "5", "--format", "gguf"], "--tune-steps trains the scales of weight-only integer grids"),
    (["--tune-steps", "5", "--scheme", "w8a8"], "with 8-bit inputs"),
    (["--tune-steps", "5", "--scheme", "nf4"], "not bitsandbytes nf4 weights"),
])
def test_bad_tune_flags_are_one_line(argv, expect, capsys, tmp_path, tiny_llama_dir):
    code = main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "o"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and expect in lines[-1], lines
    assert not (tmp_path / "o").exists()
