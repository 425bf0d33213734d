"""Encoders for GGUF's block types: choose the scales, mins and integers of every block, vectorized in torch.

The search follows llama.cpp's (ggml-quants.c) in what it optimizes and improves on how:

1. Per sub-block (16 or 32 weights), fit a continuous scale (and min) under an importance-weighted squared
   error: try a ladder of candidate scales, round, solve the weighted least-squares scale/min for those
   integers, keep the best; then re-round once with the winner and refit.
2. Per super-block (256 weights, k-quants), the sub-block scales/mins become integer codes under one fp16
   super-scale. llama.cpp takes max/63 and rounds; here the super-scale is chosen among candidates by the
   *actual* block error after re-rounding the weights, and then every sub-block tries its neighbouring codes
   (code +-1, and for mins +-1 jointly) and keeps the one with the least actual error.

Importance weights per weight: with an activation importance vector (imatrix: mean x^2 of the Linear's input
channel), w = imp, so the search minimizes the expected output error; without one, plain squared error, or
llama.cpp's heuristics (|x| + rms for Q4_K/Q5_K, |x| for Q2_K) where those measured better.

`encode(weight, qtype, importance)` -> Codes; `encode_bytes` packs them; `grid_of` gives the effective scale/min
per sub-block, which the k-quant Grid (llmq/methods/grids/kquant.py) hands to rounding methods such as GPTQ.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from llmq.methods.grids.blocks import QK_K, BlockType, Codes, block_type, fp16
from llmq.methods.grids.lattice import LATTICE_TYPES
from llmq.methods.grids.lattice_search import encode_iq1, encode_lattice
from llmq.methods.grids.levels_search import encode_iq4_nl, encode_iq4_xs, encode_mxfp4, round_to_levels

_INF = float("inf")


# ---- importance weights ---------------------------------------------------------------------------------------


def element_weights(x: torch.Tensor, qtype: T, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-weight importance for blocks x [n_blocks, block_size]; `importance` [n_blocks, block_size] or None."""
    if importance is not None:
        # E[x_j^2] * dw_j^2 summed over a row is the expected output error when inputs are uncorrelated: the
        # quantity to minimize. (llama.cpp multiplies by sqrt(sigma^2 + w^2) too; on the reference model that
        # measured worse: Q4_0 23.84 vs 24.12 and Q3_K_M 23.67 vs 23.84 perplexity, 30 chunks of llama.cpp's protocol.)
        return importance.expand_as(x)
    if qtype in (T.Q3_K, T.Q6_K, T.Q4_1, T.Q5_1):
        return torch.ones_like(x)  # plain squared error: these grids are fine enough that importance only hurts it
    if qtype in (T.Q2_K, T.Q5_0):
        # |x|: the block's largest weights count more. On Q5_0's fine grid the plain least-squares fit clips a
        # block's peak to save a little squared error, which costs the model more than it saves: reference model,
        # llama-perplexity 50 x 512, KL to F32: Q4_K_M 0.0527 -> 0.0502 (llama.cpp's absmax 0.0575), Q3_K_M
        # 0.1242 -> 0.1230; the same weighting measured worse for Q4_0 (0.298 -> 0.324; rms + |x| below) and Q6_K.
        return x.abs()
    # Q4_K/Q5_K: rms of the super-block plus |x| (llama.cpp's q4_K/q5_K weighting). Q4_0 too, between the unweighted
    # fit and |x|: reference model, llama.cpp's kernels (llama-cpp-python), 50 x 512 tokens, KL to F32 / PPL:
    # unweighted 0.2943 / 26.02, rms + |x| 0.2891 / 25.71, llama.cpp's absmax 0.2899 / 26.40 (|x| alone: 0.324)
    return torch.sqrt(2 * x.pow(2).mean(-1, keepdim=True)) + x.abs()


# ---- step 1: continuous per-sub-block fits -----------------------------------------------------------------------


