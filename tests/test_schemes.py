"""8-bit schemes with quantized activations (W8A8 int8, FP8): the FP8 grid, per-token input quantization as
compressed-tensors specifies it, checkpoints that transformers loads with llmq.load's logits, bad combinations."""

import json

import pytest
import torch
from conftest import transformers_logits

import llmq
from llmq import QuantizeConfig, quantize
from llmq.calib.statistics import RangeCollector
from llmq.cli import main
from llmq.core.errors import LlmqError
from llmq.core.scheme import PRESETS, QuantScheme, static_input_scale
from llmq.methods.grids.fp8 import Fp8Grid, fp8_round
from llmq.runtime.w8 import W8Linear, quantize_rows


def test_fp8_grid_codes_are_e4m3_values_and_the_error_is_half_a_step():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 0, 64)[:, None]
    fit = Fp8Grid(QuantScheme(**PRESETS["fp8"]), torch.bfloat16).fit(w)
    codes = fit.nearest()
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float())  # representable: the cast is lossless
    assert codes.abs().amax() <= 448 and (codes.abs().amax(1) >= 416).all()  # each row reaches the top binade
    result = fit.result(codes)
    assert result.qweight.dtype == torch.float8_e4m3fn and result.scale.shape == (64, 1)
    assert torch.equal(result.dequantize(), codes * result.scale.float())
    # round to nearest on a 3-bit mantissa: |w/s - code| <= 2^-4 |code| above the subnormals (2^-6)
    position = w / fit.scale
    normal = position.abs() >= 2 ** -6
    assert ((position - codes).abs()[normal] <= 2 ** -4 * position.abs()[normal] + 1e-6).all()


def test_per_token_input_quantization_is_compressed_tensors_own():
    """The run-time input quantization equals compressed-tensors' fake quantization of the same rows, bit for bit."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(1)) * 3
    x[2] = 0  # an all-zero row stays zero
    for kind in ("int", "float"):
        args = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True)
        scale, zero = calculate_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), args)
        theirs = fake_quantize(x, scale, zero, args)
        codes, ours_scale = quantize_rows(x, QuantScheme(**PRESETS["w8a8" if kind == "int" else "fp8_dynamic"]))
        assert torch.equal(torch.nan_to_num(theirs), codes * ours_scale), kind


def test_static_input_quantization_is_compressed_tensors_own():
    """With one static scale per Linear, the input codes equal compressed-tensors' fake quantization, bit for bit."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(3)) * 3
    for preset in ("w8a8", "fp8"):
        scheme = QuantScheme(**{**PRESETS[preset], "act_dynamic": False})
        scale = static_input_scale(x.abs().amax(0), scheme, torch.bfloat16)
        args = QuantizationArgs(num_bits=8, type=scheme.weight_type, symmetric=True, strategy="tensor", dynamic=False)
        theirs = fake_quantize(x, scale.float(), None, args)
        codes, ours_scale = quantize_rows(x, scheme, scale)
        assert torch.equal(theirs, codes * ours_scale), preset


