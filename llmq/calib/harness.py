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

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from llmq.calib.capture import LayerInput, StopForward, first_tensor, layer_output, run_until
from llmq.calib.experts import set_route_all
from llmq.calib.kv_cache import SCALE_NAMES, observing_kv
from llmq.calib.lazy import lazy_weights
from llmq.calib.resume import LayerCheckpoints
from llmq.calib.statistics import new_collector
from llmq.core import log
from llmq.core.device import return_freed_memory
from llmq.core.interfaces import Grid, Method, Quantized
from llmq.core.layers import DecoderLayout, LinearGroup
from llmq.core.ranks import deal_by_cost, max_across, min_across, share, world
from llmq.core.scheme import QuantScheme
from llmq.core.timing import stage_clock


@dataclass(frozen=True)
class Part:
    """Linears of one group that are rounded as one matrix (stacked along rows), onto one grid."""

    linears: tuple[str, ...]  # full module names, in the group's order
    grid: Grid


# The target's plan: a group's Linears (full names, in order) -> its parts, covering them in the same order.
Plan = Callable[[list[str]], list[Part]]


def _move_non_layer_modules(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Move the embeddings, rotary embedding and final norm (the decoder layers' siblings) to device; a vision
    tower or lm_head elsewhere is not needed to make the first layer's input from text."""
    parent = next(m for m in model.modules() if any(child is layers for child in m.children()))
    for child in parent.children():
        if child is not layers:
            child.to(device)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor, device: torch.device,
                         batch_size: int, progress: bool = True) -> list[LayerInput]:
    """What enters the first decoder layer, per batch of calibration samples (token ids [n, seqlen]), and the
    keyword arguments (masks, rotary embeddings) every layer gets: they differ where sliding-window and global
    layers alternate (Gemma 2/3, Llama 4).

    The model runs with each decoder layer's forward replaced by a recorder that hands its input on unchanged,
    so a batch costs the embeddings and the mask/rotary set-up only; the last recorder stops the pass.
    """
    captured: list[LayerInput] = []
    returns_tuple = []  # what a real decoder layer returns (learnt from layer 0 on the first batch)

    def recorder(index):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs = dict(kwargs)
            if index == 0:
                captured.append(LayerInput(hidden, kwargs, [kwargs]))
                if not returns_tuple:
                    returns_tuple.append(isinstance(type(layers[0]).forward(layers[0], hidden, **kwargs), tuple))
            else:
                captured[-1].layer_kwargs.append(kwargs)
            if index == len(layers) - 1:
                raise StopForward
            return (hidden,) if returns_tuple[0] else hidden
        return forward

    weights = lazy_weights(model)
    _move_non_layer_modules(model, layers, device)
    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    if weights is not None:
        weights.load_layer(0)
    layers[0].to(device)  # runs once, to learn what a layer returns
    batches = samples.split(batch_size)
    try:
        for batch in log.progress(batches, desc="embed calibration samples", unit="batch") if progress else batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for layer in layers:
            del layer.forward
        layers[0].to("cpu")
        if weights is not None:
            weights.release_layer(0)
        _move_non_layer_modules(model, layers, "cpu")
    return captured


@torch.no_grad()
def probe_layer_inputs(model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor, device,
                       count: int) -> Iterator[LayerInput]:
    """The inputs of the first `count` decoder layers for a few probe tokens [1, n] (what discovery runs the
    layers on). Each is yielded while its layer is in memory (a lazy model reads it for the time being)."""
    first = capture_layer_inputs(model, layers, tokens, device, tokens.shape[0], progress=False)[0]
    hidden, weights = first.hidden, lazy_weights(model)
    for index in range(count):
        layer, kwargs = layers[index], first.layer_kwargs[index]
        with weights.layer(index) if weights is not None else contextlib.nullcontext():
            yield LayerInput(hidden, kwargs)
            if index < count - 1:
                layer.to(device)
                hidden = layer_output(layer(hidden, **kwargs))
                layer.to("cpu")


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
    if calibrated and any(part.grid.weighted for part in parts):
        return "importance"
    return "range" if any(part.grid.static_inputs for part in parts) else None  # every collector keeps the range


@dataclass
class ExpertPolicy:
    """How routed experts are calibrated: `route_all` collects every expert's statistics from every calibration
    token (the output still follows the real routing); otherwise an expert that was routed fewer than
    `min_tokens` tokens is re-collected that way. `fell_back` counts those, for the summary."""

    route_all: bool = False
    min_tokens: int = 64
    fell_back: int = 0
    experts: int = 0


def _collect(layer: nn.Module, first: nn.Module, inputs, stats, route_all: bool) -> None:
    set_route_all(layer, route_all)
    try:
        with stage_clock("statistics"):
            run_until(layer, first, inputs, lambda args, kwargs: stats.add(first_tensor(args, kwargs)))
            stats.sum_across_ranks()
    finally:
        set_route_all(layer, False)


def _solve_cost(rows: int, cols: int) -> float:
    """Relative cost of one solve on a [rows, cols] weight: a factorization (cols^3 / 3) and a sweep (rows cols^2)."""
    return (rows + cols / 3) * cols * cols


def _solve_parts(method: Method, parts: list[Part], weights: list[torch.Tensor], stats) -> list[Quantized]:
    """Every part's quantized weight. With several ranks (llmq/core/ranks.py) each rank solves the parts dealt to it
    by cost, all of them before sending any, so that no rank waits on a result while it has work of its own."""
    owners = deal_by_cost([_solve_cost(*w.shape) for w in weights])
    rank = world()[0]
    mine = {}
    for index, (part, w) in enumerate(zip(parts, weights)):
        if owners[index] == rank:
            with stage_clock("rounding"):
                quantized = method.quantize(w, stats, part.grid) if part.grid.rounds else part.grid.keep(w)
            mine[index] = quantized if world()[1] == 1 else quantized.rows(slice(None))  # sent from the CPU
    if world()[1] == 1:
        return [mine[index] for index in range(len(parts))]
    with stage_clock("share results"):
        return [share(mine.get(index), owner) for index, owner in enumerate(owners)]


def _quantize_group(layer: nn.Module, prefix: str, group: LinearGroup, method: Method, plan: Plan, inputs,
                    device, experts: ExpertPolicy,
                    statistics: dict | None = None) -> tuple[dict[str, Quantized], float, float]:
    """Quantize one group of Linears sharing an input; returns ({full name: quantized weight}, error sums). With
    `statistics`, each Linear's input importance (mean x² per channel) and token count go into it."""
    names = group.linears
    linears = dict(zip((f"{prefix}.{name}" for name in names), (layer.get_submodule(name) for name in names)))
    first = next(iter(linears.values()))
    parts = plan(list(linears))
    statistic = _statistic(method, parts, inputs is not None)
    histogram = any(part.grid.input_histogram for part in parts)
    stats = new_collector(statistic, first.in_features, device, method.options.sink_weight, histogram)
    if stats is not None:
        route_all = group.expert and experts.route_all
        _collect(layer, first, inputs, stats, route_all)
        if group.expert and not route_all:
            experts.experts += 1
            if stats.tokens < experts.min_tokens:  # too few routed tokens to calibrate on: use every token
                experts.fell_back += 1
                stats = new_collector(statistic, first.in_features, device, method.options.sink_weight, histogram)
                _collect(layer, first, inputs, stats, True)
    importance = None if statistics is None or stats is None else stats.importance()
    if importance is not None:
        statistics.update({name: (importance.float().cpu(), float(stats.tokens)) for name in linears})
    weight = torch.cat([linear.weight for linear in linears.values()]).float()
    part_rows = [sum(linears[name].out_features for name in part.linears) for part in parts]
    weights = list(weight.split(part_rows))  # views: each part's rows
    solved = _solve_parts(method, parts, weights, stats)
    if any(part.grid.static_inputs for part in parts):  # one input scale for the group: its Linears share the input
        solved = [part.grid.with_input_range(quantized, stats.absmax, stats.histogram) if part.grid.static_inputs else quantized
                  for part, quantized in zip(parts, solved)]
    del stats  # the group's Hessian and its factor (822 MB each for Llama-3-8B's down_proj): not needed to decode
    results, err_num, err_den = {}, 0.0, 0.0
    for part, w, quantized in zip(parts, weights, solved):
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
    layout: DecoderLayout,
    method: Method,
    plan: Plan,
    inputs: list[LayerInput] | None,
    device: torch.device,
    search_scheme: QuantScheme | None = None,
    on_layer: Callable[[LayerReport], None] | None = None,
    experts: ExpertPolicy | None = None,
    checkpoints: LayerCheckpoints | None = None,
    statistics: dict[str, tuple[torch.Tensor, float]] | None = None,
) -> dict[str, Quantized]:
    """Quantize every discovered Linear in place (weights replaced by their dequantized values).

    Returns full module name -> the quantized weight (on CPU). `inputs` is needed when the method calibrates.
    With `checkpoints`, layers an interrupted run finished are restored instead of quantized again, and each
    layer is checkpointed when done (llmq/calib/resume.py). A lazy model (llmq/calib/lazy.py) reads each layer
    when it is reached and lets go of its quantized weights once checkpointed: the results are then read back
    from the checkpoints, a layer at a time, when the target writes them. With `statistics` (a dict), every
    calibrated Linear's input importance and token count go into it (checkpointed too: --save-imatrix).
    """
    if method.needs_data and inputs is None:
        raise ValueError(f"method {method.name} needs calibration inputs")
    weights = lazy_weights(model)
    if weights is not None and checkpoints is None:
        raise ValueError("a lazy model's results are kept in its layer checkpoints; pass them")
    experts = experts or ExpertPolicy()
    layers = model.get_submodule(layout.layers)
    results: dict[str, Quantized] = {}
    with stage_clock("checkpoints"):
        start = _restore_finished_layers(layers, layout, plan, inputs, checkpoints, results, experts, on_layer,
                                         keep_results=weights is None, statistics=statistics)
    for index in log.progress(range(start, len(layers)), desc=f"{method.name} layers", unit="layer",
                              initial=start, total=len(layers)):
        if weights is not None:
            with stage_clock("load"):
                weights.load_layer(index)
        layer, layer_map = layers[index].to(device), layout.maps[index]
        for item in inputs or ():
            item.for_layer(index)
        if inputs is not None:
            with stage_clock("layer transform"):
                method.prepare_layer(layer, layer_map, inputs, search_scheme)
        err_num = err_den = 0.0
        prefix = f"{layout.layers}.{index}"
        layer_results, fell_back, seen = {}, experts.fell_back, experts.experts
        layer_statistics = None if statistics is None else {}
        for group in layer_map.groups:
            parts, num, den = _quantize_group(layer, prefix, group, method, plan, inputs, device, experts,
                                              layer_statistics)
            layer_results.update(parts)
            err_num, err_den = err_num + num, err_den + den
        next_layer = inputs is not None and index < len(layers) - 1
        kv_scales = [m.get_buffer(name) for m in layer.modules() if hasattr(m, "llmq_kv") for name in SCALE_NAMES]
        if next_layer or (kv_scales and inputs is not None):  # the quantized layer's keys and values fix its KV scales
            with stage_clock("next layer's inputs"), observing_kv(layer):
                for item in inputs:
                    output = layer_output(layer(item.hidden, **item.kwargs))
                    if next_layer:
                        item.hidden = output
            max_across(kv_scales)  # every rank saw its share of the windows
        layer.to("cpu")
        report = LayerReport(index, err_num / max(err_den, 1e-30))
        if checkpoints is not None:
            with stage_clock("checkpoints"):
                counts = {"experts": experts.experts - seen, "experts_fell_back": experts.fell_back - fell_back}
                _save_layer(checkpoints, index, layer, prefix, layer_results, report, counts,
                            [item.hidden for item in inputs] if next_layer else None, layer_statistics)
        if statistics is not None:
            statistics.update(layer_statistics)
        if weights is None:
            results.update(layer_results)
        else:  # only the small tensors stay (norms AWQ folded into): the writer reads them from the model
            weights.release_layer(index, keep={name for name in weights.layer_tensors(index)
                                               if name.removesuffix(".weight") not in layer_results})
            layer_results = parts = None  # on disk now: not held while the next layer is read and solved
        return_freed_memory()
        if on_layer is not None:
            on_layer(report)
    return results if weights is None else CheckpointedResults(checkpoints, layout.layers, len(layers))


