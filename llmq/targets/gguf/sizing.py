"""`--target-bpw X` / `--target-size 4.2GB`: a GGUF type per tensor, chosen so that the file lands on a size.

    sensitivity  one pass with gradients over a few calibration windows. For every Linear: the mean square of
                 the gradient at its output (G, per output row) with the labels sampled from the model's own
                 predictions, so that G estimates the Fisher information of the output distribution, and the mean
                 square of its input (H, per column: the importance matrix). For the token embedding: the
                 gradient's mean square per dimension and how often each token occurs.
    costs        every candidate type's rounding of every tensor (the same search the run then makes: weighted by
                 H for the decoder's Linears, plain for the embedding and head, as the writer encodes them) and
                 its predicted increase of the output's KL divergence per token, the second-order term
                 1/2 * sum_ij G_i H_j dW_ij^2 (the Fisher information with gradients and inputs taken independent
                 and per channel). scripts/bench_gguf_size.py checks it against measured KL increases.
    choice       the types with the least summed cost whose bytes fit the budget: the exact knapsack, by dynamic
                 programming over the budget in 65536 steps.

A file's bits per weight are its size in bits over its weights (all tensors' elements), as llama.cpp prints
them when it loads a file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from torch import nn

from llmq.calib.lazy import lazy_weights, tensor_of
from llmq.core import log
from llmq.core.device import human_size
from llmq.core.errors import LlmqError
from llmq.methods.grids.kquant import BlockTensor
from llmq.methods.grids.kquant_search import encode
from llmq.targets.gguf.mixtures import is_quantizable
from llmq.targets.gguf.writer import gguf_names, metadata_bytes, stacked_shapes

# the types a tensor may get, most bits first (each where its block divides the row); F16 and above are not
# offered: Q8_0 is already within rounding noise of them
CANDIDATES = (T.Q8_0, T.Q6_K, T.Q5_1, T.Q5_K, T.Q5_0, T.Q4_1, T.Q4_K, T.IQ4_NL, T.Q4_0, T.IQ4_XS, T.Q3_K, T.IQ3_S,
              T.IQ3_XXS, T.Q2_K, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_M, T.IQ1_S)
SENSITIVITY_WINDOWS = 8  # calibration windows the gradient pass reads (at most)
# a tensor's costs are measured on about this many of its weights: whole rows (RowSample), the cost estimated for
# the whole tensor (blocks never span rows; a million weights pin a cost to well under a percent)
COST_WEIGHTS = 1 << 20
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'4.2GB' -> 4200000000 bytes (kB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary, a bare number is bytes)."""
    match = _SIZE.match(str(text))
    if not match:
        raise LlmqError(f"--target-size {text} is not a size; write it like 4.2GB, 800MB or 3.5GiB")
    unit = match.group(2).lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def type_bytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def candidate_types(row_length: int) -> list[T]:
    return [qtype for qtype in CANDIDATES if row_length % GGML_QUANT_SIZES[qtype][0] == 0]


@dataclass
class Sensitivity:
    """Per-token means from the gradient pass (module name -> tensor), and the embedding's."""

    output_grads: dict[str, torch.Tensor]  # Linear -> mean square of d log p(y) / d output, [out]
    input_squares: dict[str, torch.Tensor]  # Linear -> mean square of its input, [in] (the importance matrix)
    embedding_grads: torch.Tensor | None  # mean square of the gradient at the embedding's output, [hidden]
    token_frequency: torch.Tensor | None  # [vocab]: each row's share of the tokens read, smoothed (see below)
    tokens: int


