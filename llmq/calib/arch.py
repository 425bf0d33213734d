"""Which models llmq can walk, and the layout of the one loaded: found by discovery, not listed per model.

`decoder_layout` makes fused MoE experts per-expert Linears (llmq/calib/experts.py), finds the decoder layers
and runs each on a few probe tokens to group its Linears (llmq/calib/discover.py). OVERRIDES holds the rare
architecture discovery cannot see right: a function from the discovered layout to the corrected one, keyed by
`model_type`; it is empty because every architecture tested so far is found as it is (README, "Architectures").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmq.calib.discover import discover, find_decoder_layers, layers_to_probe
from llmq.calib.experts import experts_modules, unfuse_experts
from llmq.calib.harness import probe_layer_inputs
from llmq.core import log
from llmq.core.errors import LlmqError
from llmq.core.layers import DecoderLayout

OVERRIDES: dict[str, Callable[[DecoderLayout], DecoderLayout]] = {}
PROBE_TOKENS = 16


def check_config(config) -> None:
    """Refuse, before any weight is read, what no discovery can make a decoder of."""
    if getattr(config, "is_encoder_decoder", False):
        raise LlmqError(f"{config.model_type} is an encoder-decoder model; llmq quantizes decoder-only language models "
                        "(and the language tower of image-text models)")


def decoder_layout(model: nn.Module, device: torch.device, folds: bool) -> DecoderLayout:
    """The loaded model's decoder layers and each layer's groups (with exact folds when `folds`, for AWQ)."""
    unfuse_experts(model)  # a lazy model's skeleton was unfused when it was built
    experts = sum(module.llmq_num_experts for module in experts_modules(model))
    if experts:
        log.info(f"llmq: {experts} experts made per-expert Linears (each calibrated on the tokens routed to it)")
    _, layers = find_decoder_layers(model)
    vocab = model.get_input_embeddings().num_embeddings
    tokens = (torch.arange(PROBE_TOKENS) * 7919 + 100).remainder(vocab).unsqueeze(0)
    layout = discover(model, probe_layer_inputs(model, layers, tokens, device, layers_to_probe(layers)), folds)
    override = OVERRIDES.get(model.config.model_type)
    if override is not None:
        layout = override(layout)
    for note in layout.notes:
        log.info(f"llmq: {note}")
    return layout


def quantizable_linears(model: nn.Module, layout: DecoderLayout) -> dict[str, nn.Linear]:
    """Full module name -> Linear, for every Linear the methods quantize (never embeddings, routers or lm_head)."""
    found = {}
    layers = model.get_submodule(layout.layers)
    for index, (layer, layer_map) in enumerate(zip(layers, layout.maps)):
        for name in layer_map.linears:
            found[f"{layout.layers}.{index}.{name}"] = layer.get_submodule(name)
    return found
