"""W4A8, W4AFP8, FP8_BLOCK, MXFP4 and MXFP8: schemes whose Linears' inputs are quantized at run time, each written as
compressed-tensors' preset of that name; the run-time input rounding (compressed-tensors' own, to the bit), FP8_BLOCK's
grid, and both loaders (transformers through compressed-tensors in a fresh process, llmq.load)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_model
from test_microscaling import BF16_LOGITS

import llmq
from llmq import QuantizeConfig, quantize
from llmq.core.errors import LlmqError
from llmq.core.scheme import FP8_MAX, BlockScaledTensor, QuantScheme, scheme_with_preset
from llmq.methods.grids.fp8 import Fp8BlockGrid, fp8_round
from llmq.methods.grids.microscaling import mx_inputs
from llmq.runtime.microscaled import MicroscaledLinear
from llmq.runtime.w8 import W8Linear, fake_quantize_inputs
from llmq.targets.compressed_tensors import packed_tensors

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is the format these tests check against")
SCHEMES = ["W4A8", "W4AFP8", "FP8_BLOCK", "MXFP4", "MXFP8"]
_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, vocab_size=49152)


def _rounded_inputs(name: str, x: torch.Tensor) -> torch.Tensor:
    scheme = scheme_with_preset(name, {})
    return mx_inputs(x, scheme.weight_type) if scheme.microscaling else fake_quantize_inputs(x, scheme)


@pytest.mark.parametrize("name", SCHEMES)
def test_inputs_are_rounded_as_compressed_tensors_rounds_them(name):
    """llmq.load's run-time input rounding is compressed-tensors' forward_quantize (what transformers applies to
    these files), to the bit, in bf16 and float32: per token, per 128 or per 32 values, zero rows and groups, a
    group whose maximum has a significand of 1.75 (MX rounds its scale up there) and tiny values included."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    module = torch.nn.Linear(256, 8)
    module.quantization_status = QuantizationStatus.FROZEN
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(7)) * 3).to(dtype)
        x[0, 0] = 0
        x[0, 1, :128] = 0
        x[1, 1, :32] *= 1e-4
        x[1, 2, :32] = 0.1
        x[1, 2, 3] = 1.75
        theirs = forward_quantize(module, x, "input", PRESET_SCHEMES[name]["input_activations"])
        ours = _rounded_inputs(name, x)
        assert ours.dtype == dtype and torch.equal(ours, theirs)
        assert not torch.equal(ours, x)


def _weights(rows=300, cols=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, :: cols // 9] *= 6  # outlier columns, as trained weights have
    w[:128, 256:] = 0  # an all-zero block
    return w


def test_fp8_block_tensors_decompress_in_compressed_tensors_to_our_values():
    """FP8_BLOCK (partial blocks at the bottom edge): compressed-tensors' own float-quantized decompressor reads
    llmq's tensors as llmq's values, and so does W8Linear; each block holds one scale, searched never worse than
    the block's largest weight / 448 (llm-compressor's observer)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    scheme = scheme_with_preset("FP8_BLOCK", {})
    w = _weights()
    importance = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3)) ** 3 + 0.01
    fit = Fp8BlockGrid(scheme, torch.bfloat16).fit(w, importance)
    result = fit.result(fit.nearest())
    assert result.scale.shape == (3, 3) and result.scale.dtype == torch.bfloat16
    tensors = {key.removeprefix("x."): value for key, value in packed_tensors("x", result).items()}
    ct_scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES["FP8_BLOCK"])
    decoded = BaseCompressor.get_value_from_registry("float-quantized").decompress(tensors, ct_scheme)["weight"]
    assert torch.equal(decoded.float(), result.dequantize().to(decoded.dtype).float())
    layer = W8Linear(w.shape[1], w.shape[0], scheme, tensors["weight"], tensors["weight_scale"], None)
    assert torch.equal(layer.dequantized_weight(), result.dequantize())
    # the block maximum's scale, each block alone
    peak = torch.nn.functional.pad(w.abs(), (0, 0, 0, 84)).reshape(3, 128, 3, 128).amax((1, 3)) / FP8_MAX
    plain = torch.where(peak > 0, peak, torch.ones_like(peak)).to(torch.bfloat16)
    expand = lambda s: s.float().repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)
    plain_error = ((fp8_round(w / expand(plain)) * expand(plain) - w).square() * importance).sum()
    ours = ((result.dequantize() - w).square() * importance).sum()
    assert ours <= plain_error and ((result.dequantize() - w).norm() / w.norm()) < 0.03
    assert torch.equal(result.rows(slice(128, 300)).dequantize(), result.dequantize()[128:])
    with pytest.raises(ValueError, match="split a 128-row block"):
        result.rows(slice(64, 300))
    damaged = BlockScaledTensor(result.values, result.scale[:2], scheme)
    assert "scales are (2, 3), not (3, 3)" in damaged.damage()


def test_gptq_on_fp8_blocks_lowers_the_layer_output_error():
    """GPTQ's error feedback rounds onto the E4M3 grid with each block's stored scale: the output error on
    correlated inputs is clearly below round-to-nearest's on the same blocks (measured: 28% lower)."""
    from test_microscaling import rtn_and_gptq_output_errors

    grid = Fp8BlockGrid(scheme_with_preset("FP8_BLOCK", {}), torch.bfloat16)
    results, error = rtn_and_gptq_output_errors(_weights(200, 256, seed=5), grid)
    assert error["gptq"] < 0.8 * error["rtn"], error
    assert isinstance(results["gptq"], BlockScaledTensor) and results["gptq"].scale.shape == (2, 2)


@pytest.mark.parametrize("name", SCHEMES)
def test_transformers_in_a_fresh_process_and_llmq_load_agree(name, tmp_path, smollm2_tokenizer_dir):
    """GPTQ into each scheme; transformers reads the file through compressed-tensors in a fresh process and
    quantizes the inputs at run time as the config says, with llmq.load's logits: equal in float32 for the int /
    float-quantized files (compressed-tensors decodes them in the model's dtype; in bf16 it rounds q * s of an
    int4 weight to 8 significant bits, which the serving kernels do not), within 2e-3 in bf16 for the MX files
    (decoded to bf16 whatever dtype is asked: exact there, a power of two times a short element)."""
    source = save_tiny_model(tmp_path / "source", smollm2_tokenizer_dir, **_SIZES)
    out = tmp_path / name
    quantize(str(source), out, QuantizeConfig.of(method="gptq", scheme=name, device="cpu", samples=8, seqlen=64))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == {"W4A8": "int-quantized", "W4AFP8": "int-quantized", "FP8_BLOCK": "float-quantized",
                                "MXFP4": "mxfp4-pack-quantized", "MXFP8": "mxfp8-quantized"}[name]
    inputs = config["config_groups"]["group_0"]["input_activations"]
    assert (inputs["type"], inputs["strategy"], inputs["group_size"], inputs["dynamic"]) == {
        "W4A8": ("int", "token", None, True), "W4AFP8": ("float", "token", None, True),
        "FP8_BLOCK": ("float", "group", 128, True), "MXFP4": ("float", "group", 32, True),
        "MXFP8": ("float", "group", 32, True)}[name]
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    from llmq.inspect import inspect

    shown = "\n".join(inspect(out).lines())
    assert {"W4AFP8": "vLLM on Hopper GPUs", "FP8_BLOCK": "on CPUs with AMX", "W4A8": "transformers (with compressed-tensors), "
            "vLLM, llmq.load", "MXFP4": "its CPU build has no kernel", "MXFP8": "its CPU build has no kernel"}[name] in shown
    assert {"FP8_BLOCK": "a scale per 128 values at run time", "MXFP4": "a scale per 32 values at run time"}.get(
        name, "inputs") in shown
    mx = name.startswith("MX")
    script = BF16_LOGITS if mx else BF16_LOGITS.replace("torch.bfloat16", "torch.float32")
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "t.pt")],
                   check=True, capture_output=True)
    model = llmq.load(out, dtype=torch.bfloat16 if mx else torch.float32)
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, MicroscaledLinear if mx else W8Linear)
    if name.startswith("W4"):
        assert down.weight.dtype == torch.int8 and int(down.weight.abs().max()) <= 8
    with torch.no_grad():
        ours = model(ids).logits.float()
    theirs = torch.load(tmp_path / "t.pt")
    assert ((ours - theirs).norm() / theirs.norm()).item() < (2e-3 if mx else 1e-6)