def measure_sensitivity(model: nn.Module, samples: torch.Tensor, windows: int = SENSITIVITY_WINDOWS,
                        seed: int = 0) -> Sensitivity:
    """The gradient pass (module docstring) over the first `windows` calibration windows, one at a time, where
    the model's weights are (the CPU for a model the harness moves to an accelerator a layer at a time)."""
    linears = {module: name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    embedding = model.get_input_embeddings()
    out_sq: dict[str, torch.Tensor] = {}
    in_sq: dict[str, torch.Tensor] = {}
    emb_sq: list[torch.Tensor] = []
    vocab = embedding.weight.shape[0]
    counts = torch.zeros(vocab, dtype=torch.float64)

    def accumulate(store: dict, name: str, value: torch.Tensor) -> None:
        flat = value.detach().float().reshape(-1, value.shape[-1])
        store[name] = store.get(name, 0) + (flat * flat).sum(0).cpu()

    def on_linear(module, args, output):
        name = linears[module]
        accumulate(in_sq, name, args[0])
        if output.requires_grad:
            output.register_hook(lambda grad: accumulate(out_sq, name, grad))

    def on_embedding(module, args, output):
        output = output.detach().requires_grad_()  # the pass's only leaf: weights need no gradients
        output.register_hook(lambda grad: emb_sq.append((grad.detach().float() ** 2).reshape(-1, grad.shape[-1]).sum(0)))
        return output

    handles = [module.register_forward_hook(on_linear) for module in linears]
    handles.append(embedding.register_forward_hook(on_embedding))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    chosen = samples[:windows]
    try:
        with torch.enable_grad():
            for window in log.progress(chosen, desc="sensitivity (gradients)", unit="window"):
                ids = window.reshape(1, -1).to(embedding.weight.device)
                counts += torch.bincount(window.reshape(-1).cpu(), minlength=vocab)[:vocab].double()
                logits = model(input_ids=ids, use_cache=False).logits.float()
                logp = torch.log_softmax(logits, dim=-1)
                # labels drawn from the model itself: E[g g^T] over them is the Fisher information of its predictions
                labels = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]).cpu(), 1,
                                           generator=generator).to(logp.device)
                logp.reshape(-1, logp.shape[-1]).gather(1, labels).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)
    tokens = chosen.numel()
    seen = counts / max(tokens, 1)
    # a few thousand calibration tokens see a small part of the vocabulary; the rest is read in real use, so half
    # of each row's weight is spread evenly over the whole vocabulary
    frequency = (0.5 * seen + 0.5 / vocab).float()
    return Sensitivity({name: value / tokens for name, value in out_sq.items()},
                       {name: value / tokens for name, value in in_sq.items()},
                       sum(emb_sq) / tokens if emb_sq else None, frequency, tokens)


@dataclass(frozen=True)
class Option:
    qtype: T
    bytes: int
    cost: float  # predicted increase of the KL divergence per token


@dataclass(frozen=True)
class RowSample:
    """The rows a large tensor's costs are measured on: every heavy row, and evenly spaced rows of the rest.

    A row's cost weight (G_i for a Linear's output row; for the token embedding the head's G_i and the token's
    frequency) spans orders of magnitude over a vocabulary: evenly spaced rows alone missed or over-counted the
    few frequent tokens and put the embedding's Q4_0 cost at 3x its whole-tensor value on the reference model.
    So the heaviest half of the sample is measured exactly and the rest of the tensor is estimated from the
    spread rows as the weighted mean of their errors (within 3% of the whole tensor's cost there)."""

    heavy: torch.Tensor  # row indices counted exactly
    spread: torch.Tensor  # evenly spaced rows standing for all the others
    rest_weights: list[float]  # per cost term: the summed row weight of the rows not in `heavy`

    @property
    def rows(self) -> torch.Tensor:
        return torch.cat([self.heavy, self.spread])

    def cost(self, term: int, row_weights: torch.Tensor, row_errors: torch.Tensor) -> float:
        """Sum_i weight_i * error_i over the whole tensor; row_errors are those of self.rows, in that order."""
        heavy, spread = row_errors[: len(self.heavy)], row_errors[len(self.heavy) :]
        exact = float((row_weights[self.heavy] * heavy).sum())
        w = row_weights[self.spread]
        mean = float((w * spread).sum() / w.sum()) if float(w.sum()) > 0 else float(spread.mean())
        return exact + self.rest_weights[term] * mean


