"""Round-to-nearest: the baseline every other method must beat.

It takes the grid's own fit and its nearest integers. It needs no data; on grids whose fit weighs the error by
an importance per input channel (GGUF's block types), calibration text, when given, makes it the
imatrix-weighted rounding llama.cpp users know.
"""

from __future__ import annotations

from llmq.core.interfaces import Grid, Method, Quantized


class RTN(Method):
    name = "rtn"

    def quantize(self, weight, stats, grid: Grid) -> Quantized:
        fit = grid.fit(weight, None if stats is None else stats.importance())
        return fit.result(fit.nearest())
