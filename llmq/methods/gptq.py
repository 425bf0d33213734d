"""GPTQ (Frantar et al., 2022): round one column at a time and push the rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's reconstruction loss ||WX - QX||^2, H = 2 X X^T.

Follows the reference `gptq.py` (lazy updates in blocks of columns, dead inputs (H_ii = 0) zeroed), with its
updates written with the Cholesky factor of the damped Hessian itself rather than of its inverse (no inverse:
hessian_factor). It rounds onto any grid (llmq/core/interfaces.py): the grid is
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


def hessian_factor(hessian: torch.Tensor, damp: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """Upper-triangular R with R R^T = H' + damp * mean(diag H') * I, where H' is H with its rows and columns in
    visiting `order` (default: as they are) and each dead input's H_ii (0) set to 1; raises damping until it
    exists. `hessian` itself is not changed (the group's other Linears share it).

    The reference gptq.py's factor U of the inverse, H'^-1 = U^T U, is R^-1 (inverse_factor_), and GPTQ needs
    it only where a group is re-fitted on columns the sweep has not reached (act-order with sweep-fitted
    groups): elsewhere error_feedback_sweep runs on R itself (Chen et al., 2025: GPTQ is Babai's nearest-plane
    algorithm on that factor), with no inverse at all. R is one Cholesky factorization of H' with its rows and
    columns reversed: if J H' J = L L^T (J the reversal), then R = J L J. One matrix the size of H is alive
    besides H (822 MB each for Llama-3-8B's down_proj): the reordered copy is gathered a chunk of rows at a
    time, damped and factorized in place. LAPACK factorizes in place only a column-major matrix (a row-major one is copied
    first), so the symmetric copy is handed over transposed: the same matrix, in the storage LAPACK wants.
    """
    n = hessian.shape[0]
    order = torch.arange(n, device=hessian.device) if order is None else order
    reverse = order.flip(0)
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    while damp <= 10:
        damped = torch.empty_like(hessian)
        for start in range(0, n, 512):  # row by row, a chunk at a time: twice as fast as one 2-D gather
            torch.index_select(hessian[reverse[start : start + 512]], 1, reverse, out=damped[start : start + 512])
        damped = damped.mT  # J H' J (H is symmetric), the one copy, column-major
        diagonal = damped.diagonal()
        diagonal[diagonal == 0] = 1  # dead inputs: their weights are zeroed, their row of H' made harmless
        diagonal.add_(damp * diagonal.mean())
        del diagonal
        with small_linear_algebra(hessian.device, n):
            torch.linalg.cholesky_ex(damped, out=(damped, info))  # damped now holds L (its upper half untouched)
            if info == 0:
                return flip_in_place_(damped.tril_())
        del damped  # overwritten by the failed factorization: made again with more damping
        log.info(f"GPTQ: Hessian not positive definite with damping {damp:g}; retrying with {damp * 10:g}")
        damp *= 10
    raise LlmqError("GPTQ: the Hessian stays singular even with heavy damping; check the calibration data for NaN/Inf")


def lower_times(T: torch.Tensor, B: torch.Tensor, out: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """out = T @ B for a lower-triangular T, by halves: [[T11, 0], [T21, T22]] [B1; B2] = [T11 B1; T21 B1 + T22 B2].
    Half the multiply-adds of a dense product (the zeros are never multiplied), in matrix products."""
    n = T.shape[0]
    if n <= leaf:
        return torch.mm(T, B, out=out)
    h = n // 2
    lower_times(T[:h, :h], B[:h], out[:h], leaf)
    lower_times(T[h:, h:], B[h:], out[h:], leaf).addmm_(T[h:, :h], B[:h])
    return out


def times_lower(B: torch.Tensor, T: torch.Tensor, out: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """out = B @ T for a lower-triangular T: [B1 B2] [[T11, 0], [T21, T22]] = [B1 T11 + B2 T21, B2 T22]."""
    n = T.shape[0]
    if n <= leaf:
        return torch.mm(B, T, out=out)
    h = n // 2
    times_lower(B[:, h:], T[h:, h:], out[:, h:], leaf)
    times_lower(B[:, :h], T[:h, :h], out[:, :h], leaf).addmm_(B[:, h:], T[h:, :h])
    return out


def invert_lower_triangular_(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """Invert a lower-triangular matrix in place, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]].

    n^3/3 multiply-adds, all in matrix products that skip the triangles' zeros (lower_times, times_lower), and no
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
    DC = lower_times(D, C, torch.empty_like(C))
    times_lower(DC, A, C).neg_()  # C is read only by the first product
    return L


def inverse_factor_(R: torch.Tensor) -> torch.Tensor:
    """R^-1 in place, for R upper-triangular: the reference gptq.py's factor U of H'^-1 = U^T U. R^T is a
    lower-triangular view of the same storage, and inverting it in place leaves (R^-1)^T there: R^-1 read as R."""
    with small_linear_algebra(R.device, R.shape[0]):
        invert_lower_triangular_(R.mT)
    return R


SUB_BLOCK = 16  # columns rounded between two matrix-product updates of the rest of a block