def _first_foreign_layer(layout: DecoderLayout, plan: Plan, checkpoints: LayerCheckpoints,
                         count: int) -> tuple[int, str | None]:
    """The first of `count` checkpointed layers holding a weight the plan's grid would not make, and why; (count,
    None) when there is none."""
    for index in range(count):
        results = checkpoints.load_layer(index)[1]
        prefix = f"{layout.layers}.{index}"
        for group in layout.maps[index].groups:
            for part in plan([f"{prefix}.{name}" for name in group.linears]):
                for name in part.linears:
                    problem = "missing" if name not in results else part.grid.mismatch(results[name])
                    if problem:
                        return index, f"{name} in layer-{index:05d} is {problem}"
    return count, None


class CheckpointedResults(Mapping):
    """Full Linear name -> its quantized weight, read from the layer checkpoints one layer at a time (the last
    layer read is kept): what a lazy run hands its target, which writes in layer order."""

    def __init__(self, checkpoints: LayerCheckpoints, layers_path: str, layer_count: int):
        self.checkpoints, self.prefix = checkpoints, layers_path + "."
        self.names = [name for index in range(layer_count) for name in checkpoints.quantized_names(index)]
        self._known = set(self.names)
        self._layer, self._results = -1, {}

    def __getitem__(self, name: str) -> Quantized:
        if name not in self._known:
            raise KeyError(name)
        index = int(name.removeprefix(self.prefix).split(".", 1)[0])
        if index != self._layer:
            self._layer, self._results = index, {}  # let go of the previous layer before reading the next
            self._results = self.checkpoints.load_layer(index)[1]
        return self._results[name]

    def __contains__(self, name) -> bool:
        return name in self._known

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _save_layer(checkpoints: LayerCheckpoints, index: int, layer: nn.Module, prefix: str,
                layer_results: dict[str, Quantized], report: LayerReport, counts: dict, next_inputs,
                statistics: dict | None = None) -> None:
    """Checkpoint a finished layer: its quantized weights, every other tensor it holds (norms AWQ folded into),
    its report and the next layer's inputs."""
    quantized_weights = {f"{name.removeprefix(prefix + '.')}.weight" for name in layer_results}
    others = {name: t for name, t in layer.state_dict().items() if name not in quantized_weights}
    checkpoints.save_layer(index, others, layer_results,
                           {"relative_weight_error": report.relative_weight_error, **counts}, next_inputs, statistics)