class _Moments:
    """Weighted sums of one sub-block fit; the squared error of any (scale, offset) follows from them without
    another pass over the weights: sum w (s L + o - x)^2 = s^2 Sll + 2 s o Sl + o^2 Sw - 2 s Sxl - 2 o Sx + Sxx."""

    def __init__(self, x, w):
        self.w, self.wx = w, w * x
        self.sw, self.sx, self.sxx = w.sum(-1), self.wx.sum(-1), (self.wx * x).sum(-1)

    def of(self, L):
        wl = self.w * L
        sl = wl.sum(-1)
        sxl = (self.wx * L).sum(-1)
        sll = wl.mul_(L).sum(-1)
        return sl, sll, sxl

    def error(self, scale, offset, sl, sll, sxl):
        return (scale * scale * sll + 2 * scale * offset * sl + offset * offset * self.sw
                - 2 * scale * sxl - 2 * offset * self.sx + self.sxx)


def _least_squares(mom: _Moments, sl, sll, sxl, allow_positive_min):
    """Scale and offset minimizing the weighted error for fixed integers; offset <= 0 unless allowed."""
    det = mom.sw * sll - sl * sl
    ok = det > 0
    safe = torch.where(ok, det, torch.ones_like(det))
    scale = (mom.sw * sxl - mom.sx * sl) / safe
    offset = (sll * mom.sx - sl * sxl) / safe
    if not allow_positive_min:
        clamp = offset > 0
        offset = torch.where(clamp, torch.zeros_like(offset), offset)
        scale = torch.where(clamp, sxl / sll.clamp_min(1e-30), scale)
    return scale, offset, ok


_FINE_STEPS = [-1.0 + 0.05 * i for i in range(41)]  # for the 32-wide types, which have no super-block stage


def fit_affine(x, w, qmax, allow_positive_min=False, steps=None):
    """Best (scale, offset) per row of x [N, n] for L in [0, qmax]: value = scale * L + offset.

    Candidates as llama.cpp's make_qkx2/3_quants: integers rounded at (qmax + step) / (max - min) for a ladder
    of steps, each followed by the weighted least-squares scale/offset for those integers.
    """
    lo = x.amin(-1) if allow_positive_min else x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    span = hi - lo
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)
    unit = (x - lo[:, None]) / span[:, None]  # in [0, 1]
    mom = _Moments(x, w)

    best_scale, best_offset = span / qmax, lo
    L = torch.round(unit * qmax)
    best_err = mom.error(best_scale, best_offset, *mom.of(L))
    steps = steps if steps is not None else [-1.0 + 0.1 * i for i in range(21)]
    for step in steps:
        L = torch.mul(unit, qmax + step).round_().clamp_(0, qmax)
        sums = mom.of(L)
        scale, offset, ok = _least_squares(mom, *sums, allow_positive_min)
        err = mom.error(scale, offset, *sums)
        better = ok & (err < best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
        best_err = torch.where(better, err, best_err)
    # one more round: re-round with the winner, refit, keep if better
    safe = torch.where(best_scale > 0, best_scale, torch.ones_like(best_scale))
    L = torch.round((x - best_offset[:, None]) / safe[:, None]).clamp_(0, qmax)
    sums = mom.of(L)
    scale, offset, ok = _least_squares(mom, *sums, allow_positive_min)
    better = ok & (mom.error(scale, offset, *sums) < best_err) & (scale > 0)
    best_scale = torch.where(better, scale, best_scale)
    best_offset = torch.where(better, offset, best_offset)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    best_offset = torch.where(flat, torch.where(hi < 0, hi, lo), best_offset)
    return best_scale, best_offset


def fit_symmetric(x, w, zero, qmax):
    """Best signed scale per row of x [N, n] for integers L - zero in [-zero, qmax - zero] (value = scale * (L - zero)).

    As llama.cpp, the weight of largest magnitude maps to -zero (the longer side of the grid), scanning
    (zero + 0.1 k) for k in -9..9, with the least-squares scale for each rounding.
    """
    index = x.abs().argmax(-1, keepdim=True)
    peak = x.gather(-1, index).squeeze(-1)
    flat = peak == 0
    peak = torch.where(flat, torch.ones_like(peak), peak)
    unit = -x / peak[:, None]  # the peak weight at -1
    wx = w * x
    best_score = torch.full_like(peak, -_INF)
    best_scale = torch.zeros_like(peak)
    candidates = [0.0] + [0.1 * k for k in range(-9, 10) if k != 0]
    for step in candidates:
        q = torch.mul(unit, zero + step).round_().clamp_(-zero, qmax - zero)
        sumlx = (wx * q).sum(-1)
        suml2 = (w * q).mul_(q).sum(-1)
        ok = suml2 > 0
        score = torch.where(ok, sumlx * sumlx / suml2.clamp_min(1e-30), torch.full_like(sumlx, -_INF))
        scale = torch.where(ok, sumlx / suml2.clamp_min(1e-30), -peak / (zero + step))
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, scale, best_scale)
    # re-round with the winner and refit once
    safe = torch.where(best_scale != 0, best_scale, torch.ones_like(best_scale))
    q = torch.round(x / safe[:, None]).clamp_(-zero, qmax - zero)
    sumlx, suml2 = (wx * q).sum(-1), (w * q * q).sum(-1)
    score = torch.where(suml2 > 0, sumlx * sumlx / suml2.clamp_min(1e-30), torch.full_like(sumlx, -_INF))
    better = score > best_score
    best_scale = torch.where(better, sumlx / suml2.clamp_min(1e-30), best_scale)
    return torch.where(flat, torch.zeros_like(best_scale), best_scale)


