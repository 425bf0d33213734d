"""FP8 KV cache (`--kv-cache fp8`): one scale per layer for the keys and one for the values, in the layout vLLM reads
(compressed-tensors' `kv_cache_scheme`: 8-bit float, strategy tensor, static; tensors `self_attn.k_scale` and
`self_attn.v_scale`):

    k_scale = max|k| / 448        over the calibration windows, k being the keys as the cache holds them (after the
    v_scale = max|v| / 448        rotary embedding and any k-norm), on the outputs of the layers already quantized
    k_cached = e4m3(k / k_scale) * k_scale

Calibration and emulation go through one transformers attention function (`KV_ATTENTION`) that wraps the model's
own (sdpa): it keeps the largest |k| and |v| while a layer runs the calibration windows ("observe"), and rounds k
and v to E4M3 under the layer's scales when a loaded model runs ("quantize"); otherwise it is the model's own.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llmq.core.errors import LlmqError
from llmq.core.scheme import FP8_MAX

KV_ATTENTION = "llmq_fp8_kv"
SCALE_NAMES = ("k_scale", "v_scale")
# compressed-tensors' QuantizationArgs of an FP8 KV cache, as llm-compressor writes it
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
                   "group_size": None, "actorder": None, "observer": "minmax"}


def _rounded(states: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.to(states.device, torch.float32)
    codes = (states.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (codes.float() * scale).to(states.dtype)


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    mode = getattr(module, "llmq_kv", "off")
    if mode == "observe":
        for name, states in (("k_scale", key), ("v_scale", value)):
            scale = getattr(module, name)
            scale.copy_(torch.maximum(scale, states.detach().abs().amax().float().reshape(1).to(scale.device) / FP8_MAX))
    elif mode == "quantize":
        key, value = _rounded(key, module.k_scale), _rounded(value, module.v_scale)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(KV_ATTENTION, _attention)


def attention_modules(layers: nn.ModuleList) -> dict[int, nn.Module]:
    """Each decoder layer's attention module (the one holding k_proj and v_proj), by layer index."""
    found = {}
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "k_proj", None), nn.Module) and isinstance(getattr(module, "v_proj", None),
                                                                                     nn.Module):
                found[index] = module
                break
    return found


def add_kv_scales(model: nn.Module, layers: nn.ModuleList) -> dict[int, nn.Module]:
    """Give every layer's attention a k_scale and a v_scale (float32 [1], zero until observed) and route the model's
    attention through KV_ATTENTION; a model whose attention this cannot wrap is one line."""
    implementation = getattr(model.config, "_attn_implementation", None)
    modules = attention_modules(layers)
    if implementation not in ("sdpa", KV_ATTENTION) or len(modules) != len(layers):
        raise LlmqError(f"--kv-cache fp8 wraps the model's sdpa attention in every layer; this model runs "
                        f"{implementation} attention with k_proj/v_proj in {len(modules)} of {len(layers)} layers "
                        "(MLA and other layouts are not covered); drop --kv-cache")
    for module in modules.values():
        for name in SCALE_NAMES:
            if not isinstance(getattr(module, name, None), torch.Tensor):
                module.register_buffer(name, torch.zeros(1))
        module.llmq_kv = "off"
    model.set_attn_implementation(KV_ATTENTION)
    return modules


@contextlib.contextmanager
def observing_kv(layer: nn.Module):
    """While inside, the layer's attention keeps the largest |k| and |v| it sees in its scales (if it has them)."""
    modules = [module for module in layer.modules() if hasattr(module, "llmq_kv")]
    for module in modules:
        module.llmq_kv = "observe"
    try:
        yield
    finally:
        for module in modules:
            module.llmq_kv = "off"


def quantizing_kv(modules: dict[int, nn.Module]) -> None:
    """From now on these attention modules round their keys and values to FP8 under their scales."""
    for index, module in modules.items():
        scales = [getattr(module, name) for name in SCALE_NAMES]
        if not all(bool(torch.isfinite(s).all() and (s > 0).all()) for s in scales):
            raise LlmqError(f"layer {index}'s KV-cache scales are missing or not positive; the checkpoint is damaged: "
                            "re-create it")
        module.llmq_kv = "quantize"
