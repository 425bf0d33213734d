"""Round-to-nearest: the baseline every other method must beat. No calibration data."""

from __future__ import annotations

import torch

from llmq.methods.base import Method
from llmq.methods.grid import QuantizedTensor, group_qparams, quantize_values, to_quantized_tensor


class RTN(Method):
    name = "rtn"
    needs_calibration = False

    def quantize(self, weight: torch.Tensor, stats, scale_dtype: torch.dtype) -> QuantizedTensor:
        scheme = self.scheme
        group_size = scheme.group_size_for(weight.shape[1])
        scale, zero = group_qparams(weight, scheme, scale_dtype, mse=self.options.mse)
        expand = lambda t: None if t is None else t.repeat_interleave(group_size, dim=1)  # noqa: E731
        q = quantize_values(weight, expand(scale), expand(zero), scheme)
        return to_quantized_tensor(q, scale, zero, scheme, scale_dtype)