@pytest.mark.parametrize("preset, act_bits", [("w8a8", 8), ("fp8", 8), ("w8a8", 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_static_scales_never_clip_the_calibration_maximum(preset, act_bits, dtype):
    """The scale made from the collected maximum (stored in the model's dtype) codes every calibration input inside
    the range: nothing is clipped, each value within half a step of its code (int), however the cast rounds."""
    g = torch.Generator().manual_seed(4)
    scheme = QuantScheme(**{**PRESETS[preset], "act_bits": act_bits, "act_dynamic": False})
    collector = RangeCollector(64, torch.device("cpu"))
    batches = [torch.randn(2, 16, 64, generator=g) * torch.rand(64, generator=g) * 10 ** k for k in range(-2, 3)]
    for batch in batches:
        collector.add(batch.to(dtype))
    x = torch.cat([b.to(dtype).float().reshape(-1, 64) for b in batches])
    assert torch.equal(collector.absmax, x.abs().amax(0))
    scale = static_input_scale(collector.absmax, scheme, dtype)
    assert scale.dtype == dtype and scale.shape == (1,)
    codes, used = quantize_rows(x, scheme, scale)
    low, high = scheme.act_limits
    unclipped = (x / used).clamp(low, high) == x / used
    assert unclipped.all()
    if scheme.weight_type == "int":
        assert (x - codes * used).abs().max() <= used.item() / 2 * (1 + 1e-5) + 1e-6 * x.abs().max()
        # and the range is used: the maximum lands within one step of the stored scale's dtype of the top code
        assert codes.abs().max() >= high * (1 - 2 * torch.finfo(dtype).eps) - 1


def _input_error(x, scheme, scale):
    codes, used = quantize_rows(x, scheme, scale)
    return (x - codes * used).pow(2).sum().item()


@pytest.mark.parametrize("preset", ["w8a8", "fp8"])
def test_the_least_error_static_scale_clips_a_heavy_tail_and_errs_less(preset):
    """--act-range mse: on heavy-tailed inputs (x = z^3, as an LLM's down_proj input is: a bulk near 0, a long tail)
    the int8 scale clips the tail and the squared error over the very values it was chosen on drops; FP8, whose
    steps grow with the value, keeps nearly the whole range. The chosen scale never errs more than the maximum's,
    and on inputs without a tail (uniform) int8 stays near the maximum."""
    scheme = QuantScheme(**{**PRESETS[preset], "act_dynamic": False, "act_range": "mse"})
    by_max = QuantScheme(**{**PRESETS[preset], "act_dynamic": False})
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        for x, tail in ((torch.randn(4, 256, 64, generator=g) ** 3, True), (torch.rand(4, 256, 64, generator=g) * 2 - 1, False)):
            collector = RangeCollector(64, torch.device("cpu"), histogram=True)
            for batch in x.split(1):
                collector.add(batch)
            assert collector.histogram.counts.sum().item() == x.numel()
            least = static_input_scale(collector.absmax, scheme, torch.float32, collector.histogram)
            largest = static_input_scale(collector.absmax, by_max, torch.float32)
            rows = x.reshape(-1, 64)
            ratio = _input_error(rows, scheme, least) / _input_error(rows, scheme, largest)
            assert ratio <= 1.005, (seed, tail, ratio)  # the bins' centres stand for their values: within 0.5%
            if preset == "w8a8" and tail:
                assert least < 0.95 * largest and ratio < 0.95, (seed, least / largest, ratio)
            if preset == "w8a8" and not tail:
                assert 0.9 * largest <= least <= largest


def test_histogram_bins_are_one_percent_wide():
    from llmq.core.ranges import AbsHistogram

    values = torch.tensor([1e-9, 3e-4, 0.5, 1.0, 7.25, 1e5])
    histogram = AbsHistogram(torch.device("cpu"))
    histogram.add(torch.cat([values, -values]))
    centres = AbsHistogram.centres()[histogram.counts > 0]
    assert histogram.counts[histogram.counts > 0].tolist() == [2.0] * 6
    assert torch.allclose(centres.float(), values, rtol=0.0055)  # half a bin: 2^(1/128) - 1


def test_integer_gemm_equals_the_float_product_of_the_codes():
    g = torch.Generator().manual_seed(2)
    scheme = QuantScheme(**PRESETS["w8a8"])
    weight = torch.randint(-128, 128, (48, 64), generator=g, dtype=torch.int8)
    layer = W8Linear(64, 48, scheme, weight, torch.rand(48, 1, generator=g) * 0.01, torch.randn(48, generator=g))
    x = torch.randn(3, 5, 64, generator=g)
    codes, scale = quantize_rows(x.reshape(-1, 64), scheme)
    expected = (codes.double() @ weight.double().T * scale.double() * layer.weight_scale.double().T + layer.bias.double())
    assert torch.allclose(layer(x).reshape(-1, 48).double(), expected, rtol=1e-6, atol=1e-6)
    layer._int_mm = False  # the float route (a device without the integer GEMM) gives the same numbers
    assert torch.allclose(layer(x).reshape(-1, 48).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset, method, fmt, dtype, dynamic, act_range", [
    ("fp8_dynamic", "gptq", "float-quantized", torch.float8_e4m3fn, True, "max"),
    ("w8a8", "rtn", "int-quantized", torch.int8, True, "max"),
    ("w8a8", "gptq", "int-quantized", torch.int8, False, "max"),
    ("fp8", "rtn", "float-quantized", torch.float8_e4m3fn, False, "max"),
    ("w8a8", "rtn", "int-quantized", torch.int8, False, "mse"),
])
def test_checkpoint_loads_in_transformers_with_llmq_logits(preset, method, fmt, dtype, dynamic, act_range, tmp_path,
                                                           tiny_llama_dir, calib_file):
    out = tmp_path / preset
    quantize(str(tiny_llama_dir), out, QuantizeConfig.of(scheme=preset, method=method, calib=str(calib_file),
                                                         samples=4, seqlen=64, device="cpu", act_dynamic=dynamic,
                                                         act_range=act_range))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt
    group = config["config_groups"]["group_0"]
    assert group["input_activations"] == {**group["input_activations"], "num_bits": 8, "dynamic": dynamic,
                                          "strategy": "token" if dynamic else "tensor", "symmetric": True,
                                          "type": group["weights"]["type"]}
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == dtype
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_scale").get_shape()[1] == 1
        static_scales = [key for key in f.keys() if key.endswith(".input_scale")]
        assert len(static_scales) == (0 if dynamic else 7 * 2)  # every Linear of the tiny model's 2 layers
        if not dynamic:  # q, k and v share one input, so one scale
            q, k, v = (f.get_tensor(f"model.layers.1.self_attn.{p}_proj.input_scale") for p in "qkv")
            assert q.shape == (1,) and q.dtype == torch.bfloat16 and torch.equal(q, k) and torch.equal(q, v)
    ids, theirs = transformers_logits(out, tmp_path)
    model = llmq.load(out, dtype=torch.float32)
    assert isinstance(model.model.layers[1].mlp.up_proj, W8Linear)
    with torch.no_grad():
        ours = model(ids).logits
    # the same maths in float32; an input landing on a rounding tie may flip one code in one of the two
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-3


@pytest.mark.parametrize("dynamic", [True, False])
def test_int16_inputs_load_in_transformers_with_llmq_logits(dynamic, tmp_path, tiny_llama_dir, calib_file):
    """TFLite's 16x8 (int8 weights, int16 inputs), simulated: compressed-tensors holds it as 16-bit int inputs."""
    out = tmp_path / "w8a16-int16"
    quantize(str(tiny_llama_dir), out, QuantizeConfig.of(bits=8, group_size=-1, symmetric=True, act_bits=16,
                                                         act_dynamic=dynamic, method="rtn", calib=str(calib_file),
                                                         samples=4, seqlen=64, device="cpu"))
    inputs = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert inputs["input_activations"]["num_bits"] == 16 and inputs["input_activations"]["type"] == "int"
    ids, theirs = transformers_logits(out, tmp_path)
    model = llmq.load(out, dtype=torch.float32)
    assert model.model.layers[0].mlp.up_proj.scheme.name == f"W8A16-int16 int8{'' if dynamic else ' static'}"
    with torch.no_grad():
        ours = model(ids).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-3


@pytest.mark.parametrize("preset, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_a_16bit_cast_is_a_plain_checkpoint_of_the_rounded_values(preset, dtype, tmp_path, tiny_llama_dir):
    """Every tensor cast (round to nearest even, torch's cast), no quantization_config, no calibration; transformers
    loads it as it is."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / preset
    result = quantize(str(tiny_llama_dir), out, QuantizeConfig.of(scheme=preset, device="cpu"))
    assert result.calibration.startswith("none")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == str(dtype).removeprefix("torch.")
    original, cast = load_file(tiny_llama_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(cast) == set(original)
    for name, tensor in original.items():
        assert cast[name].dtype == dtype and torch.equal(cast[name], tensor.to(dtype)), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == dtype


@pytest.mark.parametrize("argv, expect", [
    (["--scheme", "fp8", "--format", "gguf"], "GGUF holds neither FP8 weights nor quantized activations"),
    (["--scheme", "fp8", "--group-size", "64"], "--scheme fp8 fixes --group-size; drop them"),
    (["--scheme", "fp8", "--method", "awq"], "--method awq searches on an integer or microscaling grid"),
    (["--act-bits", "8"], "quantized activations need 8-bit symmetric per-channel weights"),
    (["--scheme", "w8a8", "--bits", "3"], "--scheme w8a8 fixes --bits; drop them"),
    (["--act-static"], "--act-static fixes the scale of quantized inputs; it needs --scheme w8a8 or fp8"),
    (["--scheme", "w8a8", "--act-range", "mse"], "--act-range mse chooses a static input scale; add --act-static"),
    (["--scheme", "fp16", "--method", "gptq"], "--scheme fp16 casts the model and rounds nothing; drop --method gptq"),
    (["--scheme", "bf16", "--dtype", "float16"], "--scheme bf16 casts the model to bfloat16; drop --dtype float16"),
    (["--scheme", "fp16", "--format", "gguf"], "GGUF's 16-bit files are --type F16; drop --scheme"),
    (["--scheme", "fp16", "--act-bits", "8"], "a 16-bit cast quantizes no inputs; drop --act-bits"),
    (["--scheme", "fp8", "--act-bits", "16"], "--scheme fp8 fixes --act-bits; drop them"),
    (["--bits", "8", "--group-size", "-1", "--sym", "--scheme", "fp8", "--act-static", "--format", "gguf"],
     "--scheme fp8 fixes --bits, --group-size, --sym/--asym, --act-static/--act-dynamic; drop them"),
    # a flag the preset fixes is refused even when its value is the preset's or the default (issue 36)
    (["--scheme", "w8a8", "--bits", "8"], "--scheme w8a8 fixes --bits; drop them"),
    (["--scheme", "w8a8", "--bits", "4"], "--scheme w8a8 fixes --bits; drop them"),
    (["--scheme", "nf4", "--asym"], "--scheme nf4 fixes --sym/--asym; drop them"),
    (["--scheme", "W4A16", "--group-size=128"], "--scheme w4a16 fixes --group-size; drop them"),
])
def test_bad_combinations_are_one_line(argv, expect, capsys, tmp_path, tiny_llama_dir):
    code = main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "o"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and expect in lines[-1], lines
    assert not (tmp_path / "o").exists()


def test_a_preset_through_the_python_api():
    assert QuantizeConfig.of(scheme="w8a8").scheme == QuantScheme(8, -1, True, "int", 8)
    with pytest.raises(LlmqError, match="unknown"):
        QuantizeConfig.of(scheme="nf3")
    assert fp8_round(torch.tensor([1000.0, -0.3])).tolist() == [448.0, -0.3125]


def test_export_to_gguf_refuses_an_8bit_activation_checkpoint_before_reading_it(tmp_path, capsys):
    (tmp_path / "w8").mkdir()
    (tmp_path / "w8" / "config.json").write_text(json.dumps({"quantization_config": {"format": "int-quantized"}}))
    code = main(["export-gguf", str(tmp_path / "w8"), "--out", str(tmp_path / "w8.gguf")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "int-quantized" in line and "--type Q8_0" in line
