"""Architecture discovery: where the decoder layers are and how each layer's Linears group, found by running it.

No per-model table. For each decoder layer (layers differ: DeepSeek-V3's first layers are dense, Llama 4
interleaves MoE), one forward pass on a few probe tokens with hooks on every submodule shows:
- the Linears in call order, and the input tensor each one sees: Linears that see the very same tensor form a
  group (q/k/v; gate/up; in parallel-block models q/k/v and the MLP's first Linears together; one routed
  expert's gate/up);
- the sub-block AWQ compares outputs of: the outermost module holding the group whose own input is that tensor;
- the fold: the module whose output is that tensor (a norm), else an earlier Linear of matching width (v_proj
  before o_proj, up_proj before down_proj, the second half of a fused gate_up). A fold is kept only if it is
  exact, tested on the spot in float32: scale the producer by 1/s and the group by s for a random s and check
  the layer's output is unchanged and the group's input is divided by s. This finds Gemma's x * (1 + w) norms
  (the fold only holds with offset 1), refuses post-norm layers (OLMo 2) and norms that also feed a router.

Layers with the same structure share one discovery. Routers and gates (Linears named `gate`, `router`,
`*_gate`, or with fewer than 8 outputs) are never quantized: they stay in the model's dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from llmq.calib.capture import LayerInput, first_tensor, layer_output
from llmq.calib.experts import experts_modules, set_route_all
from llmq.core.errors import LlmqError
from llmq.core.layers import DecoderLayout, LayerMap, LinearGroup

MIN_COVERAGE = 0.5  # a layer whose quantizable Linears hold less of its matrices than this is refused
FOLD_TOLERANCE = 1e-4  # relative error of the layer output (float32) within which a fold counts as exact
ROUTER_NAMES = ("gate", "router")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The language model's decoder-layer list: inside `get_decoder()` (multimodal models keep their vision tower
    outside it), the ModuleList of blocks transformers never splits (`_no_split_modules`), the largest if several."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    inside = {id(module) for module in decoder.modules()}
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or id(module) not in inside:
            continue
        classes = {type(child).__name__ for child in module}
        if classes & blocks or (not blocks and len(classes) == 1):
            candidates.append((sum(p.numel() for p in module.parameters()), name, module))
    if not candidates:
        raise LlmqError(f"{type(model).__name__}: no list of decoder layers found (no ModuleList of "
                        f"{', '.join(sorted(blocks)) or 'identical blocks'}); this model is not a decoder llmq can walk")
    _, name, layers = max(candidates, key=lambda item: item[0])
    return name, layers


def is_router(name: str, linear: nn.Linear) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in ROUTER_NAMES or last.endswith("_gate") or "router" in last or linear.out_features < 8


def _key(x: torch.Tensor) -> tuple:
    """Identity of a tensor's values: the same storage, shape and strides (references are kept alive meanwhile)."""
    return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype


@dataclass
class _Trace:
    """What one probe pass saw inside a layer."""

    linear_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # first call of each Linear, call order
    module_inputs: dict[str, tuple] = field(default_factory=dict)  # module -> key of its first call's main input
    producers: dict[tuple, str] = field(default_factory=dict)  # key of an output -> first module that returned it
    called: list[str] = field(default_factory=list)  # modules in the order their calls began
    keep: list = field(default_factory=list)  # every traced tensor, alive until the trace is dropped


@torch.no_grad()
def _trace(layer: nn.Module, probe: LayerInput) -> _Trace:
    trace = _Trace()
    handles = []
    for name, module in layer.named_modules():
        def before(mod, args, kwargs, name=name):
            x = first_tensor(args, kwargs) if (args or "hidden_states" in kwargs) else None
            if not torch.is_tensor(x) or name in trace.module_inputs:
                return
            trace.keep.append(x)
            trace.module_inputs[name] = _key(x)
            trace.called.append(name)
            if isinstance(mod, nn.Linear):
                trace.linear_inputs[name] = x

        def after(mod, args, output, name=name):
            out = layer_output(output)
            if torch.is_tensor(out):
                trace.keep.append(out)
                trace.producers.setdefault(_key(out), name)

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after))
    set_route_all(layer, True)  # every expert runs (on its own copy of the tokens), so every expert is seen
    try:
        layer(probe.hidden, **probe.kwargs)
    finally:
        set_route_all(layer, False)
        for handle in handles:
            handle.remove()
    return trace