# ---- re-rounding against a fixed grid ---------------------------------------------------------------------------


def round_to_grid(x, scale, minimum, zero, qmax):
    """Integers L for weights x [..., n] on the grid of (scale, min or zero) [...]; scale 0 gives the zero code."""
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale)).unsqueeze(-1)
    if minimum is None:
        return torch.mul(x, inverse).round_().add_(zero).clamp_(0, qmax)
    return torch.add(x, minimum.unsqueeze(-1)).mul_(inverse).round_().clamp_(0, qmax)


def _sub_error(xs, ws, scale, minimum, zero, qmax):
    """Weighted squared error per sub-block [nb, n_sub] after re-rounding xs [nb, n_sub, sub] to the grid."""
    L = round_to_grid(xs, scale, minimum, zero, qmax)
    if minimum is None:
        diff = L.sub_(zero).mul_(scale.unsqueeze(-1)).sub_(xs)
    else:
        diff = L.mul_(scale.unsqueeze(-1)).sub_(minimum.unsqueeze(-1)).sub_(xs)
    return diff.square_().mul_(ws).sum(-1)


# ---- step 2: codes under a super-scale --------------------------------------------------------------------------

_SUPER_STEPS = [0.0] + [0.1 * k for k in range(-4, 5) if k != 0]


