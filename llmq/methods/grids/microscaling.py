"""Microscaling float grids: NVFP4, MXFP4 and MXFP8 weights, as Blackwell and Hopper tensor cores read them.

Each row is cut into groups of 16 (NVFP4) or 32 (MX) weights; a group's values are small floats times one scale:

    NVFP4   w_hat = e2m1 * (S / g)   S: the group's scale, an FP8-E4M3 value; g: one float32 per tensor
    MXFP4   w_hat = e2m1 * 2^e       e: the group's E8M0 exponent (a byte, bias 127)
    MXFP8   w_hat = e4m3 * 2^e

E2M1 holds 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; E4M3 up to 448. The divisions and products are the
ones compressed-tensors' decompressor makes (S / g first, in float32), so llmq.load and transformers decode the
same numbers.

Scales, llmq's own choice: g maps the tensor's largest weight to the top of FP8 x E2M1 (448 x 6), so the
largest group scale uses E4M3's whole range. The harness rounds the Linears that read one input as one stacked
matrix, so q/k/v (and gate/up) share one g: vLLM fuses them into one layer with one global scale. Each group's
scale is chosen by its error, measured after the scale itself is rounded into its storage type: for NVFP4 the
E4M3 value nearest max|w| / 6, the one above it and the three below it (a smaller scale clips the group's peak to
gain resolution for the rest), for MX the exponent that puts the peak at the element type's top binade (OCP's
rule, which clips the peak) and the ones above and below it.
With an importance per input column (the imatrix, from --calib), the error is weighted by it.

As for FP8, "integers" are the element values themselves (held as float), so GPTQ's error feedback rounds onto
these grids unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from llmq.core.interfaces import Grid, GridFit
from llmq.core.scheme import E2M1_MAX, FP8_MAX, MicroscaledTensor, QuantScheme

E2M1_LEVELS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# |v| past each midpoint takes the next level; a tie goes to the level with the even mantissa (as IEEE rounds):
# down at 0.25, 1.25, 2.5 and 5, up at 0.75, 1.75 and 3.5
_UP_AT_TIE = (0.75, 1.75, 3.5)
_DOWN_AT_TIE = (0.25, 1.25, 2.5, 5.0)
E8M0_BIAS = 127
_TOP_EXPONENT = {"mxfp4": 2, "mxfp8": 8}  # the element type's largest binade: 6 = 1.5 * 2^2, 448 = 1.75 * 2^8


def e2m1_index(v: torch.Tensor) -> torch.Tensor:
    """The E2M1 magnitude code (0..7) nearest |v|, clamped at 6."""
    a = v.abs()
    index = torch.zeros_like(a, dtype=torch.uint8)
    for edge in _DOWN_AT_TIE:
        index += a > edge
    for edge in _UP_AT_TIE:
        index += a >= edge
    return index


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """The nearest E2M1 values of v (as float32; zero is +0), ties to the even significand: |v| rounded on the
    grid's spacing where it lies (0.5 below 2, 1 below 4, 2 above), which torch.round's ties-to-even makes
    E2M1's own rule (the same values as e2m1_index's table, tested), then clamped to 6."""
    a = v.float().abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    level = a.div_(step).round_().mul_(step).clamp_(max=E2M1_MAX)
    return torch.where(v < 0, -level, level).add_(0.0)  # + 0.0: -0 to +0


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def _e4m3_neighbours(value: torch.Tensor, steps: tuple[int, ...]) -> list[torch.Tensor]:
    """E4M3 values `steps` codes away from the positive E4M3 values `value` (codes kept within 0..448)."""
    codes = value.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
    return [(codes + step).clamp(0, 0x7E).to(torch.uint8).view(torch.float8_e4m3fn).float() for step in steps]


class MicroscalingGrid(Grid):
    """NVFP4 / MXFP4 / MXFP8 (module docstring); weighs its scale search by an importance when it has one."""

    weighted = True

    def __init__(self, scheme: QuantScheme):
        self.scheme = scheme
        self.static_inputs = scheme.static_inputs  # NVFP4 (W4A4): its inputs' global scale comes from calibration

    def with_input_range(self, quantized: MicroscaledTensor, absmax: torch.Tensor, histogram=None) -> MicroscaledTensor:
        """The inputs' global scale maps the largest |x| the calibration windows brought to the top of FP8 x E2M1,
        as the weights' does; at run time each 16 inputs get an FP8 scale under it (compressed-tensors' rule)."""
        top = absmax.float().max().clamp(min=torch.finfo(torch.float32).tiny)
        return replace(quantized, input_global_scale=(FP8_MAX * E2M1_MAX / top).reshape(1).cpu())

    def fit(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> MicroscalingFit:
        return MicroscalingFit(self.scheme, weight, importance)

    def mismatch(self, quantized) -> str | None:
        if not isinstance(quantized, MicroscaledTensor) or quantized.scheme != self.scheme:
            return f"not {self.scheme.name}"
        return None


class MicroscalingFit(GridFit):
    def __init__(self, scheme: QuantScheme, weight: torch.Tensor, importance: torch.Tensor | None):
        self.scheme, self.weight = scheme, weight
        rows, cols = weight.shape
        self.group = scheme.group_size
        self.round_elements = e4m3_round if scheme.weight_type == "mxfp8" else e2m1_round
        self.element_max = FP8_MAX if scheme.weight_type == "mxfp8" else E2M1_MAX
        grouped = weight.reshape(rows, cols // self.group, self.group)
        peak = grouped.abs().amax(-1)
        if scheme.weight_type == "nvfp4":
            top = peak.max().clamp(min=torch.finfo(torch.float32).tiny)
            self.global_scale = (FP8_MAX * E2M1_MAX / top).reshape(1).float()
            stored = _e4m3_neighbours(e4m3_round(peak / E2M1_MAX * self.global_scale), (1, 0, -1, -2, -3))
            candidates = [(s, s / self.global_scale) for s in stored]
        else:
            self.global_scale = None
            exponent = torch.floor(torch.log2(peak.clamp(min=2.0 ** -E8M0_BIAS))) - _TOP_EXPONENT[scheme.weight_type]
            candidates = []
            for step in (1, 0, -1):
                e = (exponent + step).clamp(-E8M0_BIAS, E8M0_BIAS)
                candidates.append((torch.exp2(e), torch.exp2(e)))
        weights = None if importance is None else importance.to(weight.device, torch.float32).reshape(
            1, cols // self.group, self.group)
        best_error, self.scale = None, None
        for stored, effective in candidates:
            error = self._group_error(grouped, effective, weights)
            if best_error is None:
                best_error, self.scale = error, stored
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            self.scale = torch.where(better, stored, self.scale)
        # the effective scale of each group (what position/round/value divide and multiply by)
        self.effective = self.scale if self.global_scale is None else self.scale / self.global_scale

    def _group_error(self, grouped, effective, weights):
        safe = torch.where(effective > 0, effective, torch.ones_like(effective)).unsqueeze(-1)
        diff = self.round_elements(grouped / safe) * effective.unsqueeze(-1) - grouped
        diff = diff.square()
        return (diff if weights is None else diff * weights).sum(-1)

    def _scales(self, columns):
        return self.effective[:, columns // self.group]  # no weight-sized copy of the scales

    def nearest(self) -> torch.Tensor:
        return self.round(self.weight, torch.arange(self.weight.shape[1], device=self.weight.device))

    def position(self, w, columns):
        s = self._scales(columns)
        return w / torch.where(s > 0, s, torch.ones_like(s))

    def round(self, w, columns):
        return self.round_elements(self.position(w, columns))

    def clamp(self, q):
        return q.clamp(-self.element_max, self.element_max)

    def value(self, q, columns):
        return q * self._scales(columns)

    def result(self, integers: torch.Tensor) -> MicroscaledTensor:
        return MicroscaledTensor(integers.to("cpu", torch.float8_e4m3fn), self.scale.cpu().float(),
                                 None if self.global_scale is None else self.global_scale.cpu(), self.scheme)


def nvfp4_inputs(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 (W4A4) inputs as compressed-tensors rounds them at run time: each 16 values along the last axis get
    the scale S = e4m3(g * max|x| / 6) (the group's maximum divided in x's dtype, as it does), then
    x -> e2m1(x / (S / g)) * (S / g) in float32, returned in x's dtype."""
    groups = x.unflatten(-1, (x.shape[-1] // 16, 16))
    local = (groups.abs().amax(-1, keepdim=True) / E2M1_MAX).float() * global_scale.float()
    scale = e4m3_round(local)
    scale = torch.where(scale == 0, torch.full_like(scale, 0.125), scale) / global_scale.float()  # its eps for 0
    return (e2m1_round(groups.float() / scale) * scale).flatten(-2).to(x.dtype)


def mx_inputs(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """MXFP4 / MXFP8 (W4A4 / W8A8) inputs as compressed-tensors rounds them at run time: each 32 values along the
    last axis get the scale 2^e, e = the exponent of their max|x| (bumped one up from a significand of 1.75: it
    rounds to a power of two with E2M1's one mantissa bit, for MXFP8 too) minus the element type's top exponent;
    x -> element(x / 2^e) * 2^e, in x's dtype."""
    groups = x.unflatten(-1, (x.shape[-1] // 32, 32))
    significand, exponent = torch.frexp(groups.abs().amax(-1, keepdim=True).float())  # peak = f * 2^e, f in [0.5, 1)
    exponent = exponent - 1 + (significand >= 0.875).int() - _TOP_EXPONENT[weight_type]
    scale = torch.exp2(exponent.clamp(-E8M0_BIAS, E8M0_BIAS).float()).to(x.dtype)
    round_elements = e4m3_round if weight_type == "mxfp8" else e2m1_round
    elements = round_elements((groups / scale).float()).to(x.dtype)
    return (elements * scale).flatten(-2).to(x.dtype)


# ---- the compressed-tensors layouts -----------------------------------------------------------------------------


def pack_e2m1(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values [rows, cols] -> uint8 [rows, cols / 2]: code = sign << 3 | magnitude index, element 2i in the
    low nibble and 2i + 1 in the high one (compressed-tensors' nvfp4/mxfp4 layout)."""
    v = values.float()
    codes = e2m1_index(v) | ((v < 0).to(torch.uint8) << 3)
    pairs = codes.reshape(v.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2] -> E2M1 values [rows, cols] (float32)."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    level = E2M1_LEVELS.to(packed.device)[(codes & 0x07).long()]
    return torch.where((codes & 0x08) > 0, -level, level)


def e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    """Powers of two -> their E8M0 bytes (biased exponents)."""
    return (torch.log2(scale).round().to(torch.int32) + E8M0_BIAS).to(torch.uint8)


def e8m0_values(codes: torch.Tensor) -> torch.Tensor:
    return torch.exp2(codes.to(torch.float32) - E8M0_BIAS)


__all__ = ["MicroscaledTensor", "MicroscalingGrid", "e2m1_round", "e8m0_bytes", "e8m0_values", "nvfp4_inputs", "mx_inputs",
           "pack_e2m1", "unpack_e2m1"]