def _block_of(names: list[str], input_key: tuple, trace: _Trace) -> str | None:
    """The outermost sub-block of the layer holding every Linear of the group whose own input is the group's
    input (AWQ compares that block's output: attention for q/k/v, the MLP for gate/up, else the Linear itself)."""
    parts = names[0].split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        holds_all = all(n == prefix or n.startswith(prefix + ".") for n in names)
        if holds_all and trace.module_inputs.get(prefix) == input_key:
            return prefix
    return None


def _fold_candidates(layer: nn.Module, group: list[str], in_features: int, trace: _Trace):
    """(module name, rows, norm offset) to try, most likely first: the producer, then earlier Linears and norms."""
    first = trace.called.index(group[0])
    producer = trace.producers.get(trace.module_inputs[group[0]])
    earlier = [name for name in reversed(trace.called[:first]) if name]
    ordered = ([producer] if producer else []) + [name for name in earlier if name != producer]
    linears_tried = norms_tried = 0
    for name in ordered:
        module = layer.get_submodule(name)
        if isinstance(module, nn.Linear) and linears_tried < 3 and name not in group:
            linears_tried += 1
            if module.out_features == in_features:
                yield name, "all", 0.0
            elif module.out_features == 2 * in_features:
                yield name, "second_half", 0.0
                yield name, "first_half", 0.0
        elif not isinstance(module, nn.Linear) and norms_tried < 2:
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == in_features:
                norms_tried += 1
                yield name, "all", 0.0
                yield name, "all", 1.0


