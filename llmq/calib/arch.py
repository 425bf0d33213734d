"""Per-architecture layer maps: where the decoder layers are, and which Linears share an input.

The map's types (LayerMap, LinearGroup) are described in llmq/core/layers.py. Adding an architecture is one
entry here.
"""

from __future__ import annotations

from torch import nn

from llmq.core.errors import LlmqError
from llmq.core.layers import LayerMap, LinearGroup


def _llama_like(mlp_norm: str = "post_attention_layernorm", norm_offset: float = 0.0) -> LayerMap:
    return LayerMap(
        layers="model.layers",
        groups=(
            LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", "input_layernorm"),
            LinearGroup(("self_attn.o_proj",), "self_attn.o_proj", "self_attn.v_proj"),
            LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "mlp", mlp_norm),
            LinearGroup(("mlp.down_proj",), "mlp.down_proj", "mlp.up_proj"),
        ),
        norm_offset=norm_offset,
    )


_PHI3 = LayerMap(
    layers="model.layers",
    groups=(
        LinearGroup(("self_attn.qkv_proj",), "self_attn", "input_layernorm"),
        LinearGroup(("self_attn.o_proj",), "self_attn.o_proj", None),  # v is fused into qkv_proj
        LinearGroup(("mlp.gate_up_proj",), "mlp", "post_attention_layernorm"),
        LinearGroup(("mlp.down_proj",), "mlp.down_proj", "mlp.gate_up_proj", prev_rows="second_half"),
    ),
)

LAYER_MAPS: dict[str, LayerMap] = {
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "gemma2": _llama_like("pre_feedforward_layernorm", norm_offset=1.0),
    "gemma3_text": _llama_like("pre_feedforward_layernorm", norm_offset=1.0),
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
            for name in group.linears:
                found[f"{layer_map.layers}.{index}.{name}"] = layer.get_submodule(name)
    return found
