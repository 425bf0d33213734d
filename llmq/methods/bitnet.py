"""BitNet b1.58 ternary weights: W ~ gamma * clip(round(W / gamma), -1, 1), with gamma = mean |W|.

The scale gamma is per tensor (BitNet b1.58, and the only one transformers' BitNet layout stores), per output
channel, or per group of input columns. Activations entering a ternary Linear are quantized to int8 per
token (absmax), as BitNet b1.58 and transformers' BitLinear do, so the model llmq evaluates is the model a
loader runs.

`TernaryLinear` has two lives:
- *latent*: it keeps a float weight and ternarizes it on every forward, with straight-through estimators
  for both roundings, so ternary-aware fine-tuning (llmq/qat.py) trains the float weight;
- *frozen*: it keeps only the int8 codes and the scale, which is what the output formats store.
Post-training ternary is latent -> frozen at once. Ternary needs no calibration statistics, so it does not
go through the layer-by-layer harness; fine-tuning is a whole-model loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmq.errors import LlmqError

GRANULARITIES = ("tensor", "channel", "group")
_MIN_SCALE = 1e-5  # BitNet's clamp: an all-zero tensor keeps a finite scale


@dataclass(frozen=True)
class TernaryScheme:
    granularity: str = "tensor"  # tensor | channel | group
    group_size: int = 256  # input columns per scale when granularity == "group"

    def check(self, name: str, in_features: int) -> None:
        if self.granularity not in GRANULARITIES:
            raise LlmqError(f"--ternary-scale {self.granularity} is not known; use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and (self.group_size < 1 or in_features % self.group_size):
            raise LlmqError(f"--group-size {self.group_size} does not divide {name} ({in_features} columns); "
                            "pick a divisor or use --ternary-scale channel")


def absmean_scale(weight: torch.Tensor, scheme: TernaryScheme) -> torch.Tensor:
    """gamma, shaped to broadcast against weight [out, in]: [1, 1], [out, 1] or [out, in // group]."""
    w = weight.detach().float().abs()
    if scheme.granularity == "tensor":
        gamma = w.mean().reshape(1, 1)
    elif scheme.granularity == "channel":
        gamma = w.mean(dim=1, keepdim=True)
    else:
        gamma = w.reshape(w.shape[0], -1, scheme.group_size).mean(dim=-1)
    return gamma.clamp_min(_MIN_SCALE)


def expand_scale(gamma: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out|1, in // g] -> broadcastable against [out, in] (per-group scales repeated over their columns)."""
    return gamma.repeat_interleave(in_features // gamma.shape[1], dim=1) if gamma.shape[1] > 1 else gamma


def stored_scale(gamma: torch.Tensor, scheme: TernaryScheme, dtype: torch.dtype) -> torch.Tensor:
    """gamma as the output format will read it back.

    Per tensor (transformers' layout) the checkpoint stores 1 / gamma in the model's dtype; per channel or
    group only GGUF can hold it, as each 256-block's fp16 scale.
    """
    if scheme.granularity == "tensor":
        return 1.0 / (1.0 / gamma).to(dtype).float()
    return gamma.to(torch.float16).float()


def ternary_codes(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """int8 codes in {-1, 0, 1}: round(W / gamma) clipped."""
    return (weight.detach().float() / expand_scale(gamma, weight.shape[1])).round().clamp(-1, 1).to(torch.int8)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake quantization (BitLinear's), straight-through in the backward pass."""
    scale = 127.0 / x.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(_MIN_SCALE)
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

    def freeze(self) -> None:
        """Keep only codes and scale; the latent weight is dropped."""
        self.codes, self.gamma = self.ternarize()
        self.weight = None

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
        x_scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_SCALE)
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
        parent, _, child = name.rpartition(".")
        replaced[name] = TernaryLinear.from_linear(linear, scheme)
        model.get_submodule(parent).register_module(child, replaced[name])
    return replaced


def ternary_modules(model: nn.Module) -> dict[str, TernaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}


def relative_error(model: nn.Module, originals: dict[str, torch.Tensor]) -> float:
    """||W - W_ternary||^2 / ||W||^2 over the ternary Linears (originals: name -> float weight)."""
    num = den = 0.0
    for name, module in ternary_modules(model).items():
        w = originals[name].float()
        num += (module.dequantized_weight() - w).pow(2).sum().item()
        den += w.pow(2).sum().item()
    return num / max(den, 1e-30)


__all__ = ["GRANULARITIES", "TernaryLinear", "TernaryScheme", "absmean_scale", "quantize_activations",
           "stored_scale", "ternarize_model", "ternary_codes", "ternary_modules"]
