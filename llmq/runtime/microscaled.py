"""NVFP4 / NVFP4A16 / MXFP4A16 / MXFP8A16 Linears on the CPU: the element codes and group scales kept as stored,
decoded to float32 per call (one layer at a time) and multiplied densely, the way compressed-tensors decodes them;
NVFP4's and MXFP4 / MXFP8's inputs rounded first, as compressed-tensors rounds them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmq.core.scheme import QuantScheme, dequantize
from llmq.methods.grids.microscaling import e8m0_values, mx_inputs, nvfp4_inputs, unpack_e2m1


class MicroscaledLinear(nn.Module):
    """A Linear held in compressed-tensors' microscaling layout (buffers under the checkpoint's names)."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in]: elements times (S / g) for NVFP4, times 2^e for MX (compressed-tensors' arithmetic)."""
        if self.scheme.bits == 4:
            elements = unpack_e2m1(self.weight_packed)
        else:
            elements = self.weight.float()
        if self.scheme.weight_type == "nvfp4":
            scale = self.weight_scale.float() / self.weight_global_scale.float()
        else:
            scale = e8m0_values(self.weight_scale)
        return dequantize(elements, scale, None, self.scheme.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.static_inputs:  # NVFP4 (W4A4): the inputs rounded as the serving kernel rounds them
            x = nvfp4_inputs(x, self.input_global_scale)
        elif self.scheme.input_group_size:  # MXFP4 / MXFP8 (W4A4 / W8A8): a power-of-two scale per 32 inputs
            x = mx_inputs(x, self.scheme.weight_type)
        weight = self.dequantized_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"
