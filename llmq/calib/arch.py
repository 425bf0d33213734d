"""Per-architecture layer maps: where the decoder layers are, and which Linears share an input.

Groups are listed in execution order inside a layer; the Linears of one group read the same input tensor, so
they share calibration statistics (and, for AWQ, one scale vector). Adding an architecture is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmq.errors import LlmqError


@dataclass(frozen=True)
class LayerMap:
    layers: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    groups: tuple[tuple[str, ...], ...]  # Linears (relative to a layer) sharing an input, in execution order


_LLAMA_LIKE = LayerMap(
    layers="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

_PHI3 = LayerMap(
    layers="model.layers",
    groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
)

LAYER_MAPS: dict[str, LayerMap] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _PHI3,
}


def layer_map_for(model_type: str) -> LayerMap:
    try:
        return LAYER_MAPS[model_type]
    except KeyError:
        supported = ", ".join(sorted(LAYER_MAPS))
        raise LlmqError(
            f"architecture {model_type!r} is not supported (supported: {supported}); add it to llmq/calib/arch.py"
        ) from None


def decoder_layers(model: nn.Module, layer_map: LayerMap) -> nn.ModuleList:
    return model.get_submodule(layer_map.layers)


def quantizable_linears(model: nn.Module, layer_map: LayerMap) -> dict[str, nn.Linear]:
    """Full module name -> Linear, for every Linear the methods quantize (never embeddings or lm_head)."""
    found = {}
    for index, layer in enumerate(decoder_layers(model, layer_map)):
        for group in layer_map.groups:
            for name in group:
                found[f"{layer_map.layers}.{index}.{name}"] = layer.get_submodule(name)
    return found
