"""Statistics of a group's input that the harness collects over the calibration tokens, for the methods to read.

- "importance": mean x^2 per input channel (llama.cpp's imatrix), for grids whose fit weights its error;
- "hessian": 2 E[x x^T], what GPTQ's error compensation needs (its diagonal doubles as the importance);
- "range": only the largest |x| per input channel, which every collector also keeps (static input scales), and
  when asked (`--act-range mse`) a histogram of every |x| (llmq/core/ranges.py).

A method names the one it needs (`Method.statistic`); nothing here knows which method reads it.
"""

from __future__ import annotations

import contextlib

import torch

from llmq.core.ranges import AbsHistogram
from llmq.core.ranks import max_across, sum_across


@contextlib.contextmanager
def _exact_bf16_products():
    """On CPU, let oneDNN multiply float32 matrices as bf16 with float32 accumulation.

    Only used on inputs that are bf16 values already, where this is exact and about 2.5x faster.
    """
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    previous = getattr(mkldnn_matmul, "fp32_precision", None)
    if previous is None:
        yield
        return
    mkldnn_matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        mkldnn_matmul.fp32_precision = previous


class RangeCollector:
    """The largest |x| per input channel over the calibration tokens (what a static input scale is made of), and
    with `histogram` the counts of every |x| (for a scale of least error)."""

    def __init__(self, in_features: int, device: torch.device, histogram: bool = False):
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.histogram = AbsHistogram(device) if histogram else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        self._track(x)
        self.tokens += x.reshape(-1, x.shape[-1]).shape[0]

    def _track(self, x: torch.Tensor) -> None:
        torch.maximum(self.absmax, x.reshape(-1, x.shape[-1]).abs().amax(0).float(), out=self.absmax)
        if self.histogram is not None:
            self.histogram.add(x)

    def _ranges_across_ranks(self) -> None:
        max_across([self.absmax])
        if self.histogram is not None:
            sum_across([self.histogram.counts])

    def sum_across_ranks(self) -> None:
        self._ranges_across_ranks()
        count = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.absmax.device)
        sum_across([count])
        self.tokens = int(count.item())

    def importance(self) -> torch.Tensor | None:
        return None  # a range alone weighs no channel above another


class ImportanceCollector(RangeCollector):
    """Mean of x^2 per input channel (llama.cpp's imatrix entry for a Linear)."""

    def __init__(self, in_features: int, device: torch.device, histogram: bool = False):
        super().__init__(in_features, device, histogram)
        self.sum_x2 = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        super().add(x)
        self.sum_x2 += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)

    def sum_across_ranks(self) -> None:
        """Each rank saw its share of the windows: the sums over all of them (torch.distributed runs)."""
        self._ranges_across_ranks()
        (tokens,) = sum_across([self.sum_x2], self.tokens)
        self.tokens = int(tokens)

    def importance(self) -> torch.Tensor:
        return self.sum_x2 / max(self.tokens, 1)

    def hessian(self) -> torch.Tensor:
        raise TypeError("an importance collector holds no Hessian; the method must declare statistic = 'hessian'")


class HessianCollector(RangeCollector):
    """Sum of x x^T over every calibration token, in float32.

    The first token of each calibration sequence ([batch, seq, features] inputs) counts `sink_weight` times. In
    causal LMs that token is the attention sink: every later token puts much of its attention on it, so an error
    in what a layer makes of it (its value, its key, its residual stream) reaches every later position. Plain
    GPTQ treats it as 1 of 512 tokens and trades its error away: on SmolLM2 Q4_0, v_proj's error on that token
    rose 2-4x in layers 12-28 while every other token's fell, and perplexity rose with it (issue 4).
    """

    def __init__(self, in_features: int, device: torch.device, sink_weight: float = 1.0, histogram: bool = False):
        super().__init__(in_features, device, histogram)
        self.sum_xxt = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0.0
        self.sink_weight = sink_weight
        self._hessian: torch.Tensor | None = None  # the sum, scaled in place once it is asked for
        self._diagonal: torch.Tensor | None = None
        self.derived: dict = {}  # what a method derives from the Hessian once for all of the group's parts

    def add(self, x: torch.Tensor) -> None:
        self._track(x)
        if x.dim() == 3 and self.sink_weight != 1:
            x = x.clone()
            x[:, 0] *= self.sink_weight**0.5
            self.tokens += x.shape[0] * (self.sink_weight - 1)  # normalise per effective token
        x = x.reshape(-1, x.shape[-1])
        self.tokens += x.shape[0]
        exact_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
        with _exact_bf16_products() if exact_bf16 else contextlib.nullcontext():
            xf = x.float()
            for a, b in self._tiles():  # the lower triangle of tiles only: hessian() mirrors it
                self.sum_xxt[a:, a:b].addmm_(xf[:, a:].T, xf[:, a:b])

    def _tiles(self) -> list[tuple[int, int]]:
        """Column ranges of the tiles x x^T is summed in: 4 for a wide input (the upper triangle of tiles is never
        computed, 10/16 of the multiply-adds), one below 2048 features (not worth it)."""
        n = self.sum_xxt.shape[0]
        count = 4 if n >= 2048 else 1
        edges = [n * k // count for k in range(count + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def sum_across_ranks(self) -> None:
        """Each rank saw its share of the windows: the sums over all of them (torch.distributed runs). Float sums
        in another order than one process's: equal to float rounding."""
        max_across([self.absmax])
        (self.tokens,) = sum_across([self.sum_xxt], self.tokens)

    def hessian(self) -> torch.Tensor:
        """2 E[x x^T]: the sum scaled in place when first asked for (no second matrix of its size: Llama-3-8B's
        down_proj Hessian is 822 MB), then shared by every reader, which must not change it. Nothing may be
        added afterwards."""
        if self._hessian is None:
            for a, b in self._tiles()[:-1]:  # each tile above the diagonal tiles is its mirror's transpose
                self.sum_xxt[a:b, b:].copy_(self.sum_xxt[b:, a:b].T)
            self._diagonal = self.sum_xxt.diagonal().clone()
            self._hessian = self.sum_xxt.mul_(2.0 / max(self.tokens, 1))
            self.sum_xxt = None
        return self._hessian

    def importance(self) -> torch.Tensor:
        """Mean x^2 per channel: the Hessian's diagonal (sink-weighted like the Hessian), without the factor 2."""
        diagonal = self._diagonal if self._diagonal is not None else self.sum_xxt.diagonal()
        return diagonal / max(self.tokens, 1)


def new_collector(statistic: str | None, in_features: int, device: torch.device, sink_weight: float,
                  histogram: bool = False):
    """The collector for a statistic name ("hessian", "importance", "range"), or None; `histogram`: also count
    every |x| (a static input scale of least error)."""
    if statistic == "hessian":
        return HessianCollector(in_features, device, sink_weight, histogram)
    if statistic == "importance":
        return ImportanceCollector(in_features, device, histogram)
    if statistic == "range":
        return RangeCollector(in_features, device, histogram)
    if statistic is None:
        return None
    raise ValueError(f"unknown statistic {statistic!r}")
