"""Encoders for GGUF's lattice i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M; layouts in
lattice.py).

Each group of 8 (or 4) weights becomes one codebook entry of magnitudes times a scale, with a sign per weight.
Minimizing the importance-weighted squared error Σ w (s·g·sign - x)² splits into:

1. Signs: the sign of each weight, except that types with 7 stored sign bits need an even number of negatives
   per 8 weights; where the count is odd, the weight that costs least to get wrong (smallest w·x², as
   llama.cpp chooses) takes the other sign, and its target magnitude becomes -|x|: the codebook search then
   gives it the smallest magnitude that fits (llama.cpp searches on |x| and so leaves that weight's full error).
2. Sub-block scales: for a ladder of candidate scales (the sub-block's largest target on the codebook's larger
   magnitudes), each group takes its nearest codebook entry (weighted; see nearest_entries), and the weighted
   least-squares scale for those entries is scored; the best is re-searched once.
3. Scale codes: the sub-block scales become 4-bit (IQ1: 3-bit) codes under one fp16 super-scale, chosen among
   candidates by the error its rounded scales cost (Σ w g² · Δscale², the quadratic of the fit), each code the
   nearest for its candidate; finally every group is searched again under its stored scale.
IQ1's entries are signed and shifted instead (encode_iq1).
"""

from __future__ import annotations

import torch

from llmq.methods.grids.blocks import Codes, fp16
from llmq.methods.grids.lattice import IQ1BlockType, LatticeBlockType, sign_factors

_CHUNK = 1 << 14  # groups per neighbour search: [chunk, 32, group] candidate points at a time
_LADDER = [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25]  # candidate scales, as fractions of the largest target's fit
_NEIGHBOURS = 32  # codebook entries searched for a combination that is not one (llama.cpp's neighbour lists)


class _OnGrid:
    """The codebook as a subset of all combinations of its magnitudes: `bounds` between neighbouring magnitudes,
    `entry[combination]` the codebook index of a combination (-1 when it is not in the codebook), and for every
    combination its `_NEIGHBOURS` nearest codebook entries (plain distance) as `neighbours[combination]`."""

    def __init__(self, book: torch.Tensor):
        magnitudes = torch.unique(book)
        self.bounds = (magnitudes[1:] + magnitudes[:-1]) / 2
        self.powers = len(magnitudes) ** torch.arange(book.shape[1])
        count = len(magnitudes) ** book.shape[1]
        self.entry = torch.full((count,), -1, dtype=torch.int64)
        self.entry[self.combination(book)] = torch.arange(book.shape[0])
        digits = torch.arange(count)[:, None] // self.powers % len(magnitudes)
        points = magnitudes[digits]  # every combination's magnitudes [count, group]
        distance = torch.cdist(points, book)
        self.neighbours = distance.topk(min(_NEIGHBOURS, book.shape[0]), largest=False).indices

    def combination(self, target: torch.Tensor) -> torch.Tensor:
        """The combination of each row's nearest magnitudes (a tie goes to the smaller one)."""
        level = (target.unsqueeze(-1) > self.bounds).sum(-1)
        return (level * self.powers).sum(-1)


_ON_GRID: dict = {}


def nearest_entries(cls: type[LatticeBlockType], target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Index [G] of the codebook entry nearest to each target [G, group] (magnitudes in units of the scale), by
    Σ weight (entry - target)². The distance is a sum over weights, so each weight's nearest magnitude together
    make the nearest combination of all; where that combination is a codebook entry it is the answer. Otherwise
    the combination's 32 nearest entries (by plain distance, precomputed as llama.cpp's neighbour lists are) are
    searched with the weights. (Searching the whole codebook instead measured 2.5-6x slower on 256 x 1024
    weights, for errors at most 0.7% lower.)"""
    book = cls.codebook()
    if cls.qtype not in _ON_GRID:
        _ON_GRID[cls.qtype] = _OnGrid(book)
    grid = _ON_GRID[cls.qtype]
    combination = grid.combination(target)
    out = grid.entry[combination]
    off = (out < 0).nonzero().squeeze(-1)
    if off.numel():
        out[off] = _searched(book, grid.neighbours[combination[off]], target[off], weight[off])
    return out


def _searched(book: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The weighted-nearest of each row's candidate entries [G, k] (indices into book) to its target [G, group]."""
    out = torch.empty(target.shape[0], dtype=torch.int64)
    for start in range(0, target.shape[0], _CHUNK):
        c = candidates[start:start + _CHUNK]
        points = book.index_select(0, c.reshape(-1)).reshape(*c.shape, book.shape[1])
        t, w = target[start:start + _CHUNK, None], weight[start:start + _CHUNK, None]
        distance = points.sub_(t).square_().mul_(w).sum(-1)
        out[start:start + _CHUNK] = c.gather(1, distance.argmin(-1, keepdim=True)).squeeze(1)
    return out


