"""FP8 KV cache (`--kv-cache fp8`, llmq/calib/kv_cache.py): the scales the calibration observes, the rounding a
loaded model applies, the file's layout, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model, tiny_config
from safetensors.torch import load_file
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import llmq
from llmq import QuantizeConfig, quantize
from llmq.calib.kv_cache import add_kv_scales, observing_kv, quantizing_kv
from llmq.calib.models import causal_lm_class
from llmq.core.errors import LlmqError
from llmq.core.scheme import FP8_MAX

_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, vocab_size=49152)


def _spy(monkeypatch) -> list:
    """What the attention function under ours receives: (module, key, value) per call."""
    seen, sdpa = [], ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, *args, **kwargs):
        seen.append((module, key.clone(), value.clone()))
        return sdpa(module, query, key, value, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", spy)
    return seen


def test_scales_are_the_largest_key_and_value_over_448_and_loaded_models_round_to_e4m3(monkeypatch):
    """Observing: each layer's k_scale / v_scale is max|k| / 448 and max|v| / 448 over every window it saw, k and v
    as the attention receives them (after the rotary embedding: its keys, not k_proj's outputs). Quantizing: the
    attention then receives e4m3(k / s) * s, bit for bit, and nothing else changes."""
    torch.manual_seed(0)
    config = tiny_config("llama", **_SIZES)
    config._attn_implementation = "sdpa"
    model = causal_lm_class(config).from_config(config, dtype=torch.float32).eval()
    modules = add_kv_scales(model, model.model.layers)
    seen = _spy(monkeypatch)
    batches = [torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad(), observing_kv(model):
        for ids in batches:
            model(ids)
    for index, module in modules.items():
        mine = [(k, v) for m, k, v in seen if m is module]
        assert len(mine) == 3
        assert float(module.k_scale) == pytest.approx(max(float(k.abs().max()) for k, _ in mine) / FP8_MAX, rel=1e-6)
        assert float(module.v_scale) == pytest.approx(max(float(v.abs().max()) for _, v in mine) / FP8_MAX, rel=1e-6)
        assert float(module.k_scale) > 0 and float(module.v_scale) > 0
    # the keys as the cache holds them: layer 0's are k_proj's outputs rotated by position (the first unrotated)
    layer = model.model.layers[0]
    with torch.no_grad():
        raw = layer.self_attn.k_proj(layer.input_layernorm(model.model.embed_tokens(batches[0])))
    raw = raw.unflatten(-1, (2, 32)).transpose(1, 2)
    key = next(k for m, k, _ in seen if m is modules[0])
    assert torch.allclose(key[:, :, 0], raw[:, :, 0], atol=1e-6) and not torch.allclose(key[:, :, 1:], raw[:, :, 1:])
    seen.clear()
    with torch.no_grad():
        plain = model(batches[0]).logits
    quantizing_kv(modules)
    with torch.no_grad():
        rounded = model(batches[0]).logits
    (_, k0, v0), (_, k1, v1) = seen[0], seen[2]  # layer 0: the same inputs both times
    scale = modules[0].k_scale
    assert torch.equal(k1, (k0 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale)
    assert torch.equal(v1, (v0 / modules[0].v_scale).to(torch.float8_e4m3fn).float() * modules[0].v_scale)
    error = ((rounded - plain).norm() / plain.norm()).item()
    assert 0 < error < 0.1


def test_kv_cache_file_holds_one_scale_per_layer_and_llmq_load_applies_it(tmp_path, smollm2_tokenizer_dir):
    source = save_tiny_model(tmp_path / "source", smollm2_tokenizer_dir, **_SIZES)
    options = dict(method="rtn", scheme="W4A16", device="cpu", samples=8, seqlen=64)
    quantize(str(source), tmp_path / "kv", QuantizeConfig.of(kv_cache="fp8", **options))
    quantize(str(source), tmp_path / "plain", QuantizeConfig.of(**options))
    config = json.loads((tmp_path / "kv" / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"] == {
        "num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False, "group_size": None,
        "actorder": None, "observer": "minmax"}
    assert "attn_implementation" not in json.dumps(config)
    tensors, plain = load_file(tmp_path / "kv" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    scales = sorted(name for name in tensors if name.endswith(("k_scale", "v_scale")))
    assert scales == [f"model.layers.{i}.self_attn.{k}_scale" for i in (0, 1) for k in "kv"]
    assert all(tensors[name].dtype == torch.float32 and float(tensors[name]) > 0 for name in scales)
    assert all(torch.equal(tensors[name], plain[name]) for name in plain)  # the weights are the same
    assert "FP8 KV cache" in (tmp_path / "kv" / "README.md").read_text()
    from llmq.inspect import inspect

    assert "  KV cache: 8-bit float, one static scale per tensor (4 k/v scales)" in inspect(tmp_path / "kv").lines()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_kv = llmq.load(tmp_path / "kv")(ids).logits
        without = llmq.load(tmp_path / "plain")(ids).logits
    error = ((with_kv - without).norm() / without.norm()).item()
    assert 0 < error < 0.1
    # a damaged scale is one line
    from safetensors.torch import save_file

    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor([float("nan")])
    save_file(tensors, tmp_path / "kv" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlmqError, match="layer 1's KV-cache scales are missing or not positive"):
        llmq.load(tmp_path / "kv")
    tensors["model.layers.1.self_attn.v_scale"] = torch.ones(2)
    save_file(tensors, tmp_path / "kv" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlmqError, match=r"v_scale is torch.float32 \(2,\), not one float"):
        llmq.load(tmp_path / "kv")


def test_kv_cache_refusals_are_one_line(tmp_path, smollm2_tokenizer_dir):
    source = save_tiny_model(tmp_path / "source", smollm2_tokenizer_dir, **_SIZES)
    with pytest.raises(LlmqError, match="llama.cpp quantizes its cache at run time"):
        quantize(str(source), tmp_path / "out.gguf", QuantizeConfig.of(kv_cache="fp8", format="gguf", device="cpu"))
    with pytest.raises(LlmqError, match="a run without the model rounds each weight alone"):
        quantize(str(source), tmp_path / "free", QuantizeConfig.of(kv_cache="fp8", model_free=True))
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "free").exists()
