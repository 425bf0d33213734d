"""The CPU path of QuantLinear.

Two ways to multiply by a packed 4-bit weight, chosen by the number of activation rows and their dtype:
- short inputs (decoding): torch's own CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) on a copy of the
  weight repacked once into its layout; it never materializes the dense weight. It is fast only with bf16
  activations (AVX512-BF16/AMX): measured on this project's 2-core Sapphire Rapids, a 1536x576 layer takes
  0.06 ms at 1 row and 1.4 ms at 128 rows in bf16 against 2.5 ms for dequantize + GEMM, but 0.74 ms per row
  in float32 (dequantize + GEMM: 2.0 ms at any small M), hence the per-dtype limits below;
- everything else: dequantize the layer to float32 (one layer at a time, nothing cached) and run one dense
  GEMM. (Unpacking bytes through a 256-entry table halved the dequantization in isolation but gave no
  measurable gain in a whole forward pass and a higher peak memory, so it is not used.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.runtime.kernels.reference import dequantize_packed
from llmq.targets.packing import unpack_int32

# at or below this many activation rows the int4 kernel beats dequantize + GEMM (measured as described above)
INT4_MAX_ROWS = {torch.bfloat16: 128, torch.float32: 2, torch.float16: 1}
_INT4_GROUPS = (32, 64, 128, 256)


def quant_linear_cpu(x, weight_packed, weight_scale, weight_zero_point, in_features, bits, bias) -> torch.Tensor:
    """Dequantize to float32, then a dense GEMM in x's dtype."""
    weight = dequantize_packed(weight_packed, weight_scale, weight_zero_point, in_features, bits)
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


@dataclass
class Int4PackCPU:
    """A 4-bit weight in torch's CPU int4 layout: w = (u - 8) * scale + zero, u unsigned, per group."""

    packed: torch.Tensor  # uint8, torch's opaque layout
    scales_and_zeros: torch.Tensor  # float32 [K/g, N, 2]
    group: int
    out_features: int


def int4_supported(bits: int, in_features: int, group: int) -> bool:
    return bits == 4 and group in _INT4_GROUPS and in_features % group == 0 and hasattr(
        torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def repack_int4_cpu(weight_packed, weight_scale, weight_zero_point, in_features: int) -> Int4PackCPU:
    """compressed-tensors (w = (q - z) * s, q signed) -> torch's int4 (w = (u - 8) * s + zero): zero = -z * s."""
    out_features, groups = weight_scale.shape
    unsigned = (unpack_int32(weight_packed, 4, in_features).to(torch.int32) + 8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 8)
    scale = weight_scale.float()
    zero = torch.zeros_like(scale) if weight_zero_point is None else unpack_int32(
        weight_zero_point, 4, out_features, dim=0).float()
    scales_and_zeros = torch.stack([scale.T, (-zero * scale).T], dim=-1).contiguous()
    return Int4PackCPU(packed, scales_and_zeros, in_features // groups, out_features)


def int4_linear_cpu(x: torch.Tensor, weight: Int4PackCPU, bias: torch.Tensor | None) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight.packed, weight.group,
                                                   weight.scales_and_zeros.to(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], weight.out_features)