def test_input_scheme_refusals_are_one_line(tmp_path, smollm2_tokenizer_dir):
    with pytest.raises(LlmqError, match="fixes --bits"):
        scheme_with_preset("W4AFP8", {"bits": 8}, typed=("bits",))
    with pytest.raises(LlmqError, match="FP8 inputs for integer weights"):
        QuantScheme(bits=8, group_size=-1, symmetric=True, weight_type="float", act_bits=8, act_type="float")
    with pytest.raises(LlmqError, match="4-bit symmetric weights with inputs per token"):
        QuantScheme(bits=4, group_size=128, symmetric=False, act_bits=8)
    with pytest.raises(LlmqError, match="FP8_BLOCK quantizes inputs in FP8 per 128 values"):
        QuantScheme(bits=8, group_size=128, symmetric=True, weight_type="float", act_bits=8, act_dynamic=False)
    with pytest.raises(LlmqError, match=r"MXFP4A16 is 4-bit floats .* \(or MXFP4 for inputs"):
        QuantScheme(bits=4, group_size=32, symmetric=True, weight_type="mxfp4", act_bits=8)
    source = save_tiny_model(tmp_path / "odd", smollm2_tokenizer_dir, **dict(_SIZES, intermediate_size=192))
    with pytest.raises(LlmqError, match="FP8_BLOCK quantizes inputs per 128 values, which does not divide .*down_proj"):
        quantize(str(source), tmp_path / "out", QuantizeConfig.of(method="rtn", scheme="FP8_BLOCK", device="cpu"))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's CPU build has no kernel for W4AFP8 (Hopper), "
                    "FP8_BLOCK (AMX CPUs or GPUs) or MXFP4; docs/schemes.md says what it ran here")
@pytest.mark.parametrize("name, kv_cache", [("W4AFP8", None), ("FP8_BLOCK", None), ("MXFP4", None), ("W4A16", "fp8")])
def test_vllm_on_a_gpu_runs_these_files_with_llmq_load_greedy_tokens(name, kv_cache, tmp_path, smollm2_tokenizer_dir):
    """scripts/gpu_check.sh runs this where a GPU is lent: vLLM serves each file (the KV-cache one with its FP8
    cache) and its first greedy token is llmq.load's."""
    pytest.importorskip("vllm", reason="vLLM is not installed on this machine")
    from test_microscaling import assert_vllm_greedy_is_llmq_loads

    source = save_tiny_model(tmp_path / "source", smollm2_tokenizer_dir, **_SIZES)
    out = tmp_path / name
    quantize(str(source), out, QuantizeConfig.of(method="gptq", scheme=name, device="cuda", samples=8, seqlen=64,
                                                 kv_cache=kv_cache))
    assert_vllm_greedy_is_llmq_loads(out)
