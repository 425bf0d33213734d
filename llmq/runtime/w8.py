"""8-bit per-channel Linears read from compressed-tensors' `int-quantized` / `float-quantized` checkpoints: int8 or
FP8 E4M3 weights with one scale per output row, and (W8A8) each input row quantized as the format specifies
(compressed-tensors' reference maths): per token at run time with its own scale, or (static) with the Linear's
one `input_scale` from calibration:

    s_x = max|x_row| / (range / 2)             dynamic; range: 255 for int8 (s_x = max / 127.5), 896 for FP8
    x_q = clamp(round(x / s_x), -128, 127)      int8;   FP8: e4m3(clamp(x / s_x, +-448));   int16: +-32768
    y   = (x_q @ W_q^T) * s_x * s_w^T + b

int8 x int8 runs as one integer GEMM (torch._int_mm: exact int32 sums) where torch has it, else in float32 on the
codes; FP8 products of codes are exact in float32 (4-bit significands), their sums round there. int16 inputs
(TFLite's 16x8, an evaluation scheme) are simulated: their products with int8 codes are summed in float32.

The same formats hold the schemes whose inputs are 8-bit but whose weights are not 8-bit per channel: W4A8 /
W4AFP8 (int4 values in int8 tensors, one scale per group of columns) and FP8_BLOCK (E4M3 weights, one scale per
128 x 128 block; inputs with a scale per 128 values of a token). Those inputs are rounded exactly as compressed-tensors
rounds them at run time, in the input's dtype (fake_quantize_inputs, tested to the bit), and multiplied in float32
with the decoded weight: an emulation of the serving kernels, which sum the same products in another order.
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.core.scheme import QuantScheme, expand_blocks, round_input_codes


def quantize_rows(x: torch.Tensor, scheme: QuantScheme,
                  static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float32 holding integer or E4M3 values) of a [rows, K] input and their scale: each row's own [rows, 1],
    or the static one."""
    x = x.float()
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1)
    else:
        scale = x.abs().amax(dim=-1, keepdim=True) / scheme.act_half_range
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: codes 0 under any scale
    return round_input_codes(x / scale, scheme), scale


def fake_quantize_inputs(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """x rounded to the scheme's dynamic input grid and decoded, in x's dtype, with compressed-tensors' own
    arithmetic (scale = max|x| / half range in x's dtype, per token or per input group; an all-zero one gets the
    dtype's eps): what transformers applies to these files, bit for bit."""
    group = scheme.input_group_size
    groups = x if group is None else x.unflatten(-1, (x.shape[-1] // group, group))
    scale = groups.abs().amax(-1, keepdim=True) / scheme.act_half_range
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    codes = round_input_codes(groups / scale, scheme).to(x.dtype)
    rounded = (codes * scale).to(x.dtype)
    return rounded if group is None else rounded.flatten(-2)


def _int_mm_works(device: torch.device) -> bool:
    try:
        probe = torch.ones(1, 8, dtype=torch.int8, device=device)
        return torch.equal(torch._int_mm(probe, probe.T.contiguous()), torch.full((1, 1), 8, dtype=torch.int32,
                                                                                    device=device))
    except (RuntimeError, AttributeError):  # no kernel for this device / torch
        return False


class W8Linear(nn.Module):
    """y = x W^T + b for the unpacked formats' weights (int8 / FP8 per channel, int4 groups, FP8 blocks), inputs
    quantized when the scheme says so."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, weight: torch.Tensor,
                 weight_scale: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight", weight)  # int8 or float8_e4m3fn [out, in]
        self.register_buffer("weight_scale", weight_scale)  # [out, 1]; [out, groups]; FP8_BLOCK [out/128, in/128]
        self.register_buffer("input_scale", input_scale)  # [1] with static inputs, else None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._int_mm: bool | None = None

    def dequantized_weight(self) -> torch.Tensor:
        scale = self.weight_scale.float()
        if self.scheme.fp8_blocks:  # [out / 128, in / 128], the blocks at the edges partial
            scale = expand_blocks(scale, self.out_features, self.in_features)
        elif scale.shape[1] > 1:  # int4 groups
            scale = scale.repeat_interleave(self.in_features // scale.shape[1], dim=1)
        return self.weight.float() * scale

    def _apply(self, fn, recurse=True):  # another device may lack the integer GEMM: ask again there
        self._int_mm = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, shape[-1])
        if self.scheme.act_bits is None:
            y = rows.float() @ self.dequantized_weight().T
        elif self.scheme.bits == 4 or self.scheme.fp8_blocks:  # W4A8 / W4AFP8, FP8_BLOCK: emulated
            y = fake_quantize_inputs(rows, self.scheme).float() @ self.dequantized_weight().T
        else:
            codes, scale = quantize_rows(rows, self.scheme, self.input_scale)
            y = self._code_product(codes) * scale * self.weight_scale.float().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def _code_product(self, codes: torch.Tensor) -> torch.Tensor:
        """x_q @ W_q^T in float32: exact for int8 through the integer GEMM."""
        if not self.scheme.float_inputs and self.scheme.act_bits == 8:
            if self._int_mm is None:
                self._int_mm = _int_mm_works(codes.device)
            if self._int_mm:
                return torch._int_mm(codes.to(torch.int8), self.weight.T).float()
        return codes @ self.weight.float().T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"