def error_feedback_sweep(W: torch.Tensor, factor: torch.Tensor, block_size: int, round_column,
                         sub_block: int = SUB_BLOCK, original=None) -> None:
    """GPTQ's loop over the columns of W (already in visiting order), in lazy blocks, updating W in place.

    round_column(col, block, i, block_errors) rounds column i of the current block (held as [columns, rows]; column
    col of W) and returns its dequantized values q_col; block_errors ([columns, rows]) holds the errors this block
    pushed so far (rows 0..i-1), W every column as of the block's start. Two forms of the same updates, by the factor given:
    - `original` given (original(i1, i2): W's original columns i1..i2-1 as [columns, rows]) and `factor` R
      (hessian_factor): each column j is rounded from w_j + sum_{i<j} d_i R_ij / R_jj, where d_i is column i's
      original weights minus its rounded values (Babai's nearest-plane form: no inverse of the Hessian);
    - otherwise `factor` is U = R^-1 (the reference's): column i's error (w_i - q_i) / U_ii is pushed onto each
      later column j times U_ij. Only this form's partial sums are GPTQ's optimal update of the columns not yet
      rounded (what a group re-fitted before the sweep reaches all its columns must read).
    Both reach the same value of each column when it is rounded (W0 = Q + E U, so E = (W0 - Q) R). The updates
    are made lazily: column by column only within a sub-block of `sub_block` columns, then onto the rest of the
    block in one matrix product, then beyond the block in one more; the block is held transposed so that a
    column is contiguous in memory. Equal to the reference loop to float rounding (tests/test_gptq.py). A
    dynamic group must start at a sub-block (sub_block divides the group size): its refit reads columns that
    only then are up to date.
    """
    cols = W.shape[1]
    babai = original is not None
    minus_reciprocal = factor.diagonal().reciprocal().neg_() if babai else None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = W[:, i1:i2].T.contiguous()  # [columns, rows]
        before = original(i1, i2) if babai else block
        block_errors = torch.empty_like(block)
        # this block's rows of the update matrix, from column i1 on: U, or -R D^-1 (D = diag R)
        F = factor[i1:i2, i1:].mul(minus_reciprocal[i1:]) if babai else factor[i1:i2, i1:]
        diagonal = None if babai else F.diagonal().tolist()  # U_ii, as numbers: no tensor indexing per column
        for j1 in range(0, i2 - i1, sub_block):
            j2 = min(j1 + sub_block, i2 - i1)
            for i in range(j1, j2):
                err = torch.sub(before[i], round_column(i1 + i, block, i, block_errors), out=block_errors[i])
                if not babai:
                    err.div_(diagonal[i])
                block[i + 1 : j2].addr_(F[i, i + 1 : j2], err, alpha=-1)
            block[j2:].addmm_(F[j1:j2, j2 : i2 - i1].T, block_errors[j1:j2], alpha=-1)
        W[:, i2:].addmm_(block_errors.T, F[:, i2 - i1 :], alpha=-1)


def group_as_reached(current: torch.Tensor, original: torch.Tensor, R: torch.Tensor, start: int) -> torch.Tensor:
    """The columns start.. of a group (contiguous in visiting order), [rows, size], as the reference GPTQ has
    updated them when it reaches the first: from the Babai-form sweep's partial sums `current` and their
    `original` weights. Those partial sums hold w_j + A_j / R_jj, A = sum_{i<start} d_i R_i: the reference's
    partial state is w + A R_GG^-1 (R's inverse is upper triangular, so only the group's own block enters)."""
    stop = start + current.shape[1]
    R_group = R[start:stop, start:stop]
    pushed = (current - original).mul_(R_group.diagonal())
    return torch.linalg.solve_triangular(R_group, pushed, upper=True, left=False).add_(original)


