"""What a static input scale is chosen from: the calibration values that reached a Linear.

`--act-range max` keeps the largest |x| (never clipped). `--act-range mse` also counts every |x| in a histogram of
fixed log2 bins (BINS_PER_OCTAVE per octave from 2^LOW to 2^HIGH: ~1% wide, the same bins in every process, so
counts add across ranks without re-binning) and picks the scale whose rounding and clipping error over that
histogram is least:

    error(s) = sum_b count_b * (c_b - Q_s(c_b))^2        c_b the bin's centre, Q_s the scheme's input rounding
    s*       = argmin over s = max|x| * f / half_range,  f in (0, 1]

A few tokens of an LLM's Linear inputs are 10-100x larger than the rest (down_proj's gated product most of all).
One int8 scale that keeps them leaves every other value a handful of levels; clipping them to a smaller range
costs less overall (on SmolLM2, static int8 inputs: perplexity 59 with the maximum, 37 at the least error,
4 windows). That is what the flag asks for: the calibration maximum is then clipped by design.
"""

from __future__ import annotations

from typing import Callable

import torch

LOW, HIGH, BINS_PER_OCTAVE = -40, 24, 64
BINS = (HIGH - LOW) * BINS_PER_OCTAVE
FRACTIONS = torch.linspace(1.0, 0.02, 200, dtype=torch.float64)  # candidate clip points, as fractions of max|x|


class AbsHistogram:
    """Counts of |x| over every value seen, in fixed log2 bins; |x| below 2^LOW counts in the first bin."""

    def __init__(self, device: torch.device):
        self.counts = torch.zeros(BINS, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        magnitude = x.detach().reshape(-1).float().abs().clamp_(min=2.0**LOW).log2_()
        bins = magnitude.sub_(LOW).mul_(BINS_PER_OCTAVE).floor_().clamp_(0, BINS - 1).long()
        self.counts += torch.bincount(bins, minlength=BINS).to(self.counts)

    @staticmethod
    def centres(device=None) -> torch.Tensor:
        return 2.0 ** (LOW + (torch.arange(BINS, dtype=torch.float64, device=device) + 0.5) / BINS_PER_OCTAVE)

    def least_error_maximum(self, top: float, round_codes: Callable[[torch.Tensor], torch.Tensor],
                            half_range: float) -> float:
        """The clip point m (the scale is m / half_range) among FRACTIONS of `top` whose error over the histogram
        is least; `round_codes` is the scheme's rounding of x / scale to its codes (clamped to the range)."""
        if top <= 0 or not bool(self.counts.any()):
            return top
        used = self.counts > 0
        values, counts = self.centres(self.counts.device)[used], self.counts[used]
        maxima = FRACTIONS.to(values.device) * top
        scales = (maxima / half_range)[:, None]
        codes = round_codes((values[None, :] / scales).float()).double()
        errors = ((values[None, :] - codes * scales) ** 2 * counts[None, :]).sum(1)
        return float(maxima[int(errors.argmin())])
