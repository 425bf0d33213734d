"""GPTQ (Frantar et al., 2022): round one column at a time and push the rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's reconstruction loss ||WX - QX||^2, H = 2 X X^T.

Follows the reference `gptq.py`: Cholesky factor of the damped inverse Hessian, lazy updates in blocks of
columns, dead inputs (H_ii = 0) zeroed. With --act-order the columns are visited in order of decreasing H_ii,
and the group scales are fixed up front on the original column order ("static groups"), so group g still
covers columns [g * group_size, (g + 1) * group_size) and loaders need no group index.
"""

from __future__ import annotations

import contextlib

import torch

from llmq import log
from llmq.errors import LlmqError
from llmq.methods.base import Method, StatsCollector
from llmq.methods.grid import (
    QuantizedTensor,
    dequantize_values,
    group_qparams,
    quantize_values,
    to_quantized_tensor,
)


@contextlib.contextmanager
def _exact_bf16_products():
    """On CPU, let oneDNN multiply float32 matrices as bf16 with float32 accumulation.

    Only used on inputs that are bf16 values already, where this is exact and about 2.5x faster.
    """
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    previous = getattr(mkldnn_matmul, "fp32_precision", None)
    if previous is None:
        yield
        return
    mkldnn_matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        mkldnn_matmul.fp32_precision = previous


class HessianCollector(StatsCollector):
    """Sum of x x^T over every calibration token, in float32.

    The first token of each calibration sequence ([batch, seq, features] inputs) counts `sink_weight` times. In
    causal LMs that token is the attention sink: every later token puts much of its attention on it, so an error
    in what a layer makes of it (its value, its key, its residual stream) reaches every later position. Plain
    GPTQ treats it as 1 of 512 tokens and trades its error away: on SmolLM2 Q4_0, v_proj's error on that token
    rose 2-4x in layers 12-28 while every other token's fell, and perplexity rose with it (issue 4).
    """

    def __init__(self, in_features: int, device: torch.device, sink_weight: float = 1.0):
        self.sum_xxt = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0.0
        self.sink_weight = sink_weight

    def add(self, x: torch.Tensor) -> None:
        if x.dim() == 3 and self.sink_weight != 1:
            x = x.clone()
            x[:, 0] *= self.sink_weight**0.5
            self.tokens += x.shape[0] * (self.sink_weight - 1)  # normalise per effective token
        x = x.reshape(-1, x.shape[-1])
        self.tokens += x.shape[0]
        exact_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
        with _exact_bf16_products() if exact_bf16 else contextlib.nullcontext():
            xf = x.float()
            self.sum_xxt.addmm_(xf.T, xf)

    def hessian(self) -> torch.Tensor:
        return self.sum_xxt * (2.0 / max(self.tokens, 1))


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; raises damping until it exists."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    while damp <= 10:
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
        log.info(f"GPTQ: Hessian not positive definite with damping {damp:g}; retrying with {damp * 10:g}")
        damp *= 10
    raise LlmqError("GPTQ: the Hessian stays singular even with heavy damping; check the calibration data for NaN/Inf")


def error_feedback_sweep(W: torch.Tensor, Hinv: torch.Tensor, block_size: int, round_column) -> None:
    """GPTQ's loop over the columns of W (already in visiting order), in lazy blocks, updating W in place.

    round_column(col, block, i) rounds column i of the current block (column col of W) and returns its
    dequantized values; the rounding error, divided by the inverse Hessian's diagonal, is pushed onto the
    columns not yet rounded (within the block at once, beyond it once per block).
    """
    cols = W.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = W[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            err = (block[:, i] - round_column(i1 + i, block, i)) / Hinv1[i, i]
            block[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            errors[:, i] = err
        W[:, i2:].addmm_(errors, Hinv[i1:i2, i2:], alpha=-1)


class GPTQ(Method):
    name = "gptq"
    needs_calibration = True
    orders_columns = True

    def new_collector(self, in_features: int, device: torch.device) -> HessianCollector:
        return HessianCollector(in_features, device, self.options.sink_weight)

    def quantize(self, weight: torch.Tensor, stats: HessianCollector, scale_dtype: torch.dtype) -> QuantizedTensor:
        scheme, opts = self.scheme, self.options
        W = weight.clone().float()
        cols = W.shape[1]
        group_size = scheme.group_size_for(cols)
        H = stats.hessian()

        dead = H.diagonal() == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        # Static groups: parameters from the (dead-zeroed) original weights, fixed before any update.
        static_groups = opts.act_order or scheme.group_size == -1
        scale, zero = group_qparams(W, scheme, scale_dtype, mse=opts.mse)

        perm = None
        if opts.act_order:
            perm = torch.argsort(H.diagonal(), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
        column_group = (perm if perm is not None else torch.arange(cols, device=W.device)) // group_size

        Hinv = inverse_hessian_cholesky(H, opts.damp)
        Q = torch.zeros_like(W)

        def round_column(col: int, block: torch.Tensor, i: int) -> torch.Tensor:
            if not static_groups and col % group_size == 0:
                # Dynamic groups: parameters from the weights as GPTQ has updated them so far.
                s, z = group_qparams(block[:, i : i + group_size], scheme, scale_dtype, mse=opts.mse)
                scale[:, col // group_size] = s[:, 0]
                if zero is not None:
                    zero[:, col // group_size] = z[:, 0]
            g = column_group[col]
            s = scale[:, g]
            z = None if zero is None else zero[:, g]
            q = quantize_values(block[:, i], s, z, scheme)
            Q[:, col] = q
            return dequantize_values(q, s, z)

        block = self.options.block_size if static_groups else self._block_size(group_size)
        error_feedback_sweep(W, Hinv, block, round_column)

        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        return to_quantized_tensor(Q, scale, zero, scheme, scale_dtype)

    def _block_size(self, group_size: int) -> int:
        """Lazy-update block, a multiple of the group size so a dynamic group never straddles two blocks."""
        block = self.options.block_size
        if group_size >= block:
            return group_size
        return block - block % group_size
