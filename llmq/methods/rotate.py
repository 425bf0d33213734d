"""Rotating the residual stream (incoherence processing, as in QuIP / QuaRot / SpinQuant), fused offline.

A decoder's residual stream h only reaches its Linears through RMS norms, and an RMS norm without its weight
commutes with any orthogonal Q: rms(h Q) = rms(h). So with each norm's weight folded into the Linears that read
it, the model computes exactly the same function when

    the embeddings are E Q,                          every Linear reading the stream is W Q,
    every Linear writing into the stream is Q^T W,   the output head is W_head diag(w_final) Q.

In the rotated basis no input channel stands out: the few channels with 10-100x the energy of the rest (the
attention sink's) are spread over all of them, and every group of a weight matrix holds values of one size,
which is what low-bit grids round well. The rotation is data-free and the checkpoint stays a plain one
(norm weights 1, an untied output head), a layout transformers and llama.cpp load as any other. The cost:
a model with tied embeddings gets its own output head (vocabulary x hidden more, unquantized).

A layer transform that runs before calibration (`rotate+gptq`): GPTQ then sees the rotated Linears. Which norm
feeds which Linears comes from discovery (llmq/calib/discover.py, the exact folds AWQ uses); the Linears writing
into the stream are the other Linears of a layer whose output is the stream's width. Whether that holds for a
model is checked on the spot: the rotated model's logits on a few probe tokens must equal the original's, else
the run stops with one line (LayerNorm's mean, a norm that also feeds a router: not rotation-invariant).
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.calib.discover import find_decoder_layers
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Method, ModelContext
from llmq.core.layers import DecoderLayout

SEED = 0  # the rotation is drawn from it: a resumed run redoes the same one
PROBE_TOKENS = 16
TOLERANCE = 1e-3  # relative error of the float32 logits after rotating (measured 1.6e-5; a wrong rotation: ~1)


def random_rotation(n: int, seed: int = SEED) -> torch.Tensor:
    """A random orthogonal n x n matrix (Haar measure: QR of a Gaussian matrix, signs fixed by R's diagonal),
    float64 on the CPU, the same for the same n and seed."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def _reads(linear: nn.Linear, Q: torch.Tensor, multiplier: torch.Tensor | None = None) -> None:
    """A Linear reading the stream: W <- W diag(multiplier) Q (its bias is unchanged)."""
    W = linear.weight.data.to(Q.dtype)
    if multiplier is not None:
        W = W * multiplier.to(Q.dtype)
    linear.weight.data = (W @ Q).to(linear.weight.dtype)


def _writes(linear: nn.Linear, Q: torch.Tensor) -> None:
    """A Linear writing into the stream: W <- Q^T W, b <- Q^T b."""
    linear.weight.data = (Q.T @ linear.weight.data.to(Q.dtype)).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (Q.T @ linear.bias.data.to(Q.dtype)).to(linear.bias.dtype)


def _fold_norm(norm: nn.Module, offset: float) -> torch.Tensor:
    """The norm's per-channel multiplier (offset + weight), which the norm then stops applying (weight 1 - offset)."""
    if getattr(norm, "bias", None) is not None:
        raise LlmqError(f"--method rotate: {type(norm).__name__} has a bias, which does not commute with a rotation; "
                        "use a method without rotate (e.g. gptq)")
    multiplier = offset + norm.weight.data.float()
    norm.weight.data.fill_(1 - offset)
    return multiplier


def _feeding(model: nn.Module, consumer: nn.Module, probe: torch.Tensor) -> tuple[tuple[str, nn.Module] | None,
                                                                             torch.Tensor]:
    """The module (name, module) whose output is `consumer`'s input on a forward pass of `probe` (the final norm
    feeding the output head), and that pass's float32 logits."""
    outputs, seen = {}, {}

    def produced(name):
        def hook(module, args, output) -> None:  # returns None: the output is left as it is
            if isinstance(output, torch.Tensor):  # the latest producer: freed memory is handed out again
                outputs[output.data_ptr()] = name
        return hook

    def consumed(module, args) -> None:
        seen.setdefault("producer", outputs.get(args[0].data_ptr()))

    handles = [module.register_forward_hook(produced(name))
               for name, module in model.named_modules() if name and module is not consumer]
    handles.append(consumer.register_forward_pre_hook(consumed))
    try:
        logits = _logits(model, probe)
    finally:
        for handle in handles:
            handle.remove()
    name = seen.get("producer")
    return ((name, model.get_submodule(name)) if name is not None else None), logits


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
def rotate_model(model: nn.Module, layout: DecoderLayout, Q: torch.Tensor) -> None:
    """Rotate the residual stream of `model` by Q in place (module docstring), checked on probe tokens.

    The model is cast to float32 for it and back to its dtype after: each weight is rounded to that dtype once,
    and the check compares float32 logits, where a correct rotation is exact to ~1e-5 (in bf16 the reference
    model's logits on the probe differ by 17% between two equivalent forms from rounding alone).
    """
    dtype = model.dtype
    model.float()
    try:
        _rotate_float(model, layout, Q.float())
    finally:
        model.to(dtype)


def _rotate_float(model: nn.Module, layout: DecoderLayout, Q: torch.Tensor) -> None:
    hidden = Q.shape[0]
    probe = torch.arange(1, PROBE_TOKENS + 1, device=model.device)[None] % model.config.get_text_config().vocab_size
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    final, before = _feeding(model, head, probe)
    if head is None or final is None or not hasattr(final[1], "weight"):
        raise LlmqError("--method rotate: no norm found right before the output head; this model's residual "
                        "stream cannot be rotated offline, use a method without rotate (e.g. gptq)")
    _, layers = find_decoder_layers(model)
    offsets = {}  # norm class -> its offset (Gemma's x * (1 + w)), as discovery found it in the layers
    folded = {}  # id of a norm -> the multiplier it no longer applies
    for layer, layer_map in zip(layers, layout.maps):
        readers = set()
        for group in layer_map.groups:
            prev = layer.get_submodule(group.prev) if group.prev is not None else None
            if prev is None or isinstance(prev, nn.Linear) or prev.weight.numel() != hidden:
                continue  # fed by a Linear (o_proj by v_proj) or a narrower norm (MLA's): inside a branch
            offsets[type(prev)] = group.norm_offset
            if id(prev) not in folded:  # a norm feeding several groups is folded once
                folded[id(prev)] = _fold_norm(prev, group.norm_offset)
            multiplier = folded[id(prev)]
            for name in group.linears:
                _reads(layer.get_submodule(name), Q.to(prev.weight.device), multiplier)
                readers.add(name)
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and name not in readers and module.out_features == hidden:
                _writes(module, Q.to(module.weight.device))
    final_multiplier = _fold_norm(final[1], offsets.get(type(final[1]), 0.0))
    head = untie_head(model)
    _reads(head, Q.to(head.weight.device), final_multiplier)
    E = embeddings.weight
    E.data = (E.data.to(Q.dtype) @ Q.to(E.device)).to(E.dtype)
    after = _logits(model, probe)
    error = float((after - before).norm() / before.norm())
    if error > TOLERANCE:
        raise LlmqError(f"--method rotate: the rotated model's logits differ from the original's by {error:.1%}; this "
                        f"architecture's residual stream is not rotation-invariant (a LayerNorm's mean, a norm that "
                        f"also feeds an unquantized router); use a method without rotate (e.g. gptq)")


class Rotate(Method):
    """Rotate the residual stream by a random orthogonal matrix before the rounding method (module docstring)."""

    name = "rotate"
    rounds = False
    folds = True  # discovery finds the norm in front of each group
    whole_model = True
    repeatable_model_step = True  # seeded and data-free: a resumed run redoes it and keeps its finished layers

    def prepare_model(self, model: nn.Module, context: ModelContext) -> str:
        hidden = model.config.get_text_config().hidden_size
        rotate_model(model, context.layout, random_rotation(hidden))
        return (f"residual stream rotated by a random orthogonal {hidden}x{hidden} matrix (seed {SEED}), norms "
                f"folded into the Linears, output head untied")