def _restore_finished_layers(layers: nn.ModuleList, layout: DecoderLayout, plan: Plan, inputs: list[LayerInput] | None,
                             checkpoints: LayerCheckpoints | None, results: dict[str, Quantized],
                             experts: ExpertPolicy, on_layer, keep_results: bool,
                             statistics: dict | None = None) -> int:
    """Put back the layers an interrupted run finished, as it left them; returns the first layer left to do.
    Without `keep_results` (a lazy model) only their small tensors are put back, and their results stay on disk.
    A layer quantized onto another grid than this run's plan (a checkpoint copied from another run) is not
    trusted: the run continues before it."""
    start = min(checkpoints.finished(), len(layers)) if checkpoints is not None else 0
    if not start:
        return 0
    foreign, why = _first_foreign_layer(layout, plan, checkpoints, start)
    agreed = min_across(foreign)  # every rank checks its own copy; all continue at the same layer
    if agreed < start:
        start = checkpoints.restart_at(agreed, why or f"another process's checkpoint of layer {agreed} is not this run's")
        if not start:
            return 0
    log.info(f"llmq: resuming: {start} of {len(layers)} layers were finished by an interrupted run "
             f"({checkpoints.directory.name})")
    for index in range(start):
        others, layer_results, report = checkpoints.load_layer(index)
        layer, prefix = layers[index], f"{layout.layers}.{index}"
        missing = layer.load_state_dict(others, strict=False, assign=not keep_results).missing_keys
        for name, quantized in layer_results.items():
            missing.remove(f"{name.removeprefix(prefix + '.')}.weight")
            if keep_results:
                linear = layer.get_submodule(name.removeprefix(prefix + "."))
                linear.weight.data.copy_(quantized.dequantize().to(linear.weight.dtype))
        if missing:
            raise RuntimeError(f"checkpoint of layer {index} lacks {missing[:3]}; delete {checkpoints.directory}")
        if keep_results:
            results.update(layer_results)
        experts.experts += report["experts"]
        experts.fell_back += report["experts_fell_back"]
        if statistics is not None:
            statistics.update(checkpoints.load_statistics(index))
        if on_layer is not None:
            on_layer(LayerReport(index, report["relative_weight_error"]))
    if inputs is not None and start < len(layers):
        for item, hidden in zip(inputs, checkpoints.load_inputs(start), strict=True):
            item.hidden = hidden.to(item.hidden.device)
    return start