def _rows(n: int, rows: str) -> slice:
    return {"all": slice(None), "first_half": slice(0, n // 2), "second_half": slice(n // 2, None)}[rows]


def apply_fold(prev: nn.Module, linears: list[nn.Linear], scales: torch.Tensor, rows: str, norm_offset: float) -> None:
    """Divide the producer of the input by s and multiply the consumers by s (exact where discovery said so)."""
    s = scales.to(torch.float32)
    if isinstance(prev, nn.Linear):
        sel = _rows(prev.out_features, rows)
        prev.weight.data[sel] = (prev.weight.data[sel].float() / s[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data[sel] = (prev.bias.data[sel].float() / s).to(prev.bias.dtype)
    else:  # a norm: out = x_normalised * (offset + weight) (+ bias)
        prev.weight.data = ((norm_offset + prev.weight.data.float()) / s - norm_offset).to(prev.weight.dtype)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
    for linear in linears:
        linear.weight.data = (linear.weight.data.float() * s[None, :]).to(linear.weight.dtype)


@torch.no_grad()
def _fold_is_exact(layer32: nn.Module, probe32: LayerInput, reference: torch.Tensor, group: list[str],
                   candidate: tuple[str, str, float]) -> bool:
    name, rows, offset = candidate
    prev = layer32.get_submodule(name)
    linears = [layer32.get_submodule(n) for n in group]
    saved = [(p, p.data.clone()) for m in (prev, *linears) for p in m.parameters(recurse=False)]
    before, after = {}, {}

    def run(record: dict) -> torch.Tensor:
        def catch(module, args, kwargs) -> None:
            record.setdefault("x", first_tensor(args, kwargs))

        handle = linears[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            return layer_output(layer32(probe32.hidden, **probe32.kwargs))
        finally:
            handle.remove()

    try:
        run(before)
        generator = torch.Generator().manual_seed(0)
        scales = torch.exp(torch.empty(linears[0].in_features).uniform_(-0.5, 0.5, generator=generator))
        apply_fold(prev, linears, scales.to(reference.device), rows, offset)
        output = run(after)
        exact_output = (output - reference).norm() <= FOLD_TOLERANCE * reference.norm()
        expected = before["x"] / scales.to(reference.device)
        scaled_input = (after["x"] - expected).norm() <= FOLD_TOLERANCE * expected.norm()
        return bool(exact_output and scaled_input)
    except (RuntimeError, KeyError):  # shapes that do not line up: not a fold
        return False
    finally:
        for param, data in saved:
            param.data = data


def _float32_copy(layer: nn.Module, probe: LayerInput) -> tuple[nn.Module, LayerInput]:
    def cast(value):
        if torch.is_tensor(value) and value.is_floating_point():
            return value.float()
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value

    return (copy.deepcopy(layer).float(),
            LayerInput(cast(probe.hidden), {k: cast(v) for k, v in probe.kwargs.items()}))


def _signature(layer: nn.Module) -> tuple:
    return type(layer).__name__, tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())


def _coverage(layer: nn.Module, quantized: list[str], index: int) -> None:
    """Refuse a layer most of whose matrices are not Linears we quantize (GPT-2's Conv1D): nothing would be done."""
    chosen = {id(layer.get_submodule(n).weight) for n in quantized}
    total = covered = 0
    other = None
    for module_name, module in layer.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dim() < 2:
                continue
            total += param.numel()
            if id(param) in chosen:
                covered += param.numel()
            elif other is None and not isinstance(module, nn.Linear):
                other = f"{module_name or 'layer'}.{name} ({type(module).__name__})"
    if total and covered / total < MIN_COVERAGE:
        raise LlmqError(f"decoder layer {index} ({type(layer).__name__}) keeps {100 * (1 - covered / total):.0f}% of "
                        f"its weights outside nn.Linear modules (first: {other}); llmq quantizes nn.Linear only, so "
                        "this architecture is not supported")


def discover_layer(layer: nn.Module, probe: LayerInput, folds: bool, index: int = 0) -> tuple[LayerMap, list[str]]:
    """One layer's groups (and, with `folds`, their exact folds), found by running it on `probe`."""
    notes = []
    trace = _trace(layer, probe)
    by_input: dict[tuple, list[str]] = {}
    for name, x in trace.linear_inputs.items():
        if is_router(name, layer.get_submodule(name)):
            continue
        by_input.setdefault(_key(x), []).append(name)
    experts = {id(m) for m in experts_modules(layer)}
    expert_prefixes = [n + "." for n, m in layer.named_modules() if id(m) in experts]
    never_called = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n not in trace.linear_inputs]
    if never_called:
        notes.append(f"{len(never_called)} Linears never ran on the probe and stay unquantized (first: {never_called[0]})")
    layer32 = probe32 = reference = None
    if folds:
        layer32, probe32 = _float32_copy(layer, probe)
        with torch.no_grad():
            set_route_all(layer32, False)
            reference = layer_output(layer32(probe32.hidden, **probe32.kwargs))
    groups = []
    for key, names in by_input.items():
        in_features = layer.get_submodule(names[0]).in_features
        prev, rows, offset = None, "all", 0.0
        if folds:
            for candidate in _fold_candidates(layer, names, in_features, trace):
                if _fold_is_exact(layer32, probe32, reference, names, candidate):
                    prev, rows, offset = candidate
                    break
        expert = any(names[0].startswith(prefix) for prefix in expert_prefixes)
        groups.append(LinearGroup(tuple(names), _block_of(names, key, trace), prev, rows, offset, expert))
    layer_map = LayerMap(tuple(groups))
    _coverage(layer, layer_map.linears, index)
    return layer_map, notes


def layers_to_probe(layers: nn.ModuleList) -> int:
    """How many layers, from the first, discovery runs: up to the last one whose structure is new."""
    signatures = [_signature(layer) for layer in layers]
    return max(signatures.index(signature) for signature in set(signatures)) + 1


@torch.no_grad()
def discover(model: nn.Module, probes: Iterable[LayerInput], folds: bool) -> DecoderLayout:
    """Every decoder layer's groups. probes: the inputs of the first layers_to_probe(layers) layers on a few
    tokens, in order (llmq/calib/harness.py), each while its layer is in memory."""
    path, layers = find_decoder_layers(model)
    notes, known = [], {}
    for index, probe in enumerate(probes):
        layer = layers[index]
        signature = _signature(layer)
        if signature not in known:
            known[signature] = discover_layer(layer, probe, folds, index)
            notes.extend(f"layer {index}: {note}" for note in known[signature][1])
    maps = [known[_signature(layer)][0] for layer in layers]
    if not any(m.groups for m in maps):
        raise LlmqError(f"{type(model).__name__}: discovery found no Linear to quantize in its decoder layers")
    return DecoderLayout(path, maps, notes)
