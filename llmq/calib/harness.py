"""The layer-by-layer calibration harness shared by every method.

1. Run the embeddings on every calibration sample and catch what enters the first decoder layer: the hidden
   states and the layer's keyword arguments (masks, rotary embeddings), with the KV cache off.
2. For each decoder layer: bring only that layer to the compute device and let the method prepare it (AWQ
   searches and folds its scales here, on the unquantized layer). Then for each group of Linears sharing an
   input (in execution order), re-run the layer on all samples up to that group, collect the method's
   statistics on its input, quantize the group, and write the dequantized weights back, so the next group
   is calibrated on what the *quantized* earlier groups produce ("true sequential"). Then run the whole
   quantized layer to make the next layer's inputs, and send the layer back to the CPU.

Peak device memory is one layer, its statistics, and the calibration activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmq import log
from llmq.calib.arch import LayerMap, decoder_layers
from llmq.calib.capture import LayerInput, StopForward, first_tensor, layer_output, run_until
from llmq.errors import LlmqError
from llmq.methods.base import Method


def _move_non_layer_modules(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Move the embeddings, rotary embedding and final norm (everything beside the decoder layers) to device."""
    parent = next(m for m in model.modules() if any(child is layers for child in m.children()))
    for child in parent.children():
        if child is not layers:
            child.to(device)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layer_map: LayerMap, samples: torch.Tensor, device: torch.device, batch_size: int
) -> list[LayerInput]:
    """What enters the first decoder layer, per batch of calibration samples (token ids [n, seqlen])."""
    layers = decoder_layers(model, layer_map)
    captured: list[LayerInput] = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(LayerInput(hidden, dict(kwargs)))
        raise StopForward

    _move_non_layer_modules(model, layers, device)
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in samples.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        _move_non_layer_modules(model, layers, "cpu")
    return captured


@dataclass
class LayerReport:
    index: int
    relative_weight_error: float  # ||W - Q||^2 / ||W||^2 over the layer's quantized Linears


def _quantize_group(layer: nn.Module, prefix: str, group: tuple[str, ...], method: Method, inputs,
                    device) -> tuple[dict, float, float]:
    """Quantize one group of Linears sharing an input; returns ({name: quantized weight}, error sums)."""
    linears = [layer.get_submodule(name) for name in group]
    method.begin_group([f"{prefix}.{name}" for name in group], [linear.out_features for linear in linears])
    stats = method.new_collector(linears[0].in_features, device) if method.needs_calibration else None
    if stats is not None:
        run_until(layer, linears[0], inputs, lambda args, kwargs: stats.add(first_tensor(args, kwargs)))
    weight = torch.cat([linear.weight for linear in linears]).float()
    quantized = method.quantize(weight, stats, linears[0].weight.dtype)
    dequantized = quantized.dequantize()
    err_num = (dequantized - weight).pow(2).sum().item()
    err_den = weight.pow(2).sum().item()
    parts, row = {}, 0
    for name, linear in zip(group, linears):
        rows = slice(row, row + linear.out_features)
        row += linear.out_features
        linear.weight.data.copy_(dequantized[rows].to(linear.weight.dtype))
        parts[name] = quantized.rows(rows)
    return parts, err_num, err_den


@torch.no_grad()
def quantize_layers(
    model: nn.Module,
    layer_map: LayerMap,
    method: Method,
    inputs: list[LayerInput] | None,
    device: torch.device,
    on_layer: Callable[[LayerReport], None] | None = None,
) -> dict:
    """Quantize every mapped Linear in place (weights replaced by their dequantized values).

    Returns full module name -> the method's quantized weight (on CPU). `inputs` is needed when the method calibrates.
    """
    if method.needs_calibration and inputs is None:
        raise ValueError(f"method {method.name} needs calibration inputs")
    layers = decoder_layers(model, layer_map)
    results: dict = {}
    for index in log.progress(range(len(layers)), desc=f"{method.name} layers", unit="layer"):
        layer = layers[index].to(device)
        if inputs is not None:
            method.prepare_layer(layer, layer_map, inputs)
        err_num = err_den = 0.0
        for group in layer_map.groups:
            prefix = f"{layer_map.layers}.{index}"
            parts, num, den = _quantize_group(layer, prefix, group.linears, method, inputs, device)
            results.update({f"{prefix}.{name}": part for name, part in parts.items()})
            err_num, err_den = err_num + num, err_den + den
        if inputs is not None and index < len(layers) - 1:
            for item in inputs:
                item.hidden = layer_output(layer(item.hidden, **item.kwargs))
        layer.to("cpu")
        if on_layer is not None:
            on_layer(LayerReport(index, err_num / max(err_den, 1e-30)))
    return results


def check_weights_finite(linears: dict[str, nn.Linear]) -> None:
    for name, linear in linears.items():
        if not torch.isfinite(linear.weight).all():
            raise LlmqError(f"weight {name} contains NaN or Inf; the checkpoint is damaged: re-download or re-export it")
