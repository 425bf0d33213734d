"""Seconds per stage of a run, so that a slow stage shows in the summary instead of hiding in a total.

    with stage_clock("statistics"):
        ...
    stage_clock.seconds  # {"statistics": 12.3, ...}: time inside each stage, less the stages nested in it

A stage nested in another (GPTQ's factorization inside the rounding of a group) counts for itself only, so the
stages add up to the time they cover. On a GPU, each stage waits for the device's work before it stops
its watch (CUDA calls return before the work is done).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class StageClock:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._nested: list[float] = []  # per open stage: seconds spent in stages opened inside it
        self.open: list[str] = []  # the stages open now, outermost first (what a memory sampler tags with)

    def reset(self) -> None:
        self.seconds.clear()
        self._nested.clear()
        self.open.clear()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        _synchronize()
        started = time.perf_counter()
        self._nested.append(0.0)
        self.open.append(stage)
        try:
            yield
        finally:
            _synchronize()
            elapsed = time.perf_counter() - started
            self.open.pop()
            nested = self._nested.pop()
            self.seconds[stage] += elapsed - nested
            if self._nested:
                self._nested[-1] += elapsed

    def summary(self) -> str:
        """'statistics 12 s, column sweep 3.1 s, ...', longest first (stages under 10 ms left out)."""
        ordered = sorted(((s, t) for s, t in self.seconds.items() if t >= 0.01), key=lambda item: -item[1])
        return ", ".join(f"{stage} {seconds:.2g} s" if seconds < 10 else f"{stage} {seconds:.0f} s"
                         for stage, seconds in ordered)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


stage_clock = StageClock()  # the run's clock: llmq.quantize resets it and reports it
