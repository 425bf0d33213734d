"""Rotating the residual stream (incoherence processing, as in QuIP / QuaRot / SpinQuant), fused offline.

A decoder's residual stream h only reaches its Linears through norms, and an RMS norm without its weight commutes
with any orthogonal Q: rms(h Q) = rms(h); a LayerNorm, which subtracts the mean first, with any Q that maps the
all-ones vector to itself. So with each norm's weight folded into the Linears that read it (its bias b, if any,
kept in the norm as (b / w) Q), the model computes exactly the same function when

    the embeddings are E Q,                          every Linear reading the stream is W Q,
    every Linear writing into the stream is Q^T W,   the output head is W_head diag(w_final) Q.

In the rotated basis no input channel stands out: the few channels with 10-100x the energy of the rest (the
attention sink's) are spread over all of them, and every group of a weight matrix holds values of one size,
which is what low-bit grids round well. The rotation is data-free and the checkpoint stays a plain one
(norm weights 1, an untied output head), a layout transformers and llama.cpp load as any other. The cost:
a model with tied embeddings gets its own output head (vocabulary x hidden more, unquantized).

A layer transform that runs before calibration (`rotate+gptq`): GPTQ then sees the rotated Linears. Which norm
feeds what is found by one forward pass on probe tokens: a module of a decoder layer that applies a weight over
the stream's width (a Linear, a router keeping its weight outside nn.Linear, each expert's gate and up, which
see the rows of the norm's output routed to them: every expert gets every token for this pass) reads the norm
whose output holds its input's rows; the last Linear of stream width in each module (o_proj, down_proj, each
expert's down) writes into the stream. Each norm's form is tested on its own input: x_hat * w (+ b) and Gemma's x_hat * (1 + w) fold;
one that subtracts the mean (LayerNorm) gets a rotation keeping the all-ones direction. A per-channel norm on a
branch's output before the residual add (Gemma 2/3's sandwich norms) does not commute with any rotation and is
refused in one line. The result is checked on the spot: the rotated model's logits on the probe tokens must
equal the original's (a Linear reading the stream without a norm, as post-norm layers have, fails there), else
the run stops with one line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from llmq.calib.discover import find_decoder_layers
from llmq.calib.experts import set_route_all
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Method, ModelContext

SEED = 0  # the rotation is drawn from it: a resumed run redoes the same one
PROBE_TOKENS = 16
TOLERANCE = 1e-3  # relative error of the float32 logits after rotating (measured 1.6e-5; a wrong rotation: ~1)


def random_rotation(n: int, seed: int = SEED, keep_mean: bool = False) -> torch.Tensor:
    """A random orthogonal n x n matrix (Haar measure: QR of a Gaussian matrix, signs fixed by R's diagonal),
    float64 on the CPU, the same for the same n and seed. `keep_mean`: one that maps the all-ones vector to itself
    (Haar on the other n - 1 directions), so that it commutes with subtracting the mean (LayerNorm)."""
    if keep_mean:  # H swaps e_1 and ones / sqrt(n) (a Householder reflection): H diag(1, Q') H fixes the ones vector
        v = torch.full((n,), -n**-0.5, dtype=torch.float64)
        v[0] += 1
        H = torch.eye(n, dtype=torch.float64) - 2 * torch.outer(v, v) / (v @ v)
        inner = torch.eye(n, dtype=torch.float64)
        inner[1:, 1:] = random_rotation(n - 1, seed)
        return (H @ inner @ H).contiguous()
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def _reads(module: nn.Module, Q: torch.Tensor, multiplier: torch.Tensor) -> None:
    """A module applying a weight [out, hidden] to a norm's output (a Linear, a router): W <- W diag(multiplier) Q
    (a bias is unchanged)."""
    W = module.weight.data.to(Q.dtype) * multiplier.to(Q.dtype)
    module.weight.data = (W @ Q).to(module.weight.dtype)


def _writes(linear: nn.Linear, Q: torch.Tensor) -> None:
    """A Linear writing into the stream: W <- Q^T W, b <- Q^T b."""
    linear.weight.data = (Q.T @ linear.weight.data.to(Q.dtype)).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (Q.T @ linear.bias.data.to(Q.dtype)).to(linear.bias.dtype)


def _is_norm(module: nn.Module, hidden: int) -> bool:
    weight = getattr(module, "weight", None)
    return not isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.shape == (hidden,)


def _reads_weight(module: nn.Module, hidden: int) -> bool:
    """A Linear over the stream's width, or a router keeping its [experts, hidden] weight outside nn.Linear."""
    if isinstance(module, nn.Linear):
        return module.in_features == hidden
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == hidden and \
        not isinstance(module, nn.Embedding)


def _rows_within(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Every nonzero row of x is a multiple of one of y's rows: x is y, or the tokens of y a router sent to an
    expert, or (Llama 4) every token scaled by its router score; a scale per token commutes with a rotation."""
    x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
    x = x[x.abs().amax(-1) > 0]
    if x.shape[0] == 0:
        return False
    cosines = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(y, dim=-1).T
    return bool((cosines.abs().amax(-1) > 1 - 1e-5).all())


@dataclass
class _Probe:
    """One forward pass on the probe tokens: the float32 logits, the module feeding the output head, every
    stream-wide norm's (name, input, output) in call order, and for every module of a decoder layer that applies
    a weight over the stream's width, the norm whose output it read (None: another input, o_proj's)."""

    logits: torch.Tensor
    final: nn.Module | None = None
    norms: dict[nn.Module, tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    source: dict[nn.Module, nn.Module | None] = field(default_factory=dict)
    linears: dict[nn.Module, None] = field(default_factory=dict)  # the layers' Linears in the order first called
    in_layers: set[int] = field(default_factory=set)  # ids of the decoder layers' modules


def _probe(model: nn.Module, layers: nn.ModuleList, hidden: int, probe: torch.Tensor) -> _Probe:
    head = model.get_output_embeddings()
    in_layers = {id(module) for module in layers.modules()}
    seen, outputs, handles = _Probe(torch.empty(0), in_layers=in_layers), {}, []

    def produced(module, args, output) -> None:  # the latest producer of a storage: freed memory is handed out again
        if isinstance(output, torch.Tensor):
            outputs[output.data_ptr()] = module

    def head_input(module, args) -> None:
        if seen.final is None:
            seen.final = outputs.get(args[0].data_ptr())

    def norm_called(name):
        def hook(module, args, output) -> None:
            if module not in seen.norms and args and isinstance(output, torch.Tensor):
                seen.norms[module] = (name, args[0].detach().clone(), output.detach().clone())
        return hook

    def linear_called(module, args) -> None:
        seen.linears.setdefault(module)

    def consumer_called(module, args, kwargs) -> None:
        # matched now, against the norms called so far (latest first), so that no consumer's input is kept
        x = args[0] if args else next(iter(kwargs.values()), None)
        if module not in seen.source and isinstance(x, torch.Tensor):
            seen.source[module] = next((norm for norm, (_, _, out) in reversed(seen.norms.items())
                                        if id(norm) in in_layers and _rows_within(x, out)), None)

    for name, module in model.named_modules():
        if name and module is not head:
            handles.append(module.register_forward_hook(produced))
        if _is_norm(module, hidden):
            handles.append(module.register_forward_hook(norm_called(name)))
        elif id(module) in in_layers and _reads_weight(module, hidden):
            handles.append(module.register_forward_pre_hook(consumer_called, with_kwargs=True))
        if id(module) in in_layers and isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(linear_called))
    handles.append(head.register_forward_pre_hook(head_input))
    set_route_all(model, True)  # every expert sees every token (on its own copy): each one's readers are found
    try:
        seen.logits = _logits(model, probe)
    finally:
        set_route_all(model, False)
        for handle in handles:
            handle.remove()
    return seen


def _writers(layers: nn.ModuleList, seen: _Probe, hidden: int) -> list[nn.Linear]:
    """The Linears writing into the stream: of stream width, reading no norm, and the last Linear its module calls
    (o_proj in attention, down_proj in an MLP or an expert), so that one whose width is the stream's by chance
    inside a branch (MLA's q_b_proj when heads x head size = hidden) is not taken for one."""
    parent = {id(child): module for layer in layers for module in layer.modules() for child in module.children()}
    last = {}
    for linear in seen.linears:  # in call order: the last one of each module stays
        last[id(parent[id(linear)])] = linear
    return [linear for linear in last.values() if linear.out_features == hidden and seen.source.get(linear) is None]


@dataclass(frozen=True)
class _NormForm:
    offset: float  # 0: x_hat * w (+ b); 1: Gemma's x_hat * (1 + w)
    centers: bool  # subtracts the mean first (LayerNorm): the rotation must keep the all-ones direction


def _refusal(why: str) -> LlmqError:
    return LlmqError(f"--method rotate: {why}; use a method without rotate (e.g. gptq)")


def _norm_form(norm: nn.Module, x: torch.Tensor, name: str) -> _NormForm:
    """The norm's form, tested on its own input `x`: the weight that zeroes its output (bias aside) is -offset, and
    a LayerNorm's output does not move when x is shifted by a constant. Any other form is refused."""
    trial = copy.deepcopy(norm)
    if getattr(trial, "bias", None) is not None:
        trial.bias.data.zero_()
    for offset in (0.0, 1.0):
        trial.weight.data.fill_(-offset)
        if trial(x).abs().amax() <= 1e-6:  # x_hat is of size 1 whatever x's
            trial.weight.data.fill_(1 - offset)
            out = trial(x)  # x shifted by its own rms: a different output for an RMS norm, the same for LayerNorm
            return _NormForm(offset, bool((trial(x + x.pow(2).mean().sqrt()) - out).norm() <= 1e-3 * out.norm()))
    raise _refusal(f"{name} ({type(norm).__name__}) is neither x_hat * w nor x_hat * (1 + w), which does not "
                   "commute with a rotation")


def _fold_norm(norm: nn.Module, form: _NormForm, Q: torch.Tensor) -> torch.Tensor:
    """The norm's per-channel multiplier m = offset + w, which the norm then stops applying (weight 1 - offset); its
    bias b, if any, stays in the norm as (b / m) Q, which the readers' W diag(m) Q map back to W b."""
    multiplier = form.offset + norm.weight.data.float()
    norm.weight.data.fill_(1 - form.offset)
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.data = ((bias.data.float() / multiplier).to(Q.dtype) @ Q.to(bias.device)).to(bias.dtype)
    return multiplier


def _logits(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=probe).logits.float()


def untie_head(model: nn.Module) -> nn.Module:
    """The output head, given its own weight when it shares the embeddings' (the config says so too)."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embeddings.weight or head.weight.data_ptr() == embeddings.weight.data_ptr():
        head.weight = nn.Parameter(embeddings.weight.data.clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return head


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = SEED) -> str:
    """Rotate the residual stream of `model` in place by a random orthogonal matrix drawn from `seed` (module
    docstring), checked on probe tokens; returns what was done, in words.

    The model is cast to float32 for it and back to its dtype after: each weight is rounded to that dtype once,
    and the check compares float32 logits, where a correct rotation is exact to ~1e-5 (in bf16 the reference
    model's logits on the probe differ by 17% between two equivalent forms from rounding alone).
    """
    dtype = model.dtype
    model.float()
    try:
        return _rotate_float(model, seed)
    finally:
        model.to(dtype)


def _rotate_float(model: nn.Module, seed: int) -> str:
    hidden = model.config.get_text_config().hidden_size
    probe = torch.arange(1, PROBE_TOKENS + 1, device=model.device)[None] % model.config.get_text_config().vocab_size
    _, layers = find_decoder_layers(model)
    seen = _probe(model, layers, hidden, probe)
    if seen.final not in seen.norms:
        raise _refusal("no norm found right before the output head; this model's residual stream cannot be "
                       "rotated offline")
    # every refusal before anything changes
    fed = {norm for norm in seen.source.values() if norm is not None} | {seen.final}
    for norm, (name, _, _) in seen.norms.items():  # a norm on a branch's output, before it joins the stream
        if id(norm) in seen.in_layers and norm not in fed and not torch.all(norm.weight == norm.weight[0]):
            raise _refusal(f"{name} ({type(norm).__name__}) scales channel by channel a tensor no Linear reads (a "
                           "norm on a branch's output before the residual add, as Gemma 2/3 have), which does not "
                           "commute with a rotation")
    forms = {norm: _norm_form(norm, seen.norms[norm][1], seen.norms[norm][0]) for norm in fed}
    for norm, form in forms.items():
        if getattr(norm, "bias", None) is not None and torch.any(norm.weight + form.offset == 0):
            raise _refusal(f"{seen.norms[norm][0]} has a bias and a zero weight, so its bias cannot stay in the norm")
    keep_mean = any(form.centers for form in forms.values())
    Q = random_rotation(hidden, seed, keep_mean).float().to(model.device)
    multipliers = {norm: _fold_norm(norm, form, Q) for norm, form in forms.items()}
    for consumer, norm in seen.source.items():
        if norm is not None:
            _reads(consumer, Q.to(consumer.weight.device), multipliers[norm])
    for linear in _writers(layers, seen, hidden):
        _writes(linear, Q.to(linear.weight.device))
    head = untie_head(model)
    _reads(head, Q.to(head.weight.device), multipliers[seen.final])
    E = model.get_input_embeddings().weight
    E.data = (E.data.to(Q.dtype) @ Q.to(E.device)).to(E.dtype)
    after = _logits(model, probe)
    error = float((after - seen.logits).norm() / seen.logits.norm())
    if error > TOLERANCE:
        raise _refusal(f"the rotated model's logits differ from the original's by {error:.1%}; this architecture's "
                       "residual stream is not rotation-invariant (a Linear reading the stream without a norm, as "
                       "post-norm layers have)")
    kind = "keeping the mean direction (LayerNorm) " if keep_mean else ""
    return (f"residual stream rotated by a random orthogonal {hidden}x{hidden} matrix {kind}(seed {seed}), norms "
            f"folded into the Linears, output head untied")


class Rotate(Method):
    """Rotate the residual stream by a random orthogonal matrix before the rounding method (module docstring)."""

    name = "rotate"
    rounds = False
    whole_model = True
    repeatable_model_step = True  # seeded and data-free: a resumed run redoes it and keeps its finished layers

    def prepare_model(self, model: nn.Module, context: ModelContext) -> str:
        return rotate_model(model, SEED)