def _asym_kquant(cls: type[BlockType], x, w, code_max):
    nb = x.shape[0]
    n_sub = cls.block_size // cls.sub_size
    xs, ws = x.reshape(nb, n_sub, cls.sub_size), w.reshape(nb, n_sub, cls.sub_size)
    scale, offset = fit_affine(xs.reshape(-1, cls.sub_size), ws.reshape(-1, cls.sub_size), cls.qmax)
    scale, mins = scale.reshape(nb, n_sub), (-offset).reshape(nb, n_sub)

    def codes_for(values, d):
        safe = torch.where(d > 0, d, torch.ones_like(d))[:, None]
        return torch.round(values / safe).clamp_(0, code_max) * (d > 0)[:, None]

    def block_error(d, sc, dmin, m):
        return _sub_error(xs, ws, d[:, None] * sc, dmin[:, None] * m, None, cls.qmax).sum(-1)

    # super-scale of the mins, then of the scales, each the best of a few candidates by actual error
    d = fp16(scale.amax(-1) / code_max)
    dmin = fp16(mins.amax(-1) / code_max)
    sc = codes_for(scale, d)
    best_err = block_error(d, sc, dmin, codes_for(mins, dmin))
    for step in _SUPER_STEPS[1:]:
        cand = fp16(mins.amax(-1) / (code_max + step))
        err = block_error(d, sc, cand, codes_for(mins, cand))
        dmin, best_err = torch.where(err < best_err, cand, dmin), torch.minimum(err, best_err)
    m = codes_for(mins, dmin)
    for step in _SUPER_STEPS[1:]:
        cand = fp16(scale.amax(-1) / (code_max + step))
        err = block_error(cand, codes_for(scale, cand), dmin, m)
        d, best_err = torch.where(err < best_err, cand, d), torch.minimum(err, best_err)
    sc = codes_for(scale, d)

    # each sub-block tries its neighbouring (scale code, min code) pairs
    best = _sub_error(xs, ws, d[:, None] * sc, dmin[:, None] * m, None, cls.qmax)
    best_sc, best_m = sc.clone(), m.clone()
    for dsc in (-1, 0, 1):
        for dm in (-1, 0, 1):
            if dsc == 0 and dm == 0:
                continue
            c_sc, c_m = (sc + dsc).clamp(0, code_max), (m + dm).clamp(0, code_max)
            err = _sub_error(xs, ws, d[:, None] * c_sc, dmin[:, None] * c_m, None, cls.qmax)
            better = err < best
            best = torch.where(better, err, best)
            best_sc, best_m = torch.where(better, c_sc, best_sc), torch.where(better, c_m, best_m)
    codes = Codes(d=d, L=torch.empty(0), sc=best_sc.to(torch.int32), dmin=dmin, m=best_m.to(torch.int32))
    return _with_integers(cls, codes, x)


def _sym_kquant(cls: type[BlockType], x, w, code_lo, code_hi):
    nb = x.shape[0]
    n_sub = cls.block_size // cls.sub_size
    xs, ws = x.reshape(nb, n_sub, cls.sub_size), w.reshape(nb, n_sub, cls.sub_size)
    scale = fit_symmetric(xs.reshape(-1, cls.sub_size), ws.reshape(-1, cls.sub_size), cls.zero, cls.qmax)
    scale = scale.reshape(nb, n_sub)
    peak = scale.gather(-1, scale.abs().argmax(-1, keepdim=True)).squeeze(-1)

    def codes_for(d):
        safe = torch.where(d != 0, d, torch.ones_like(d))[:, None]
        return torch.round(scale / safe).clamp_(code_lo, code_hi) * (d != 0)[:, None]

    def block_error(d, sc):
        return _sub_error(xs, ws, d[:, None] * sc, None, cls.zero, cls.qmax).sum(-1)

    d = fp16(-peak / -code_lo)
    best_err = block_error(d, codes_for(d))
    for step in _SUPER_STEPS[1:]:
        cand = fp16(-peak / (-code_lo + step))
        err = block_error(cand, codes_for(cand))
        d, best_err = torch.where(err < best_err, cand, d), torch.minimum(err, best_err)
    sc = codes_for(d)
    best = _sub_error(xs, ws, d[:, None] * sc, None, cls.zero, cls.qmax)
    best_sc = sc.clone()
    for dsc in (-1, 1):
        c_sc = (sc + dsc).clamp(code_lo, code_hi)
        err = _sub_error(xs, ws, d[:, None] * c_sc, None, cls.zero, cls.qmax)
        better = err < best
        best, best_sc = torch.where(better, err, best), torch.where(better, c_sc, best_sc)
    return _with_integers(cls, Codes(d=d, L=torch.empty(0), sc=best_sc.to(torch.int32)), x)


