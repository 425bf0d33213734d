"""8-bit per-channel Linears read from compressed-tensors' `int-quantized` / `float-quantized` checkpoints: int8 or
FP8 E4M3 weights with one scale per output row, and (W8A8) each input row quantized at run time with its own
scale, as the format's dynamic per-token input quantization specifies (compressed-tensors' reference maths):

    s_x = max|x_row| / (range / 2)             range: 255 for int8 (s_x = max / 127.5), 896 for FP8 (max / 448)
    x_q = clamp(round(x / s_x), -128, 127)      int8;   FP8: e4m3(clamp(x / s_x, +-448))
    y   = (x_q @ W_q^T) * s_x * s_w^T + b

int8 x int8 runs as one integer GEMM (torch._int_mm: exact int32 sums) where torch has it, else in float32 on the
codes; FP8 products of codes are exact in float32 (4-bit significands), their sums round there.
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.core.scheme import FP8_MAX, QuantScheme

INT8_HALF_RANGE = 127.5  # (127 - (-128)) / 2


def quantize_rows(x: torch.Tensor, weight_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float32 holding int8 or E4M3 values) and the per-row scale [rows, 1] of a [rows, K] input."""
    x = x.float()
    half_range = INT8_HALF_RANGE if weight_type == "int" else FP8_MAX
    scale = x.abs().amax(dim=-1, keepdim=True) / half_range
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: codes 0 under any scale
    if weight_type == "int":
        return torch.round(x / scale).clamp(-128, 127), scale
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float(), scale


def _int_mm_works(device: torch.device) -> bool:
    try:
        probe = torch.ones(1, 8, dtype=torch.int8, device=device)
        return torch.equal(torch._int_mm(probe, probe.T.contiguous()), torch.full((1, 1), 8, dtype=torch.int32,
                                                                                    device=device))
    except (RuntimeError, AttributeError):  # no kernel for this device / torch
        return False


class W8Linear(nn.Module):
    """y = x W^T + b for int8 / FP8 per-channel weights, inputs quantized per token when the scheme says so."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, weight: torch.Tensor,
                 weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight", weight)  # int8 or float8_e4m3fn [out, in]
        self.register_buffer("weight_scale", weight_scale)  # [out, 1]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._int_mm: bool | None = None

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float()

    def _apply(self, fn, recurse=True):  # another device may lack the integer GEMM: ask again there
        self._int_mm = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, shape[-1])
        if self.scheme.act_bits is None:
            y = rows.float() @ self.dequantized_weight().T
        else:
            codes, scale = quantize_rows(rows, self.scheme.weight_type)
            y = self._code_product(codes) * scale * self.weight_scale.float().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def _code_product(self, codes: torch.Tensor) -> torch.Tensor:
        """x_q @ W_q^T in float32: exact for int8 through the integer GEMM."""
        if self.scheme.weight_type == "int":
            if self._int_mm is None:
                self._int_mm = _int_mm_works(codes.device)
            if self._int_mm:
                return torch._int_mm(codes.to(torch.int8), self.weight.T).float()
        return codes @ self.weight.float().T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"
