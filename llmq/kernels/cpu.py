"""The CPU path of QuantLinear: dequantize the layer's weight on the fly, then one dense GEMM.

Weights stay packed in memory between calls; only one layer's dense weight exists at a time.
"""

from __future__ import annotations

import torch

from llmq.kernels.reference import dequantize_packed


def quant_linear_cpu(x, weight_packed, weight_scale, weight_zero_point, in_features, bits, bias) -> torch.Tensor:
    weight = dequantize_packed(weight_packed, weight_scale, weight_zero_point, in_features, bits)
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