def _signs(cls: type[LatticeBlockType], x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target magnitudes [nb, block], sign masks [nb, block / 8]) per the parity rule above."""
    nb = x.shape[0]
    negative = (x < 0).reshape(nb, -1, 8)
    target = x.abs().reshape(nb, -1, 8)
    if cls.parity:
        odd = negative.sum(-1) % 2 == 1
        cheapest = (w.reshape(nb, -1, 8) * target.square()).argmin(-1, keepdim=True)
        flip = torch.zeros_like(negative).scatter_(-1, cheapest, True) & odd.unsqueeze(-1)
        negative = negative ^ flip
        target = torch.where(flip, -target, target)
    masks = (negative.to(torch.int32) << torch.arange(8, dtype=torch.int32)).sum(-1)
    return target.reshape(nb, -1), masks


def _fit(cls, target, w, scale):
    """Nearest entries under `scale` [nb, n_sub]; returns (indices [nb, groups], Σwtg, Σwg² per sub-block)."""
    nb, n_sub = scale.shape
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    scaled = (target.reshape(nb, n_sub, -1) * inverse.unsqueeze(-1)).reshape(-1, cls.group)
    index = nearest_entries(cls, scaled, w.reshape(-1, cls.group)).reshape(nb, -1)
    g = cls.codebook().index_select(0, index.reshape(-1)).reshape(nb, n_sub, -1)
    wt = (w * target).reshape(nb, n_sub, -1)
    return index, (wt * g).sum(-1), (w.reshape(nb, n_sub, -1) * g.square()).sum(-1)


def _best_scales(candidates: list[torch.Tensor], moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block, the weighted least-squares scale of the candidate whose rounding fits best, and its curvature
    Σ w v². `moments(scale)` [nb, n_sub] gives (Σ w x v, Σ w v²) for the values v the scale rounds to; the
    winner's refitted scale is searched once more."""
    best_score = torch.full_like(candidates[0], -1.0)
    best_scale, best_curvature = torch.zeros_like(best_score), torch.ones_like(best_score)
    for _ in range(2):
        for scale in candidates:
            sxv, svv = moments(scale)
            fitted = torch.where(svv > 0, sxv / svv.clamp_min(1e-30), torch.zeros_like(sxv))
            score = torch.where(fitted > 0, sxv * fitted, torch.zeros_like(sxv))
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_scale = torch.where(better, fitted.clamp_min(0), best_scale)
            best_curvature = torch.where(better, svv, best_curvature)
        candidates = [best_scale.clone()]
    return best_scale, best_curvature


def encode_lattice(cls: type[LatticeBlockType], x: torch.Tensor, w: torch.Tensor) -> Codes:
    """Codes of blocks x [nb, 256] under element weights w [nb, 256]."""
    nb = x.shape[0]
    n_sub = cls.block_size // cls.sub_size
    target, masks = _signs(cls, x, w)
    peak = target.reshape(nb, n_sub, -1).amax(-1)
    top = cls.codebook().max().item()
    best_scale, best_curvature = _best_scales([peak / (top * fraction) for fraction in _LADDER],
                                              lambda scale: _fit(cls, target, w, scale)[1:])
    d, sc = _scale_codes(cls, best_scale, best_curvature)
    stored = cls.sub_scale(d, sc)
    index, _, _ = _fit(cls, target, w, stored)
    return Codes(d=d, L=index.to(torch.int32), sc=sc, signs=masks)


_IQ1_LADDER = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.15]  # candidate scales, fractions of the largest |x| (entries are +-1)


def encode_iq1(cls: type[IQ1BlockType], x: torch.Tensor, w: torch.Tensor) -> Codes:
    """IQ1_S / IQ1_M: w = s * (entry + shift), entries in {-1, 0, 1}^8, shift +-1/8 per `delta_size` weights.
    For each candidate scale and each shift sign, every group takes its nearest entry (nearest_entries on the
    shifted target x / s - shift); the shift sign with the lower error is kept per shift group, then the
    weighted least-squares scale of the sub-block scores it. The sub-block scales become 3-bit codes (2 sc + 1)
    under the fp16 d as for the other lattice types, and every group is searched once more under its stored
    scale and shift."""
    nb = x.shape[0]
    n_sub = cls.block_size // cls.sub_size
    peak = x.abs().reshape(nb, n_sub, -1).amax(-1)

    def moments(scale):
        v = _iq1_fit(cls, x, w, scale, cls.delta_size)[2].reshape(nb, n_sub, -1)
        return (w * x).reshape(nb, n_sub, -1).mul(v).sum(-1), w.reshape(nb, n_sub, -1).mul(v).mul(v).sum(-1)

    best_scale, best_curvature = _best_scales([peak * fraction for fraction in _IQ1_LADDER], moments)
    d, sc = _scale_codes(cls, best_scale, best_curvature)
    index, signs, _ = _iq1_fit(cls, x, w, cls.sub_scale(d, sc), cls.delta_size)
    return Codes(d=d, L=index.to(torch.int32), sc=sc, signs=signs)


