"""The layer-by-layer calibration harness shared by every method and every target.

1. Run the embeddings on every calibration sample and catch what enters the first decoder layer: the hidden
   states and the layer's keyword arguments (masks, rotary embeddings), with the KV cache off.
2. For each decoder layer: bring only that layer to the compute device and let the method prepare it (AWQ
   searches and folds its scales here, on the unquantized layer). Then for each group of Linears sharing an
   input (in execution order), re-run the layer on all samples up to that group, collect the statistic the
   method needs on its input, quantize the group part by part on the grids the target planned, and write the
   dequantized weights back, so the next group is calibrated on what the *quantized* earlier groups produce
   ("true sequential"). Then run the whole quantized layer to make the next layer's inputs, and send the
   layer back to the CPU.

The harness knows methods only through llmq/core/interfaces.py (Method, Grid) and targets only through the
plan they hand it: for a group's Linears, the parts to quantize together and the grid of each part.
Peak device memory is one layer, its statistics, and the calibration activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmq.calib.arch import decoder_layers
from llmq.calib.capture import LayerInput, StopForward, first_tensor, layer_output, run_until
from llmq.calib.statistics import new_collector
from llmq.core import log
from llmq.core.interfaces import Grid, Method, Quantized
from llmq.core.layers import LayerMap
from llmq.core.scheme import QuantScheme


@dataclass(frozen=True)
class Part:
    """Linears of one group that are rounded as one matrix (stacked along rows), onto one grid."""

    linears: tuple[str, ...]  # full module names, in the group's order
    grid: Grid


# The target's plan: a group's Linears (full names, in order) -> its parts, covering them in the same order.
Plan = Callable[[list[str]], list[Part]]


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
        for batch in log.progress(samples.split(batch_size), desc="embed calibration samples", unit="batch"):
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


def _statistic(method: Method, parts: list[Part], calibrated: bool) -> str | None:
    """What to collect on a group's input: the method's own need, else an importance where a grid weighs by it."""
    if not any(part.grid.rounds for part in parts):
        return None
    if method.statistic is not None:
        return method.statistic
    return "importance" if calibrated and any(part.grid.weighted for part in parts) else None


def _quantize_group(layer: nn.Module, prefix: str, group: tuple[str, ...], method: Method, plan: Plan, inputs,
                    device) -> tuple[dict[str, Quantized], float, float]:
    """Quantize one group of Linears sharing an input; returns ({full name: quantized weight}, error sums)."""
    linears = dict(zip((f"{prefix}.{name}" for name in group), (layer.get_submodule(name) for name in group)))
    parts = plan(list(linears))
    statistic = _statistic(method, parts, inputs is not None)
    stats = new_collector(statistic, next(iter(linears.values())).in_features, device, method.options.sink_weight)
    if stats is not None:
        run_until(layer, next(iter(linears.values())), inputs,
                  lambda args, kwargs: stats.add(first_tensor(args, kwargs)))
    weight = torch.cat([linear.weight for linear in linears.values()]).float()
    results, err_num, err_den, row = {}, 0.0, 0.0, 0
    for part in parts:
        rows = sum(linears[name].out_features for name in part.linears)
        w = weight[row : row + rows]
        row += rows
        quantized = method.quantize(w, stats, part.grid) if part.grid.rounds else part.grid.keep(w)
        dequantized = quantized.dequantize().to(w.device)  # block and ternary results decode on the CPU
        err_num += (dequantized - w).pow(2).sum().item()
        err_den += w.pow(2).sum().item()
        start = 0
        for name in part.linears:
            linear = linears[name]
            rows_of = slice(start, start + linear.out_features)
            start += linear.out_features
            linear.weight.data.copy_(dequantized[rows_of].to(linear.weight.dtype))
            results[name] = quantized.rows(rows_of)
    return results, err_num, err_den


@torch.no_grad()
def quantize_layers(
    model: nn.Module,
    layer_map: LayerMap,
    method: Method,
    plan: Plan,
    inputs: list[LayerInput] | None,
    device: torch.device,
    search_scheme: QuantScheme | None = None,
    on_layer: Callable[[LayerReport], None] | None = None,
) -> dict[str, Quantized]:
    """Quantize every mapped Linear in place (weights replaced by their dequantized values).

    Returns full module name -> the quantized weight (on CPU). `inputs` is needed when the method calibrates.
    """
    if method.needs_data and inputs is None:
        raise ValueError(f"method {method.name} needs calibration inputs")
    layers = decoder_layers(model, layer_map)
    results: dict[str, Quantized] = {}
    for index in log.progress(range(len(layers)), desc=f"{method.name} layers", unit="layer"):
        layer = layers[index].to(device)
        if inputs is not None:
            method.prepare_layer(layer, layer_map, inputs, search_scheme)
        err_num = err_den = 0.0
        prefix = f"{layer_map.layers}.{index}"
        for group in layer_map.groups:
            parts, num, den = _quantize_group(layer, prefix, group.linears, method, plan, inputs, device)
            results.update(parts)
            err_num, err_den = err_num + num, err_den + den
        if inputs is not None and index < len(layers) - 1:
            for item in inputs:
                item.hidden = layer_output(layer(item.hidden, **item.kwargs))
        layer.to("cpu")
        if on_layer is not None:
            on_layer(LayerReport(index, err_num / max(err_den, 1e-30)))
    return results