def _legacy_sym(cls, x, w):
    # the fitted scale, or the plain one (largest weight on the grid's end) when fp16 rounding favours it
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    candidates = [fp16(fit_symmetric(x, w, cls.zero, cls.qmax)), fp16(-peak / cls.zero)]
    return _best_legacy(cls, x, w, [Codes(d=d, L=torch.empty(0)) for d in candidates])


def _legacy_asym(cls, x, w):
    # the fitted scale/min, or plain min/max (exact when the weights already sit on a 32-wide grid)
    scale, offset = fit_affine(x, w, cls.qmax, allow_positive_min=True, steps=_FINE_STEPS)
    lo, hi = x.amin(-1), x.amax(-1)
    candidates = [(scale, offset), ((hi - lo) / cls.qmax, lo)]
    return _best_legacy(cls, x, w, [Codes(d=fp16(d), L=torch.empty(0), dmin=fp16(m)) for d, m in candidates])


def _best_legacy(cls, x, w, candidates: list[Codes]) -> Codes:
    """Per block, the candidate whose stored (fp16) parameters give the least weighted error."""
    best, best_err = None, None
    for codes in candidates:
        codes = _with_integers(cls, codes, x)
        err = (w * (cls.values(codes) - x).pow(2)).sum(-1)
        if best is None:
            best, best_err = codes, err
            continue
        take = err < best_err
        best_err = torch.where(take, err, best_err)
        best.d = torch.where(take, codes.d, best.d)
        best.L = torch.where(take[:, None], codes.L, best.L)
        if best.dmin is not None:
            best.dmin = torch.where(take, codes.dmin, best.dmin)
    return best


def _q8_0(cls, x, w):
    """Q8_0 as llama.cpp and gguf-py make it (d = block absmax / 127, q rounded half away from zero), in torch:
    the same float32 operations in the same order, so the bytes are gguf-py's (test); about 2x faster than its
    numpy on the reference model's 28M-weight embedding (0.13 s against 0.23 s, in chunks of _SMALL_CHUNK_ELEMENTS)."""
    d = x.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = x * inverse
    magnitude = scaled.abs()
    floored = magnitude.floor()
    q = torch.sign(scaled) * (floored + (2 * (magnitude - floored)).floor_())  # gguf-py's np_roundf
    return Codes(d=fp16(d.squeeze(-1)), L=(q + 128).to(torch.int32))


def _via_gguf_py(cls, x, w):
    """gguf-py's bit-exact reference encoder for TQ1_0/TQ2_0 (d = block absmax: exact for weights that are
    already ternary)."""
    data = gguf_quants.quantize(x.numpy().astype(np.float32), cls.qtype)
    return cls.unpack(torch.from_numpy(data).reshape(x.shape[0], -1))


def _with_integers(cls: type[BlockType], codes: Codes, x: torch.Tensor) -> Codes:
    """Fill codes.L by rounding x to the grid the stored codes actually decode to."""
    scale, minimum = cls.grid(codes)
    nb = x.shape[0]
    xs = x.reshape(nb, -1, cls.sub_size)
    if cls.levels is not None:
        codes.L = round_to_levels(cls, xs, scale).reshape(nb, cls.block_size)
        return codes
    codes.L = round_to_grid(xs, scale, minimum, cls.zero, cls.qmax).reshape(nb, cls.block_size).to(torch.int32)
    return codes


