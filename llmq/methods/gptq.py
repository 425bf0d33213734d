"""GPTQ (Frantar et al., 2022): round one column at a time and push the rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's reconstruction loss ||WX - QX||^2, H = 2 X X^T.

Follows the reference `gptq.py`: Cholesky factor of the damped inverse Hessian, lazy updates in blocks of
columns, dead inputs (H_ii = 0) zeroed. It rounds onto any grid (llmq/core/interfaces.py): the grid is
fitted up front on the original (dead-zeroed) weights, and each column is then rounded on its own group's or
sub-block's parameters, so the result is an ordinary tensor of that grid (a compressed-tensors group, a GGUF
k-quant block). With --act-order the columns are visited in order of decreasing H_ii and each column keeps its
group ("static groups"), so loaders need no group index.

When a grid's groups may be re-fitted (the integer grid), each group's parameters are fitted when the sweep
first reaches one of its columns, from the group's weights as GPTQ has updated them by then (`group_fit="sweep"`,
the default). Without act-order that is the reference's "dynamic groups". With act-order it matters more: a
group's columns are met scattered over the sweep, after the error feedback of every louder column has moved
them, and a scale fitted on the original weights no longer fits them (the sink weighting makes those moves
larger). On the reference model, symmetric W4 g64 with act-order: 25.92 perplexity with scales from the original
weights, 23.29 fitted in the sweep (first 10 windows; README, Benchmark). `group_fit="upfront"` keeps the
original-weight fit (the reference's `static_groups`).
"""

from __future__ import annotations

import math

import torch

from llmq.core import log
from llmq.core.device import small_linear_algebra
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Grid, Method, Quantized
from llmq.core.timing import stage_clock


