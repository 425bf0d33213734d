"""Reference maths of a packed quantized Linear, in plain torch: what every kernel must reproduce.

    W[o, i] = (q[o, i] - z[o, i // group_size]) * s[o, i // group_size]      exact in float32
    y = x @ W^T + b

q is unpacked from int32 words (llmq.targets.packing); z is unpacked down the output dimension.
"""

from __future__ import annotations

import torch

from llmq.targets.packing import unpack_int32


def dequantize_packed(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    in_features: int,
    bits: int,
) -> torch.Tensor:
    """Dense float32 [out, in] weight."""
    out_features, n_groups = weight_scale.shape
    w = unpack_int32(weight_packed, bits, in_features).reshape(out_features, n_groups, -1).float()
    if weight_zero_point is not None:
        zero = unpack_int32(weight_zero_point, bits, out_features, dim=0)
        w = w - zero.float().unsqueeze(-1)
    return (w * weight_scale.float().unsqueeze(-1)).reshape(out_features, in_features)