_ENCODERS = {
    T.Q2_K: lambda cls, x, w: _asym_kquant(cls, x, w, 15),
    T.Q3_K: lambda cls, x, w: _sym_kquant(cls, x, w, -32, 31),
    T.Q4_K: lambda cls, x, w: _asym_kquant(cls, x, w, 63),
    T.Q5_K: lambda cls, x, w: _asym_kquant(cls, x, w, 63),
    T.Q6_K: lambda cls, x, w: _sym_kquant(cls, x, w, -128, 127),
    T.Q4_0: _legacy_sym,
    T.Q5_0: _legacy_sym,
    T.Q4_1: _legacy_asym,
    T.Q5_1: _legacy_asym,
    T.Q8_0: _q8_0,
    T.TQ1_0: _via_gguf_py,
    T.TQ2_0: _via_gguf_py,
    T.IQ4_NL: encode_iq4_nl,
    T.IQ4_XS: encode_iq4_xs,
    T.MXFP4: encode_mxfp4,
    **{qtype: encode_iq1 if qtype in (T.IQ1_S, T.IQ1_M) else encode_lattice for qtype in LATTICE_TYPES},
}

QUANTIZED_TYPES = tuple(_ENCODERS)
_UNWEIGHTED = (T.Q8_0, T.TQ1_0, T.TQ2_0)  # encoders that take no importance weights
_CHUNK_ELEMENTS = 1 << 21  # blocks per torch call bounded to keep temporaries small
# Q8_0's few memory-bound operations run 3x faster on chunks whose temporaries stay in cache and the allocator's
# pool (a 28M-weight embedding: 0.42 s at 2M values a chunk, 0.13 s at 256k; gguf-py's numpy 0.23 s); the
# searches' many operations per value measured no faster in small chunks
_SMALL_CHUNK_ELEMENTS = 1 << 18


def _chunk_elements(qtype: T) -> int:
    return _SMALL_CHUNK_ELEMENTS if qtype in _UNWEIGHTED else _CHUNK_ELEMENTS


def encode(weight: torch.Tensor, qtype: T, importance: torch.Tensor | None = None) -> Codes:
    """Codes of a 2-D weight [rows, cols] (cols a multiple of the block size); importance: [cols] or None."""
    cls = block_type(qtype)
    rows, cols = weight.shape
    x = weight.detach().to("cpu", torch.float32).reshape(-1, cls.block_size)
    imp = None
    if importance is not None:
        imp = importance.to("cpu", torch.float32).reshape(1, cols).expand(rows, cols).reshape(-1, cls.block_size)
    parts = []
    step = max(1, _chunk_elements(qtype) // cls.block_size)
    for start in range(0, x.shape[0], step):
        xb = x[start : start + step]
        w = None if qtype in _UNWEIGHTED else element_weights(xb, qtype, None if imp is None else imp[start : start + step])
        parts.append(_ENCODERS[qtype](cls, xb, w))
    return _cat_codes(parts)


def _cat_codes(parts: list[Codes]) -> Codes:
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
    return Codes(d=cat("d"), L=cat("L"), sc=cat("sc"), dmin=cat("dmin"), m=cat("m"), signs=cat("signs"))


def encode_bytes(weight: torch.Tensor, qtype: T, importance: torch.Tensor | None = None) -> np.ndarray:
    """uint8 [rows, row_bytes] in llama.cpp's layout, encoded and packed a few million values at a time.

    Blocks never span rows, so rows encode on their own: the bytes are the same as in one piece, and a
    Llama-3-8B output head (525M values) no longer holds every block's codes at once (17 GB at peak before).
    """
    cls = block_type(qtype)
    rows, cols = weight.shape
    row_bytes = cols // cls.block_size * cls.type_size
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    step = max(1, _chunk_elements(qtype) // max(cols, 1))
    for start in range(0, rows, step):
        codes = encode(weight[start : start + step], qtype, importance)
        out[start : start + step] = cls.pack(codes).reshape(-1, row_bytes).numpy()
    return out


def grid_of(codes: Codes, qtype: T, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per (row, sub-block) scale and min of encoded codes: [rows, cols // sub_size] each (min None if symmetric)."""
    scale, minimum = block_type(qtype).grid(codes)
    return scale.reshape(rows, -1), None if minimum is None else minimum.reshape(rows, -1)


__all__ = ["QK_K", "QUANTIZED_TYPES", "element_weights", "encode", "encode_bytes", "grid_of", "round_to_grid"]