def invert_lower_triangular_(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """Invert a lower-triangular matrix in place, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]].

    n^3/3 multiply-adds in matrix products (a triangular solve against the identity does n^3), and no
    second matrix of L's size: the largest temporary is a quarter of it.
    """
    n = L.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return L
    half = n // 2 if n < 4 * leaf else (n // 2) // leaf * leaf
    A, C, D = L[:half, :half], L[half:, :half], L[half:, half:]
    invert_lower_triangular_(A, leaf)
    invert_lower_triangular_(D, leaf)
    C.copy_(torch.mm(torch.mm(D, C), A).neg_())
    return L


def flip_in_place_(square: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Reverse both axes of a square matrix in place, row- or column-major (either way: reverse its storage), chunk
    by chunk from both ends, so no second matrix of its size is made."""
    flat = (square if square.is_contiguous() else square.T).view(-1)
    n = flat.numel()
    for start in range(0, n // 2, chunk):
        stop = min(start + chunk, n // 2)
        front = flat[start:stop].clone()
        flat[start:stop] = flat[n - stop : n - start].flip(0)
        flat[n - stop : n - start] = front.flip(0)
    return square


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor U of (H' + damp * mean(diag H') * I)^-1, so that H'^-1 = U^T U, where H' is H with its
    rows and columns in visiting `order` (default: as they are) and each dead input's H_ii (0) set to 1; raises
    damping until it exists. `hessian` itself is not changed (the group's other Linears share it).

    One Cholesky factorization of H' with its rows and columns reversed, J H' J = L L^T (J the reversal): then
    H' = (J L J)(J L J)^T with J L J upper triangular, so H'^-1 = U^T U with U = J L^-1 J. A Cholesky and a
    triangular inverse: half the work of the reference's Cholesky, inverse, Cholesky (Llama-3-8B's down_proj,
    14336 rows, on 2 cores: 30 s instead of 62 s). One matrix the size of H is alive besides H (822 MB each
    there): the reordered copy is made in one indexing step, damped, factorized and inverted in place. LAPACK
    factorizes in place only a column-major matrix (a row-major one is copied first), so the symmetric copy is
    handed over transposed: the same matrix, in the storage LAPACK wants.
    """
    n = hessian.shape[0]
    order = torch.arange(n, device=hessian.device) if order is None else order
    reverse = order.flip(0)
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    while damp <= 10:
        damped = hessian[reverse[:, None], reverse[None, :]].mT  # J H' J, the one copy, column-major
        diagonal = damped.diagonal()
        diagonal[diagonal == 0] = 1  # dead inputs: their weights are zeroed, their row of H' made harmless
        diagonal.add_(damp * diagonal.mean())
        del diagonal
        with small_linear_algebra(hessian.device, n):
            torch.linalg.cholesky_ex(damped, out=(damped, info))  # damped now holds L (its upper half untouched)
            if info == 0:
                return flip_in_place_(invert_lower_triangular_(damped.tril_()))
        del damped  # overwritten by the failed factorization: made again with more damping
        log.info(f"GPTQ: Hessian not positive definite with damping {damp:g}; retrying with {damp * 10:g}")
        damp *= 10
    raise LlmqError("GPTQ: the Hessian stays singular even with heavy damping; check the calibration data for NaN/Inf")


SUB_BLOCK = 16  # columns rounded between two matrix-product updates of the rest of a block


def error_feedback_sweep(W: torch.Tensor, Hinv: torch.Tensor, block_size: int, round_column,
                         sub_block: int = SUB_BLOCK, errors: torch.Tensor | None = None) -> None:
    """GPTQ's loop over the columns of W (already in visiting order), in lazy blocks, updating W in place.

    round_column(col, block, i) rounds column i of the current block (column col of W) and returns its
    dequantized values; the rounding error, divided by the inverse Hessian's diagonal, is pushed onto the
    columns not yet rounded. The reference pushes it onto the rest of the block column by column (a rank-1
    update of rows x block values per column) and beyond the block once per block. Here the same updates
    are grouped once more: column by column only within a sub-block of `sub_block` columns, then onto the
    rest of the block in one matrix product, so the per-column work is rows x sub_block instead of rows x
    block, and the block is held transposed so that a column is contiguous in memory. The same sums in
    another order: equal to the reference to float rounding (tests/test_gptq.py). A dynamic group must
    start at a sub-block (sub_block divides the group size): its refit reads columns that only then are
    up to date. `errors` ([columns, rows], optional) receives each column's error as the sweep makes it, so
    round_column may read the errors of every column visited before it.
    """
    cols = W.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = W[:, i1:i2].T.contiguous()  # [columns, rows]
        columns = block.T  # the [rows, columns] view round_column reads
        block_errors = torch.empty_like(block) if errors is None else errors[i1:i2]
        Hinv1 = Hinv[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, sub_block):
            j2 = min(j1 + sub_block, i2 - i1)
            for i in range(j1, j2):
                err = torch.sub(block[i], round_column(i1 + i, columns, i)).div_(Hinv1[i, i])
                block[i + 1 : j2].addr_(Hinv1[i, i + 1 : j2], err, alpha=-1)
                block_errors[i] = err
            block[j2:].addmm_(Hinv1[j1:j2, j2:].T, block_errors[j1:j2], alpha=-1)
        W[:, i2:].addmm_(block_errors.T, Hinv[i1:i2, i2:], alpha=-1)


def reference_sweep(W: torch.Tensor, Hinv: torch.Tensor, block_size: int, round_column,
                    errors: torch.Tensor | None = None) -> None:
    """The loop of the reference gptq.py (rank-1 update of the whole block per column, on W's strided columns):
    what error_feedback_sweep is tested against (tests/test_gptq.py) and timed against
    (scripts/bench_gptq_sweep.py). `errors` as in error_feedback_sweep."""
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        block, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        block_errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            err = (block[:, i] - round_column(i1 + i, block, i)) / Hinv1[i, i]
            block[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            block_errors[:, i] = err
            if errors is not None:
                errors[i1 + i] = err
        W[:, i2:] -= block_errors.matmul(Hinv[i1:i2, i2:])


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
        H = stats.hessian()  # shared with the group's other parts: never changed
        dead = H.diagonal() == 0
        W[:, dead] = 0

        order = torch.arange(W.shape[1], device=W.device)  # visiting position -> column of the weight
        if opts.act_order:  # decreasing H_ii, a dead input's counted as 1
            order = torch.argsort(torch.where(dead, 1.0, H.diagonal()), descending=True)
        # q, k and v (gate and up) share one Hessian, so one factor: the order, too, comes from the Hessian alone
        derived = getattr(stats, "derived", {})
        key = ("gptq inverse Hessian factor", opts.damp, opts.act_order)
        if key not in derived:
            with stage_clock("factorization"):
                derived[key] = inverse_hessian_cholesky(H, opts.damp, order)
        Hinv = derived[key]
        # fitted after the factorization, whose copy of H is the run's largest allocation, so as not to add to it
        fit = grid.fit(W, stats.importance())  # parameters from the (dead-zeroed) original weights
        size = fit.refit_group_size if opts.group_fit == "sweep" else None
        in_order = size is not None and not opts.act_order  # each group met whole, at its first column
        scattered = size is not None and opts.act_order  # a group's columns met anywhere in the sweep
        if opts.act_order:
            W = W[:, order]
        integers = torch.zeros_like(W)
        errors = None
        if scattered:
            errors = W.new_empty(W.shape[1], W.shape[0])  # the sweep's error per visiting position
            position_of = torch.argsort(order)  # column of the weight -> visiting position
            group_at = (order // size).tolist()  # visiting position -> group (a list: no device sync per column)
            fitted = set()  # groups met so far

        def round_column(position: int, block: torch.Tensor, i: int) -> torch.Tensor:
            column = order[position : position + 1]
            if in_order and position % size == 0:
                fit.refit(position, block[:, i : i + size])  # the group's columns, all in this block and up to date
            elif scattered and (group := group_at[position]) not in fitted:
                # the group's columns are scattered over the sweep, some not yet updated in place (lazy blocks):
                # as GPTQ has made them so far, each is its original minus every visited column's error times Hinv
                fitted.add(group)
                columns = slice(group * size, (group + 1) * size)
                original = weight[:, columns].float().masked_fill(dead[columns], 0)
                fit.refit(group * size, original - errors[:position].T @ Hinv[:position, position_of[columns]])
            q = fit.round(block[:, i : i + 1], column)
            integers[:, column] = q
            return fit.value(q, column)[:, 0]

        block, sub_block = opts.block_size, SUB_BLOCK
        if in_order:  # a group starts a block's sub-block: the reference's dynamic groups
            block, sub_block = aligned_block(block, size), math.gcd(SUB_BLOCK, size)
        with stage_clock("column sweep"):
            error_feedback_sweep(W, Hinv, block, round_column, sub_block, errors)
        return fit.result(integers)