def sample_rows(rows: int, cols: int, row_weights: list[torch.Tensor]) -> RowSample | None:
    """The rows to measure a tensor's costs on (None: all of them), given each cost term's weight per row."""
    keep = max(64, COST_WEIGHTS // cols)
    if rows <= keep:
        return None
    share = sum(w.double() / max(float(w.sum()), 1e-300) for w in row_weights) if row_weights else torch.ones(rows)
    heavy = share.topk(keep // 2).indices.sort().values
    others = torch.ones(rows, dtype=torch.bool)
    others[heavy] = False
    rest = others.nonzero().squeeze(1)
    spread = rest[torch.linspace(0, len(rest) - 1, keep - len(heavy)).round().long()]
    return RowSample(heavy, spread, [float(w[rest].sum()) for w in row_weights])


def tensor_options(model: nn.Module, names: dict[str, str], shapes: dict[str, tuple[int, ...]],
                   sensitivity: Sensitivity, weighted: set[str]) -> dict[str, list[Option]]:
    """GGUF name -> every candidate type's (bytes, predicted cost), for each quantizable tensor.

    `weighted`: the Linears the harness rounds (weighted by their importance); other tensors are encoded plainly."""
    modules = dict(model.named_modules())
    users: dict[int, list[str]] = {}  # a parameter -> the Linears that multiply by it (a tied head: two of them)
    for name, module in modules.items():
        if isinstance(module, nn.Linear) and name in sensitivity.output_grads:
            users.setdefault(id(module.weight), []).append(name)
    embedding = model.get_input_embeddings()
    options: dict[str, list[Option]] = {}
    params = dict(model.named_parameters())
    for hf_name, gguf_name in log.progress(list(names.items()), desc="sizing costs", unit="tensor"):
        types = candidate_types(shapes.get(gguf_name, (1,))[-1])
        if gguf_name not in shapes or hf_name not in params or not types:
            continue  # (no candidate: rows not a multiple of 32, left in F16 as llama.cpp leaves them)
        param = params[hf_name]
        weight = tensor_of(model, hf_name, param).detach().float()
        uses = users.get(id(param), [])
        importance = next((sensitivity.input_squares[name] for name in uses if name in weighted), None)
        terms = [(sensitivity.output_grads[name], sensitivity.input_squares[name]) for name in uses]
        if param is embedding.weight and sensitivity.embedding_grads is not None:
            terms.append((sensitivity.token_frequency, sensitivity.embedding_grads))
        sample = sample_rows(*weight.shape, [g for g, _ in terms])
        measured = weight if sample is None else weight[sample.rows]
        options[gguf_name] = []
        for qtype in types:
            error = BlockTensor(qtype, encode(measured, qtype, importance), tuple(measured.shape)).dequantize() - measured
            squared, cost = error.square(), 0.0
            for term, (g, h) in enumerate(terms):  # a tied head: its two uses weigh the same errors
                row_errors = (squared * h[None, :]).sum(1)
                cost += 0.5 * (float((g * row_errors).sum()) if sample is None else sample.cost(term, g, row_errors))
            options[gguf_name].append(Option(qtype, type_bytes(shapes[gguf_name], qtype), cost))
    return options


KNAPSACK_STEPS = 1 << 16  # the budget's resolution in the exact search: each tensor rounds up by < 1/65536 of it


def choose_types(options: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """One option per tensor, summed bytes <= budget, the least summed cost: the exact knapsack over the budget
    in KNAPSACK_STEPS units (bytes rounded up, so the choice always fits), then any bytes the rounding left
    filled by the upgrades that fit, most cost saved per byte first."""
    unit = max(1, -(-budget // KNAPSACK_STEPS))
    capacity = budget // unit
    names = list(options)
    best = np.zeros(capacity + 1)  # least cost of the tensors so far within c units
    picks = np.zeros((len(names), capacity + 1), dtype=np.int16)
    for row, name in enumerate(names):
        new = np.full(capacity + 1, np.inf)
        for index, option in enumerate(options[name]):
            units = -(-option.bytes // unit)
            if units > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[units:] = best[: capacity + 1 - units] + option.cost
            better = candidate < new
            new[better], picks[row, better] = candidate[better], index
        best = new
    if not np.isfinite(best[capacity]):
        raise ValueError("budget below the smallest types")
    result, c = {}, capacity
    for row in range(len(names) - 1, -1, -1):
        option = options[names[row]][picks[row, c]]
        result[names[row]] = option
        c -= -(-option.bytes // unit)
    left = budget - sum(option.bytes for option in result.values())
    while True:  # the rounding's leftover
        best_step = None
        for name, current in result.items():
            for option in options[name]:
                extra = option.bytes - current.bytes
                if 0 < extra <= left and option.cost < current.cost:
                    gain = (current.cost - option.cost) / extra
                    if best_step is None or gain > best_step[0]:
                        best_step = (gain, name, option)
        if best_step is None:
            return result
        _, name, option = best_step
        left -= option.bytes - result[name].bytes
        result[name] = option


def unsized_bytes(name: str, shape: tuple[int, ...]) -> int:
    """The bytes of a tensor no candidate type takes: F16 for a matrix whose rows fit no block (as llama.cpp's
    fallback and the plan leave it), F32 for norms and biases."""
    return (2 if is_quantizable(name, shape) else 4) * math.prod(shape)


def smallest_and_largest(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """The tensor bytes of a file with every sized tensor in its smallest / largest candidate type (the others
    unsized_bytes): the range a size target can land in, before metadata."""
    low = high = 0
    for name, shape in shapes.items():
        types = candidate_types(shape[-1]) if is_quantizable(name, shape) else []
        sizes = [type_bytes(shape, qtype) for qtype in types] or [unsized_bytes(name, shape)]
        low, high = low + min(sizes), high + max(sizes)
    return low, high


@dataclass(frozen=True)
class SizeGoal:
    """What the user asked for: bits per weight, or a file size in bytes."""

    bpw: float | None
    size: int | None
    text: str  # as given: "4.5" or "4.2GB"

    @property
    def flag(self) -> str:
        return "--target-bpw" if self.bpw is not None else "--target-size"

    @property
    def label(self) -> str:
        return f"{self.bpw:g}bpw" if self.bpw is not None else self.text.replace(" ", "")

    def file_bytes(self, weights: int) -> int:
        return self.size if self.size is not None else round(self.bpw * weights / 8)

    def check_range(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse a target below what the tensors alone take in their smallest types (metadata comes on top)."""
        weights = sum(math.prod(shape) for shape in shapes.values())
        low, _ = smallest_and_largest(shapes)
        if self.file_bytes(weights) < low:
            raise LlmqError(f"{self.flag} {self.text} is below the smallest file this model's tensors fit in "
                            f"({human_size(low)}, {8 * low / weights:.2f} bits per weight, before metadata); "
                            "ask for more")


def size_goal(bpw: float | None, size: str | None) -> SizeGoal | None:
    if bpw is None and size is None:
        return None
    if bpw is not None and size is not None:
        raise LlmqError("--target-bpw and --target-size both set the file's size; pass one of them")
    if bpw is not None and not 1 <= bpw <= 16:
        raise LlmqError(f"--target-bpw {bpw:g} is out of range; llama.cpp's types hold 1.56 (IQ1_S) to 8.5 (Q8_0) "
                        "bits per weight, e.g. --target-bpw 4.5")
    return SizeGoal(bpw, None if size is None else parse_size(size), f"{bpw:g}" if bpw is not None else size)


@dataclass
class SizedTypes:
    """The chosen type of every sized tensor, and what the choice expects."""

    goal: SizeGoal
    chosen: dict[str, Option]
    target_bytes: int  # the file size asked for
    planned_bytes: int  # the file size the choice adds up to (metadata estimated)
    weights: int

    @property
    def types(self) -> dict[str, T]:
        return {name: option.qtype for name, option in self.chosen.items()}

    def main_type(self) -> T:
        """The type most of the file's bytes are in (it names the file's mixture for llama.cpp)."""
        totals: dict[T, int] = {}
        for option in self.chosen.values():
            totals[option.qtype] = totals.get(option.qtype, 0) + option.bytes
        return max(totals, key=totals.get)

    def predicted_kl(self) -> float:
        return sum(option.cost for option in self.chosen.values())

    def card(self) -> dict:
        return {"target": self.goal.label, "target_bytes": self.target_bytes, "planned_bytes": self.planned_bytes,
                "bits_per_weight": round(8 * self.planned_bytes / self.weights, 4),
                "predicted_kl": self.predicted_kl(), "cost": "predicted KL increase per token (1/2 sum G_i H_j dW_ij^2)",
                "tensors": {name: [option.qtype.name, option.bytes, option.cost] for name, option in self.chosen.items()}}

    def summary(self) -> str:
        counts: dict[T, list[int]] = {}
        for option in self.chosen.values():
            entry = counts.setdefault(option.qtype, [0, 0])
            entry[0], entry[1] = entry[0] + 1, entry[1] + option.bytes
        kinds = ", ".join(f"{n} {qtype.name} ({human_size(b)})" for qtype, (n, b)
                          in sorted(counts.items(), key=lambda item: -item[1][1]))
        return (f"llmq: sized to {self.goal.label}: {human_size(self.planned_bytes)} planned for "
                f"{human_size(self.target_bytes)} asked ({8 * self.planned_bytes / self.weights:.2f} bits per weight); "
                f"{kinds}; predicted KL increase {self.predicted_kl():.4f}")


def _table_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """The tensor table's bytes (name, dims, type, offset per tensor) and each tensor's padding to 32 bytes, at most."""
    return sum(len(name) + 24 + 8 * len(shape) + 32 for name, shape in shapes.items()) + 32


def size_types(model: nn.Module, tokenizer, samples: torch.Tensor, weighted: set[str], goal: SizeGoal) -> SizedTypes:
    """The whole choice (module docstring): a type for each quantizable tensor so the file lands on `goal`."""
    names = gguf_names(model)
    shapes = stacked_shapes(model, names)
    weights = lazy_weights(model)
    if weights is not None:  # the gradient pass runs the whole model
        weights.load_all()
    try:
        sensitivity = measure_sensitivity(model, samples)
    finally:
        if weights is not None:
            weights.release_layers()
    quantizable = {name: shape for name, shape in shapes.items() if is_quantizable(name, shape)}
    options = tensor_options(model, names, quantizable, sensitivity, weighted)
    fixed = sum(unsized_bytes(name, shape) for name, shape in shapes.items() if name not in options)
    # the recipe that carries the choice (about 80 bytes a tensor) and the metadata, measured
    overhead = (metadata_bytes(model, tokenizer, 0, "model") + _table_bytes(shapes) + 80 * len(options) + 4096)
    total_weights = sum(math.prod(shape) for shape in shapes.values())
    target = goal.file_bytes(total_weights)
    budget = target - overhead - fixed
    low = sum(min(o.bytes for o in opts) for opts in options.values())
    high = sum(max(o.bytes for o in opts) for opts in options.values())
    if budget < low or budget > high:
        edge = overhead + fixed + (low if budget < low else high)
        raise LlmqError(f"{goal.flag} {goal.text} ({human_size(target)}) is {'below' if budget < low else 'above'} "
                        f"the {'smallest' if budget < low else 'largest'} file this model fits in with llama.cpp's "
                        f"quantized types: {human_size(edge)} ({8 * edge / total_weights:.2f} bits per weight); "
                        + ("ask for more" if budget < low else "ask for less, or use --type F16 / BF16"))
    chosen = choose_types(options, budget)
    planned = overhead + fixed + sum(option.bytes for option in chosen.values())
    sized = SizedTypes(goal, chosen, target, planned, total_weights)
    log.info(sized.summary())
    if planned < 0.97 * target:  # every upgrade left costs bytes and buys nothing (weights already on a grid)
        log.info(f"llmq: no type lowers the predicted KL further, so the file stays {1 - planned / target:.1%} below "
                 f"{goal.flag} {goal.text}")
    return sized
