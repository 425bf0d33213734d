"""Static input scales for the 8-bit grids whose scheme quantizes each Linear's input with one scale fixed from
the calibration data (W8A8 `--act-static`): the harness measures the largest |x| that reached the Linear on the
calibration windows (on the outputs of the layers already quantized), and the scale follows from it
(llmq/core/scheme.py `static_input_scale`: the calibration maximum is never clipped), or with `--act-range mse` from
the histogram of every |x| it also counts (the scale of least error, llmq/core/ranges.py)."""

from __future__ import annotations

import dataclasses

import torch

from llmq.core.scheme import QuantizedTensor, static_input_scale


class StaticInputScale:
    """Mixed into a Grid that has `scheme` and `scale_dtype`."""

    @property
    def static_inputs(self) -> bool:
        return self.scheme.static_inputs

    @property
    def input_histogram(self) -> bool:
        return self.scheme.static_inputs and self.scheme.act_range == "mse"

    def mismatch(self, quantized) -> str | None:
        if not isinstance(quantized, QuantizedTensor) or quantized.scheme != self.scheme:
            made = quantized.scheme.name if isinstance(quantized, QuantizedTensor) else type(quantized).__name__
            return f"quantized as {made}, not {self.scheme.name}"
        return None

    def with_input_range(self, quantized: QuantizedTensor, absmax: torch.Tensor, histogram=None) -> QuantizedTensor:
        scale = static_input_scale(absmax, self.scheme, self.scale_dtype, histogram)
        return dataclasses.replace(quantized, input_scale=scale)
