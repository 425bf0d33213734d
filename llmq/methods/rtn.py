"""Round-to-nearest: the baseline every other method must beat. No calibration data."""

from __future__ import annotations

import torch

from llmq.methods.base import Method
from llmq.methods.grid import QuantizedTensor, round_to_nearest, to_quantized_tensor


class RTN(Method):
    name = "rtn"
    needs_calibration = False

    def quantize(self, weight: torch.Tensor, stats, scale_dtype: torch.dtype) -> QuantizedTensor:
        q, scale, zero = round_to_nearest(weight, self.scheme, scale_dtype, mse=self.options.mse)
        return to_quantized_tensor(q, scale, zero, self.scheme, scale_dtype)
