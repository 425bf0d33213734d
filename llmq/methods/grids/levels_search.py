"""Encoders for GGUF's codebook types (IQ4_NL, IQ4_XS, MXFP4): w = scale * levels[L], 16 fixed levels per type.

Rounding onto a codebook is "nearest level of x / scale" (blocks.LevelTable); what an encoder chooses is the
scale of each block (IQ4_NL, MXFP4) or sub-block (IQ4_XS, under an fp16 super-scale), by importance-weighted
squared error, as the k-quant search does for the affine types:

- IQ4_NL / IQ4_XS: the levels are not symmetric (-127 .. 113), so the sign of a scale matters. For each block the
  weight of largest magnitude is put on either end of the table (and a ladder around each end), the block is
  rounded, and the weighted least-squares scale for those levels kept when it scores best; the winner is
  re-rounded and refitted once. IQ4_NL stores that scale in fp16 (the better of it and the plain peak scale, by
  the stored grid's error). IQ4_XS turns the 8 sub-block scales into 6-bit codes under one fp16 super-scale,
  chosen among candidates by the block's actual error after re-rounding; then each sub-block tries its
  neighbouring codes.
- MXFP4: the scale is a power of two (E8M0). The plain choice puts the block's largest |x| between 0.75 and 1.5
  times the top level; the exponent one below and one above are tried too, and the least weighted error kept.
"""

from __future__ import annotations

import torch

from llmq.methods.grids.blocks import BlockType, Codes, e8m0_half, fp16, level_table

_INF = float("inf")
# where a block's largest weight is put, in steps of the table's top level (a ladder around each end)
_END_STEPS = [0.0] + [0.04 * k for k in range(-4, 5) if k != 0]


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))


def round_to_levels(cls: type[BlockType], x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes (int32) of x [..., n] on the codebook scaled by `scale` [...]: the nearest level of x / scale."""
    return level_table(cls).nearest(x * _inverse(scale).unsqueeze(-1))


def level_error(cls: type[BlockType], xs: torch.Tensor, ws: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weighted squared error per row of xs [..., n] rounded onto the codebook scaled by `scale` [...]."""
    table = level_table(cls)
    values = table.level(table.index(xs * _inverse(scale).unsqueeze(-1)))
    return values.mul_(scale.unsqueeze(-1)).sub_(xs).square_().mul_(ws).sum(-1)


def fit_level_scale(cls: type[BlockType], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Best signed scale per row of x [N, n] (weights w) for value = scale * levels[L]."""
    table = level_table(cls)
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    flat = peak == 0
    wx = w * x
    best_score = torch.full_like(peak, -_INF)
    best_scale = torch.zeros_like(peak)

    def consider(scale):
        nonlocal best_score, best_scale
        v = table.level(table.index(x * _inverse(scale).unsqueeze(-1)))
        sumvx = (wx * v).sum(-1)
        sumv2 = (w * v).mul_(v).sum(-1)
        ok = sumv2 > 0
        score = torch.where(ok, sumvx * sumvx / sumv2.clamp_min(1e-30), torch.full_like(sumvx, -_INF))
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, sumvx / sumv2.clamp_min(1e-30), best_scale)

    for end in (table.sorted_values[0].item(), table.sorted_values[-1].item()):
        for step in _END_STEPS:
            consider(peak / (end * (1 + step)))
    consider(best_scale.clone())  # re-round with the winner and refit once
    return torch.where(flat, torch.zeros_like(best_scale), best_scale)


def _with_levels(cls: type[BlockType], codes: Codes, x: torch.Tensor) -> Codes:
    """Fill codes.L with x rounded onto the grid the stored codes decode to."""
    scale, _ = cls.grid(codes)
    nb = x.shape[0]
    codes.L = round_to_levels(cls, x.reshape(nb, -1, cls.sub_size), scale).reshape(nb, cls.block_size)
    return codes


def _stored_error(cls: type[BlockType], codes: Codes, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w * (cls.values(codes) - x).pow(2)).sum(-1)


def _best_scale(cls: type[BlockType], x: torch.Tensor, w: torch.Tensor, candidates: list[torch.Tensor]) -> Codes:
    """Per block, the candidate stored scale d whose rounding gives the least weighted error."""
    best, best_err = None, None
    for d in candidates:
        codes = _with_levels(cls, Codes(d=d, L=torch.empty(0)), x)
        err = _stored_error(cls, codes, x, w)
        if best is None:
            best, best_err = codes, err
            continue
        take = err < best_err
        best_err = torch.where(take, err, best_err)
        best.d, best.L = torch.where(take, codes.d, best.d), torch.where(take[:, None], codes.L, best.L)
    return best


def encode_iq4_nl(cls: type[BlockType], x: torch.Tensor, w: torch.Tensor) -> Codes:
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return _best_scale(cls, x, w, [fp16(fit_level_scale(cls, x, w)), fp16(peak / level_table(cls).sorted_values[0])])


_SUPER_STEPS = [0.0] + [0.1 * k for k in range(-4, 5) if k != 0]


def encode_iq4_xs(cls: type[BlockType], x: torch.Tensor, w: torch.Tensor, code_lo: int = -32, code_hi: int = 31) -> Codes:
    nb = x.shape[0]
    n_sub = cls.block_size // cls.sub_size
    xs, ws = x.reshape(nb, n_sub, cls.sub_size), w.reshape(nb, n_sub, cls.sub_size)
    scale = fit_level_scale(cls, xs.reshape(-1, cls.sub_size), ws.reshape(-1, cls.sub_size)).reshape(nb, n_sub)
    peak = scale.gather(-1, scale.abs().argmax(-1, keepdim=True)).squeeze(-1)

    def codes_for(d):
        return torch.round(scale * _inverse(d)[:, None]).clamp_(code_lo, code_hi)

    def block_error(d, sc):
        return level_error(cls, xs, ws, d[:, None] * sc).sum(-1)

    d = fp16(peak / code_lo)  # the largest sub-block scale at code -32, the longer side
    best_err = block_error(d, codes_for(d))
    for step in _SUPER_STEPS[1:]:
        candidate = fp16(peak / (code_lo - step))
        err = block_error(candidate, codes_for(candidate))
        d, best_err = torch.where(err < best_err, candidate, d), torch.minimum(err, best_err)
    sc = codes_for(d)
    best = level_error(cls, xs, ws, d[:, None] * sc)
    best_sc = sc.clone()
    for delta in (-1, 1):
        candidate = (sc + delta).clamp(code_lo, code_hi)
        err = level_error(cls, xs, ws, d[:, None] * candidate)
        better = err < best
        best, best_sc = torch.where(better, err, best), torch.where(better, candidate, best_sc)
    return _with_levels(cls, Codes(d=d, L=torch.empty(0), sc=best_sc.to(torch.int32)), x)


def encode_mxfp4(cls: type[BlockType], x: torch.Tensor, w: torch.Tensor) -> Codes:
    amax = x.abs().amax(-1)
    # the exponent that puts amax between 0.75 and 1.5 times the top level (12 * 2^(e - 128))
    e0 = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2 + 127, torch.zeros_like(amax)).clamp_(0, 254)
    return _best_scale(cls, x, w, [e8m0_half((e0 + delta).clamp(0, 254)) for delta in (0, -1, 1)])


__all__ = ["encode_iq4_nl", "encode_iq4_xs", "encode_mxfp4", "fit_level_scale", "level_error", "round_to_levels"]
