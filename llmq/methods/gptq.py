"""GPTQ (Frantar et al., 2022): round one column at a time and push the rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's reconstruction loss ||WX - QX||^2, H = 2 X X^T.

Follows the reference `gptq.py`: Cholesky factor of the damped inverse Hessian, lazy updates in blocks of
columns, dead inputs (H_ii = 0) zeroed. It rounds onto any grid (llmq/core/interfaces.py): the grid is
fitted up front on the original (dead-zeroed) weights, and each column is then rounded on its own group's or
sub-block's parameters, so the result is an ordinary tensor of that grid (a compressed-tensors group, a GGUF
k-quant block). With --act-order the columns are visited in order of decreasing H_ii and the parameters stay
as fitted ("static groups"), so loaders need no group index. Without it, a grid whose groups may be re-fitted
(the integer grid) re-fits each group from the weights as GPTQ has updated them when the sweep reaches it
("dynamic groups", the reference's default).
"""

from __future__ import annotations

import torch

from llmq.core import log
from llmq.core.device import small_linear_algebra
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Grid, Method, Quantized
from llmq.core.timing import stage_clock


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; raises damping until it exists.

    At most two matrices the size of H are alive at once besides H (Llama-3-8B's down_proj: 822 MB each).
    """
    mean_diag = hessian.diagonal().mean()
    while damp <= 10:
        with small_linear_algebra(hessian.device, hessian.shape[0]):
            damped = hessian.clone()
            damped.diagonal().add_(damp * mean_diag)
            lower, info = torch.linalg.cholesky_ex(damped)
            del damped
            if info == 0:
                inverse = torch.cholesky_inverse(lower)
                del lower
                upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
                del inverse
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


def aligned_block(block_size: int, group_size: int) -> int:
    """Lazy-update block, a multiple of the group size so a dynamic group never straddles two blocks."""
    if group_size >= block_size:
        return group_size
    return block_size - block_size % group_size


class GPTQ(Method):
    name = "gptq"
    needs_data = True
    statistic = "hessian"
    orders_columns = True

    def quantize(self, weight: torch.Tensor, stats, grid: Grid) -> Quantized:
        opts = self.options
        W = weight.clone().float()
        H = stats.hessian()  # shared with the group's other parts: changed only in a copy
        dead = H.diagonal() == 0
        if dead.any():
            H = H.clone()
            H[dead, dead] = 1
        W[:, dead] = 0

        fit = grid.fit(W, stats.importance())  # parameters from the (dead-zeroed) original weights
        dynamic = not opts.act_order and fit.refit_group_size is not None
        order = torch.arange(W.shape[1], device=W.device)  # visiting position -> column of the weight
        if opts.act_order:
            order = torch.argsort(H.diagonal(), descending=True)
            W, H = W[:, order], H[order][:, order]
        with stage_clock("factorization"):
            Hinv = inverse_hessian_cholesky(H, opts.damp)
        integers = torch.zeros_like(W)

        def round_column(position: int, block: torch.Tensor, i: int) -> torch.Tensor:
            column = order[position : position + 1]
            if dynamic and position % fit.refit_group_size == 0:
                fit.refit(position, block[:, i : i + fit.refit_group_size])
            q = fit.round(block[:, i : i + 1], column)
            integers[:, column] = q
            return fit.value(q, column)[:, 0]

        block = aligned_block(opts.block_size, fit.refit_group_size) if dynamic else opts.block_size
        with stage_clock("column sweep"):
            error_feedback_sweep(W, Hinv, block, round_column)
        return fit.result(integers)
