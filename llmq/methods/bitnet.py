"""BitNet b1.58: ternary weights (llmq/methods/grids/ternary.py) with int8 activations, optionally fine-tuned.

The `bitnet` method is round-to-nearest onto a ternary grid (the target picks it: transformers' BitNet layout,
or GGUF's TQ1_0 / TQ2_0), after an optional whole-model step: ternary-aware fine-tuning by distillation
(--qat-steps, llmq/methods/qat.py), which trains the float weights the rounding then ternarizes.

Activations entering a ternary Linear are quantized to int8 per token (absmax), as BitNet b1.58 and
transformers' BitLinear do, so the model llmq evaluates is the model a loader runs.

`TernaryLinear` has two lives:
- *latent*: it keeps a float weight and ternarizes it on every forward, with straight-through estimators
  for both roundings, so ternary-aware fine-tuning trains the float weight;
- *frozen*: it keeps only the int8 codes and the scale, which is what the output formats store (and what the
  BitNet checkpoint reader builds).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from llmq.calib.text import calibration_text, tokenize_text
from llmq.core.errors import LlmqError
from llmq.core.interfaces import ModelContext
from llmq.methods.grids.ternary import (
    GRANULARITIES,
    MIN_SCALE,
    TernaryScheme,
    TernaryTensor,
    absmean_scale,
    expand_scale,
    stored_scale,
    ternary_codes,
    ternary_scheme,
)
from llmq.methods.qat import QATConfig, distill, save_loss_curve, training_windows
from llmq.methods.rtn import RTN


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake quantization (BitLinear's), straight-through in the backward pass."""
    scale = 127.0 / x.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(MIN_SCALE)
    q = ((x.detach().float() * scale).round().clamp(-128, 127) / scale).to(x.dtype)
    return x + (q - x).detach()


class TernaryLinear(nn.Module):
    """A Linear with ternary weights and int8 activations; latent (trainable) or frozen (codes + scale)."""

    def __init__(self, in_features: int, out_features: int, scheme: TernaryScheme, scale_dtype: torch.dtype,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.scale_dtype = scheme, scale_dtype
        self.weight: nn.Parameter | None = None  # latent float weight (training)
        self.register_buffer("codes", None)  # int8 [out, in] (frozen)
        self.register_buffer("gamma", None)  # float32, broadcastable (frozen)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: TernaryScheme) -> TernaryLinear:
        module = cls(linear.in_features, linear.out_features, scheme, linear.weight.dtype, linear.bias)
        module.weight = nn.Parameter(linear.weight.detach().float().clone())
        return module

    @classmethod
    def from_codes(cls, codes: torch.Tensor, gamma: torch.Tensor, scheme: TernaryScheme, scale_dtype: torch.dtype,
                   bias: torch.Tensor | None = None) -> TernaryLinear:
        module = cls(codes.shape[1], codes.shape[0], scheme, scale_dtype, bias)
        module.codes, module.gamma = codes.to(torch.int8), gamma.float()
        return module

    @property
    def frozen(self) -> bool:
        return self.codes is not None

    def ternarize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, gamma as stored) of the current weights."""
        if self.frozen:
            return self.codes, self.gamma
        gamma = absmean_scale(self.weight, self.scheme)
        return ternary_codes(self.weight, gamma), stored_scale(gamma, self.scheme, self.scale_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        codes, gamma = self.ternarize()
        return codes.float() * expand_scale(gamma, self.in_features)

    def quantized(self) -> TernaryTensor:
        """Codes and stored scale, as the output formats take them."""
        codes, gamma = self.ternarize()
        return TernaryTensor(codes, gamma, self.scheme, self.scale_dtype)

    def freeze(self) -> None:
        """Keep only codes and scale; the latent weight is dropped."""
        self.codes, self.gamma = self.ternarize()
        self.weight = None

    def as_linear(self) -> nn.Linear:
        """A plain Linear holding the latent float weight (what the rounding then ternarizes)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.weight.detach(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.frozen and self.scheme.granularity == "tensor":
            return self._integer_forward(x, bias)
        x = quantize_activations(x)
        dequantized = self.dequantized_weight().to(x.dtype)
        # straight-through: the forward sees the ternary weight, the gradient reaches the latent one unchanged
        weight = dequantized if self.frozen else self.weight + (dequantized - self.weight).detach()
        return F.linear(x, weight.to(x.dtype), bias)

    def _integer_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """int8 activations times ternary codes, then one division by both scales: BitLinear's exact order,
        so a transformers-loaded checkpoint gives the same floats (rounding flips would compound over layers)."""
        x_scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_SCALE)
        x_int = (x * x_scale).round().clamp(-128, 127)
        inverse_gamma = (1.0 / self.gamma.reshape(1)).to(self.scale_dtype).to(x.dtype)
        y = F.linear(x_int, self.codes.to(x.dtype)) / (inverse_gamma * x_scale)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scale={self.scheme.granularity}, {'frozen' if self.frozen else 'latent'}")


