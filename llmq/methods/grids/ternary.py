"""BitNet b1.58's ternary grid: W ~ gamma * clip(round(W / gamma), -1, 1), with gamma = mean |W|.

The scale gamma is per tensor (BitNet b1.58, and the only one transformers' BitNet layout stores), per output
channel, or per group of input columns. Fitting the grid is computing gamma ("absmean"); the stored gamma is
what the output format reads back (per tensor: 1 / gamma in the model's dtype; per channel or group: GGUF's
fp16 block scale).

`ProjectedGrid` puts ternary weights into another grid that holds them exactly (GGUF's TQ1_0 / TQ2_0, whose
block scale is the block's absmax, and the Q4_0 fallback): the weight is first rounded onto the ternary grid,
then the other grid is fitted on those values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.core.config import QuantizeConfig
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Grid, GridFit, Quantized
from llmq.core.records import record

GRANULARITIES = ("tensor", "channel", "group")
MIN_SCALE = 1e-5  # BitNet's clamp: an all-zero tensor keeps a finite scale


@record
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


def ternary_scheme(config: QuantizeConfig) -> TernaryScheme:
    """The run's ternary scheme: --ternary-scale, and --group-size for per-group scales."""
    return TernaryScheme(config.method.ternary_scale, config.scheme.group_size)


def absmean_scale(weight: torch.Tensor, scheme: TernaryScheme) -> torch.Tensor:
    """gamma, shaped to broadcast against weight [out, in]: [1, 1], [out, 1] or [out, in // group]."""
    w = weight.detach().float().abs()
    if scheme.granularity == "tensor":
        gamma = w.mean().reshape(1, 1)
    elif scheme.granularity == "channel":
        gamma = w.mean(dim=1, keepdim=True)
    else:
        gamma = w.reshape(w.shape[0], -1, scheme.group_size).mean(dim=-1)
    return gamma.clamp_min(MIN_SCALE)


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


@record
@dataclass
class TernaryTensor:
    """Ternary codes and the stored scale of one weight."""

    codes: torch.Tensor  # int8 [out, in] in {-1, 0, 1}
    gamma: torch.Tensor  # float32, broadcastable: [1, 1], [out, 1] or [out, in // group]
    scheme: TernaryScheme
    scale_dtype: torch.dtype  # the model's dtype (the per-tensor inverse scale is stored in it)

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * expand_scale(self.gamma, self.codes.shape[1])

    def rows(self, rows: slice) -> TernaryTensor:
        gamma = self.gamma if self.gamma.shape[0] == 1 else self.gamma[rows]
        return TernaryTensor(self.codes[rows].to("cpu", copy=True), gamma.to("cpu", copy=True), self.scheme,
                             self.scale_dtype)


class TernaryGrid(Grid):
    def __init__(self, scheme: TernaryScheme, scale_dtype: torch.dtype):
        self.scheme, self.scale_dtype = scheme, scale_dtype

    def fit(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> TernaryFit:
        return TernaryFit(self, weight)


class TernaryFit(GridFit):
    def __init__(self, grid: TernaryGrid, weight: torch.Tensor):
        self.grid, self.weight = grid, weight
        self.gamma = absmean_scale(weight, grid.scheme)  # integers are chosen on gamma itself ...
        self.stored = stored_scale(self.gamma, grid.scheme, grid.scale_dtype)  # ... and decode with the stored one

    def _expanded(self, gamma: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return expand_scale(gamma, self.weight.shape[1])[:, columns] if gamma.shape[1] > 1 else gamma

    def nearest(self) -> torch.Tensor:
        return ternary_codes(self.weight, self.gamma).float()

    def position(self, w, columns):
        return w.float() / self._expanded(self.gamma, columns)

    def round(self, w, columns):
        return self.position(w, columns).round().clamp(-1, 1)

    def clamp(self, q):
        return q.clamp(-1, 1)

    def value(self, q, columns):
        return q * self._expanded(self.stored, columns)

    def result(self, integers: torch.Tensor) -> TernaryTensor:
        return TernaryTensor(integers.to(torch.int8), self.stored, self.grid.scheme, self.grid.scale_dtype)


class ProjectedGrid(Grid):
    """Round onto `first` (nearest), then hold those values in `then`: for grids that hold them exactly.

    `then` may also keep floats (a GGUF F16 fallback row): then the projected values are kept.
    """

    def __init__(self, first: Grid, then: Grid):
        self.first, self.then = first, then
        self.rounds = then.rounds

    def _project(self, weight: torch.Tensor) -> torch.Tensor:
        fit = self.first.fit(weight)
        projected: Quantized = fit.result(fit.nearest())
        return projected.dequantize().to(weight.device)

    def fit(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> GridFit:
        return self.then.fit(self._project(weight))

    def keep(self, weight: torch.Tensor) -> Quantized:
        return self.then.keep(self._project(weight))