def _iq1_fit(cls, x, w, scale, shift_size: int, shift_sign: torch.Tensor | None = None):
    """Entries [nb, groups], shift signs [nb, shift groups] and unscaled values (entry + shift) [nb, n] of x [nb, n]
    under `scale` [nb, n_sub]: both shifts are tried and the one with the lower weighted error kept per
    `shift_size` weights, unless `shift_sign` fixes it."""
    nb = x.shape[0]
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    u = (x.reshape(nb, scale.shape[1], -1) * inverse.unsqueeze(-1)).reshape(-1, cls.group)
    weight = w.reshape(-1, cls.group)
    book = cls.codebook()
    tried = []
    for shift in (cls.delta, -cls.delta):
        index = nearest_entries(cls, u - shift, weight)
        values = book.index_select(0, index) + shift
        error = (values - u).square_().mul_(weight).sum(-1).reshape(nb, -1, shift_size // cls.group).sum(-1)
        tried.append((index, values, error))
    (i_pos, v_pos, e_pos), (i_neg, v_neg, e_neg) = tried
    negative = e_neg < e_pos if shift_sign is None else shift_sign.reshape(e_neg.shape).bool()
    per_group = negative.repeat_interleave(shift_size // cls.group, dim=1).reshape(-1)
    index = torch.where(per_group, i_neg, i_pos).reshape(nb, -1)
    values = torch.where(per_group[:, None], v_neg, v_pos).reshape(nb, -1)
    return index, negative.to(torch.int32), values


def iq1_group_codes(cls: type[IQ1BlockType], x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                    shift_sign: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IQ1's group_codes: one group of 8 per row x [rows, 8] under its stored scale [rows], with its shift sign
    fixed (IQ1_S: one per sub-block, chosen by the encoder) or chosen here (IQ1_M: one per group)."""
    index, signs, values = _iq1_fit(cls, x, w, scale[:, None], cls.group, shift_sign)
    return index, signs.reshape(-1), scale[:, None] * values


def group_codes(cls: type[LatticeBlockType], x: torch.Tensor, w: torch.Tensor,
                scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sign group (8 weights) of each row x [rows, 8] under its stored scale [rows], weights w [rows, 8]:
    (codebook indices [rows, 8 / group], sign masks [rows], decoded values [rows, 8]). GPTQ's rounding step."""
    target, masks = _signs(cls, x, w)
    masks = masks.reshape(-1)
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    index = nearest_entries(cls, (target * inverse[:, None]).reshape(-1, cls.group), w.reshape(-1, cls.group))
    index = index.reshape(x.shape[0], -1)
    magnitudes = cls.codebook().index_select(0, index.reshape(-1)).reshape(x.shape)
    return index, masks, scale[:, None] * magnitudes * sign_factors(masks)


def _scale_codes(cls, scale: torch.Tensor, curvature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 super-scale d [nb] and 4-bit codes [nb, n_sub] whose scales best match `scale`, weighing each
    sub-block's mismatch by its curvature Σ w g²."""
    codes = 8 if issubclass(cls, IQ1BlockType) else 16  # 3-bit or 4-bit scale codes
    factors = cls.scale_factor(torch.arange(codes, dtype=torch.int32).reshape(1, codes)).reshape(codes)  # scale / d
    peak = scale.amax(-1)

    def codes_for(d):
        ratio = scale / torch.where(d > 0, d, torch.ones_like(d)).unsqueeze(-1)
        return (ratio.unsqueeze(-1) - factors).abs().argmin(-1).to(torch.int32)

    def cost(d, sc):
        return (curvature * (d.unsqueeze(-1) * factors[sc.long()] - scale).square()).sum(-1)

    best_d = fp16(peak / factors[-1])
    best_sc = codes_for(best_d)
    best = cost(best_d, best_sc)
    for fraction in (0.8, 0.85, 0.9, 0.95, 1.05, 1.1):
        d = fp16(peak / (factors[-1] * fraction))
        sc = codes_for(d)
        c = cost(d, sc)
        take = c < best
        best, best_d, best_sc = torch.where(take, c, best), torch.where(take, d, best_d), torch.where(take[:, None], sc, best_sc)
    return best_d, best_sc


__all__ = ["encode_iq1", "encode_lattice", "group_codes", "iq1_group_codes", "nearest_entries"]