def ternarize_model(model: nn.Module, linear_names: list[str], scheme: TernaryScheme) -> dict[str, TernaryLinear]:
    """Replace the named Linears by latent TernaryLinear modules in place; returns them by name."""
    replaced = {}
    for name in linear_names:
        linear = model.get_submodule(name)
        scheme.check(name, linear.in_features)
        replaced[name] = TernaryLinear.from_linear(linear, scheme)
        model.set_submodule(name, replaced[name])
    return replaced


def ternary_modules(model: nn.Module) -> dict[str, TernaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}


def trainable_parameters(student: nn.Module) -> list[nn.Parameter]:
    """What fine-tuning trains: latent ternary weights and norm weights (not embeddings, lm_head, biases)."""
    params = []
    for module in student.modules():
        if isinstance(module, TernaryLinear) and module.weight is not None:
            params.append(module.weight)
        elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            params.append(module.weight)
    return params


class BitNet(RTN):
    """Round-to-nearest onto the target's ternary grid, after optional ternary-aware fine-tuning."""

    name = "bitnet"
    ternary = True
    whole_model = True

    @property
    def side_files(self) -> tuple[str, ...]:
        return ("qat_loss.png", "qat_loss.json") if self.options.qat_steps > 0 else ()

    def check(self, config) -> None:
        if self.options.qat_steps > 0 and config.run.calib is None:
            raise LlmqError("--qat-steps needs --calib FILE (text to fine-tune on)")
        opts = self.options
        if opts.qat_steps < 0 or opts.qat_batch < 1 or opts.qat_seqlen < 2 or not 0 < opts.qat_lr < 1:
            raise LlmqError("--qat-steps must be 0 or more, --qat-batch at least 1, --qat-seqlen at least 2 and "
                            "--qat-lr a positive rate below 1 (e.g. 5e-4)")
        if self.options.ternary_scale not in GRANULARITIES:
            raise LlmqError(f"--ternary-scale {self.options.ternary_scale} is not known; "
                            f"use one of {', '.join(GRANULARITIES)}")

    def prepare_model(self, model: nn.Module, context: ModelContext) -> str:
        opts = self.options
        scheme = ternary_scheme(context.config)
        description = f"post-training ternary (absmean, per {scheme.granularity})"
        if opts.qat_steps <= 0:
            return description
        teacher = copy.deepcopy(model)  # stays in its dtype: half the memory
        ternarize_model(model, context.linears, scheme)
        qat = QATConfig(steps=opts.qat_steps, lr=opts.qat_lr, batch_size=opts.qat_batch, seqlen=opts.qat_seqlen)
        text = calibration_text(context.config.run.calib)
        windows = training_windows(tokenize_text(context.tokenizer, text), qat.seqlen)
        result = distill(model, teacher, windows, qat, context.device, trainable_parameters(model))
        model.to("cpu")
        del teacher
        last = result.losses[-20:]
        description += (f", then {qat.steps} steps of ternary-aware distillation ({result.tokens} tokens, "
                        f"{result.seconds:.0f} s, final KL {sum(last) / len(last):.3f})")
        save_loss_curve(result, context.artifact("qat_loss.png"), f"ternary fine-tuning, {qat.steps} steps")
        for name, module in ternary_modules(model).items():  # the rounding ternarizes the trained weights
            model.set_submodule(name, module.as_linear())
        return description