def reference_factor(hessian: torch.Tensor, damp: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """The reference gptq.py's factor U of H'^-1 = U^T U (Cholesky, inverse, Cholesky; H' as in hessian_factor,
    no damping retry): with reference_sweep and reference_feedback_so_far, the route llmq's is tested against
    (REFERENCE_ROUTE: given this, GPTQ uses it as U wherever it would use R or U)."""
    order = torch.arange(hessian.shape[0], device=hessian.device) if order is None else order
    damped = hessian[order][:, order]
    diagonal = damped.diagonal()
    diagonal[diagonal == 0] = 1
    diagonal.add_(damp * diagonal.mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)


def reference_sweep(W: torch.Tensor, Hinv: torch.Tensor, block_size: int, round_column,
                    sub_block: int | None = None, original=None) -> None:
    """The loop of the reference gptq.py on its factor U (reference_factor): the error of column i,
    (w_i - q_i) / U_ii, pushed onto the rest of the block by a rank-1 update per column, on W's strided columns,
    and beyond the block once per block; round_column as error_feedback_sweep's (`original` is not needed)."""
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        block, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        block_errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            err = (block[:, i] - round_column(i1 + i, block.T, i, block_errors.T)) / Hinv1[i, i]
            block[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            block_errors[:, i] = err
        W[:, i2:] -= block_errors.matmul(Hinv[i1:i2, i2:])


# the reference gptq.py's factor and loop, in place of llmq's (tests/test_gptq.py, scripts/bench_gptq_sweep.py)
REFERENCE_ROUTE = {"hessian_factor": reference_factor, "inverse_factor_": lambda U: U,
                   "error_feedback_sweep": reference_sweep, "group_as_reached": lambda current, *_: current}


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

        # a grid that rounds `vector` columns together (the lattice i-quants) is visited a whole vector at a time
        vector = getattr(grid, "vector_size", 1)
        order = torch.arange(W.shape[1], device=W.device)  # visiting position -> column of the weight
        if opts.act_order:  # decreasing H_ii, a dead input's counted as 1 (vectors: by their sum, in place inside)
            importance = torch.where(dead, 1.0, H.diagonal()).reshape(-1, vector).sum(-1)
            first = torch.argsort(importance, descending=True) * vector
            order = (first[:, None] + torch.arange(vector, device=W.device)).reshape(-1)
        # q, k and v (gate and up) share one Hessian, so one factor: the order, too, comes from the Hessian alone
        derived = getattr(stats, "derived", {})
        key = ("gptq Hessian factor", opts.damp, opts.act_order, vector)
        inverse_key = key + ("inverse",)
        if key not in derived and inverse_key not in derived:
            with stage_clock("factorization"):
                derived[key] = hessian_factor(H, opts.damp, order)
        # fitted after the factorization, whose copy of H is the run's largest allocation, so as not to add to it
        fit = grid.fit(W, stats.importance())  # parameters from the (dead-zeroed) original weights
        size = fit.refit_group_size if opts.group_fit == "sweep" else None
        in_order = size is not None and not opts.act_order  # each group met whole, at its first column
        scattered = size is not None and opts.act_order  # a group's columns met anywhere in the sweep
        if scattered and inverse_key not in derived:  # refits read partial sums only U's form has (the sweep)
            with stage_clock("factorization"):
                derived[inverse_key] = inverse_factor_(derived.pop(key))  # the group's other parts need the same
        elif not scattered and key not in derived:  # another part of the group, on another grid, took U
            with stage_clock("factorization"):
                derived[key] = hessian_factor(H, opts.damp, order)
        factor = derived[inverse_key] if scattered else derived[key]
        if opts.act_order:
            W = W[:, order]
        integers = W.new_empty(W.shape[1], W.shape[0])  # by visiting position: [columns, rows]
        column_at = order.tolist()  # visiting position -> column (a list: no device sync per column)
        position_of = torch.argsort(order)  # column of the weight -> visiting position
        fitted = set()  # groups met so far (scattered)

        def original(i1: int, i2: int) -> torch.Tensor:
            """Visiting positions i1..i2-1 of the dead-zeroed original weights, [columns, rows]."""
            columns = order[i1:i2]
            return weight[:, columns].float().masked_fill_(dead[columns], 0).T.contiguous()

        # vector grids fit no group during the sweep, so theirs is R's form: each visiting position's error costs R_jj²
        weight_of = factor.diagonal().square() if vector > 1 else None
        rounded = {}  # vector grids: the values of the vector being visited, by position

        def round_column(position: int, block: torch.Tensor, i: int, block_errors: torch.Tensor) -> torch.Tensor:
            column = column_at[position]
            if vector > 1:  # the whole vector when the sweep reaches its first column, as GPTQ has made it so far
                if position % vector == 0:
                    values = fit.round_group(block[i : i + vector], column, weight_of[position : position + vector])
                    rounded.update(zip(range(position, position + vector), values))
                integers[position].zero_()  # (the grid keeps its own codes)
                return rounded.pop(position)
            if in_order and position % size == 0:  # the group's columns, all in this block, as GPTQ has made them
                fit.refit(position, group_as_reached(block[i : i + size].T, original(position, position + size).T,
                                                     factor, position))
            elif scattered and (group := column // size) not in fitted:
                # the group's columns are scattered over the sweep. As GPTQ has made them so far, each is its original
                # minus every visited column's error times U: W holds that for the columns visited before this block
                # (the lazy sweep updates W once per block), so only this block's errors so far are to take off
                fitted.add(group)
                start = position - i
                positions = position_of[group * size : (group + 1) * size]
                fit.refit(group * size, W[:, positions] - block_errors[:i].T @ factor[start:position, positions])
            return fit.round_column(block[i], column, integers[position])

        block, sub_block = opts.block_size, SUB_BLOCK
        if in_order:  # a group starts a block's sub-block: the reference's dynamic groups
            block, sub_block = aligned_block(block, size), math.gcd(SUB_BLOCK, size)
        if vector > 1:  # a vector within one sub-block: its columns are current when its first one is reached
            block, sub_block = aligned_block(block, vector), math.lcm(sub_block, vector)
        with stage_clock("column sweep"):
            error_feedback_sweep(W, factor, block, round_column, sub_block, None if scattered else original)
        for start in range(0, W.shape[1], 1024):  # back into the weight's column order, in W (spent): no new matrix
            columns = slice(start, start + 1024)
            W[:, columns] = integers[position_of[columns]].T
        return fit.result(W)
