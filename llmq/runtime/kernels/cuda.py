"""The CUDA path of QuantLinear for 4-bit weights: repack once at load, then pick a kernel by M.

Repacked form (see cuda/w4a16.cu): qweight int32 [N, K/8] (the checkpoint's words as they are), scales float16
and unsigned zero points uint8, [N, K/g] each (3 bytes per group): W = u * s - (u_zero * s), in float32.
`reference_w4` computes exactly that in plain torch; the tests hold the kernels to it.

Paths by the number of rows M of the activation matrix: M <= 8 gemv (memory-bound), M <= 128 tensor cores
(WMMA on dequantized tiles), larger M dequantize once + cuBLAS. Split-K when the output alone gives fewer
than two blocks per SM.

A second tensor-core kernel, "tc" (cuda/w4a16_tc.cu, any M), reads its own fragment-ordered copy of the weights
(fragments.py), made once at first use. It is not chosen by M yet: that needs its speed measured on a GPU
against the others (scripts/bench_kernel.py), so it runs only when asked: `path="tc"`, or LLMQ_W4_KERNEL=tc
for every packed Linear.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch

from llmq.runtime.kernels.fragments import BLOCK_N, STAGE_K, FragmentW4
from llmq.targets.packing import unpack_int32

GEMV_MAX_M = 8
MMA_MAX_M = 128
_MMA_N_TILE = 64


@dataclass
class PackedW4:
    qweight: torch.Tensor  # int32 [N, K/8]
    scales: torch.Tensor  # float16 [N, K/g]
    zeros: torch.Tensor  # uint8 [N, K/g], unsigned (symmetric: 8)
    group: int
    in_features: int
    out_features: int


def kernel_supports(bits: int, in_features: int, group: int) -> bool:
    return bits == 4 and in_features % 64 == 0 and group % 32 == 0 and in_features % group == 0


def repack(weight_packed, weight_scale, weight_zero_point, in_features: int, bits: int) -> PackedW4 | None:
    """The kernel's layout of a compressed-tensors 4-bit Linear, or None when the kernel cannot take it."""
    out_features, groups = weight_scale.shape
    group = in_features // groups
    if not kernel_supports(bits, in_features, group) or weight_packed.shape[1] * 8 != in_features:
        return None
    scales = weight_scale.to(torch.float16).contiguous()  # bf16 scales are exact in fp16 above 6e-5
    if weight_zero_point is None:
        zeros = torch.full(scales.shape, 8, dtype=torch.uint8, device=scales.device)
    else:
        zeros = (unpack_int32(weight_zero_point, bits, out_features, dim=0).to(torch.int16) + 8).to(torch.uint8)
    return PackedW4(weight_packed.contiguous(), scales, zeros.contiguous(), group, in_features, out_features)


def dequantize_w4(packed: PackedW4) -> torch.Tensor:
    """float32 [N, K] with the kernel's arithmetic: u * s - (u_zero * s)."""
    shifts = torch.arange(0, 32, 4, device=packed.qweight.device, dtype=torch.int32)
    u = ((packed.qweight.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.out_features, -1, packed.group).float()
    s = packed.scales.float().unsqueeze(-1)
    return (u * s - packed.zeros.float().unsqueeze(-1) * s).reshape(packed.out_features, -1)


def reference_w4(x: torch.Tensor, packed: PackedW4, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernels' maths in plain torch: float32 weights and accumulation, one rounding to x's dtype at the end."""
    y = x.float() @ dequantize_w4(packed).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def choose_path(m: int) -> str:
    if os.environ.get("LLMQ_W4_KERNEL") == "tc":
        return "tc"
    return "gemv" if m <= GEMV_MAX_M else "mma" if m <= MMA_MAX_M else "cublas"


def choose_splits(path: str, n: int, k: int, sm_count: int) -> int:
    """Split K until there are about two blocks per SM (each split keeps at least 512 columns of K); for "tc", whose
    shared-memory ring allows one block per SM, until there is one block per SM (at least one 256-k stage each)."""
    if path == "tc":
        blocks = -(-n // BLOCK_N)
        return 1 if blocks >= sm_count else max(1, min(-(-sm_count // blocks), k // STAGE_K))
    # gemv blocks hold 8 rows (16 at M <= 2, where this count is then twice too high: split-K only gets rarer)
    blocks = -(-n // (_MMA_N_TILE if path == "mma" else 8))
    if blocks >= 2 * sm_count:
        return 1
    return max(1, min(-(-2 * sm_count // blocks), k // 512))


@cache
def _sm_count(device_index: int) -> int:  # asked once per device: the query costs more than a small kernel
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def w4_linear_cuda(extension, x: torch.Tensor, packed: PackedW4, bias: torch.Tensor | None,
                   out: torch.Tensor | None = None, path: str | None = None,
                   fragment: FragmentW4 | None = None) -> torch.Tensor:
    """y = x W^T + b on the GPU; x [..., K] float16/bfloat16. `path` overrides the choice by M (tests, benchmarks);
    the "tc" path needs `fragment`, the fragment-ordered layout (fragments.from_packed(packed))."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    if x2.data_ptr() % 16:  # a view at an odd offset: the kernels read activations 16 bytes at a time
        x2 = x2.clone()
    m = x2.shape[0]
    path = path or choose_path(m)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    if path == "cublas":
        weight = extension.w4_dequant(packed.qweight, packed.scales, packed.zeros, packed.group, x2)
        return torch.nn.functional.linear(x2, weight, bias).reshape(*shape[:-1], packed.out_features)
    if out is None:
        out = torch.empty(m, packed.out_features, device=x.device, dtype=x.dtype)
    sm_count = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    splits = choose_splits(path, packed.out_features, packed.in_features, sm_count)
    if path == "tc":
        y = extension.w4_linear_tc(x2, fragment.tiles, fragment.scales, fragment.zeros, bias, packed.group, splits, out)
    else:
        y = extension.w4_linear(x2, packed.qweight, packed.scales, packed.zeros, bias, packed.group,
                                0 if path == "gemv" else 1, splits, out)
    return y.reshape(*shape[:-1], packed.out_features)
