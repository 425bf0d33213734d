"""The integer group grid of compressed-tensors: its scheme, its formulas and the tensor it produces.

A weight row is split into groups of `group_size` input columns (per-channel: one group per row). Each group
has a scale s and, when asymmetric, an integer zero point z; integers are signed:

    q = clamp(round(w / s) + z, qmin, qmax)        qmin = -2**(bits-1), qmax = 2**(bits-1) - 1
    w_hat = (q - z) * s                           (exact in float32; cast to the compute dtype at use)

These are shared by the methods that choose q, s and z (llmq/methods/grids/integer.py), the target that
writes them and the runtime that reads them back, so they live here, below all three.

So does MicroscaledTensor, the weight of the NVFP4 / MXFP4 / MXFP8 grids (llmq/methods/grids/microscaling.py):
float elements, one scale per 16 or 32 weights; and BlockScaledTensor, FP8_BLOCK's (llmq/methods/grids/fp8.py):
E4M3 elements, one scale per 128 x 128 block.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llmq.core.errors import LlmqError
from llmq.core.ranges import AbsHistogram
from llmq.core.records import record

SUPPORTED_BITS = (2, 3, 4, 8, 16)


WEIGHT_TYPES = ("int", "float", "float16", "bfloat16", "nf4", "nvfp4", "mxfp4", "mxfp8")
# microscaling float formats (OCP MX, NVIDIA's NVFP4): small float elements, one scale per short group; what
# Blackwell (FP4) and Hopper/Blackwell (MXFP8) run natively. weight type -> (bits, group size, display name)
MICROSCALING = {"nvfp4": (4, 16, "NVFP4A16"), "mxfp4": (4, 32, "MXFP4A16"), "mxfp8": (8, 32, "MXFP8A16")}
CAST_TYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # 16-bit casts: nothing rounded to a grid
ACT_BITS = (8, 16)
ACT_TYPES = ("int", "float")  # an input type other than the weights' (W4AFP8: int4 weights, FP8 inputs)
FP8_BLOCK = 128  # FP8_BLOCK's weight blocks are FP8_BLOCK x FP8_BLOCK, its inputs' groups FP8_BLOCK wide (DeepSeek-V3's)
ACT_RANGES = ("max", "mse")  # how a static input scale is chosen (llmq/core/ranges.py)
FP8_MAX = 448.0  # the largest E4M3 value (torch.float8_e4m3fn)
E2M1_MAX = 6.0  # the largest FP4 E2M1 value


@record
@dataclass(frozen=True)
class QuantScheme:
    """What grid a weight is rounded to. group_size=-1 means one group per output row (per-channel).

    weight_type "float16" / "bfloat16" (16 bits) is a plain cast of the whole model, no grid and no calibration.
    weight_type "float" is FP8 E4M3 (8 bits, one scale per row: w_hat = e4m3(w / s) * s). act_bits 8 quantizes
    each Linear's input too (W8A8, in the weights' type): what serving engines run on int8 / FP8 tensor cores;
    act_bits 16 is int16 inputs with int8 weights (TFLite's "16x8", an evaluation scheme). Inputs are quantized
    per token at run time (act_dynamic), or with one scale per Linear fixed from the calibration data (static):
    from the largest |x| (act_range "max", never clipped) or at the least squared error over every calibration
    value (act_range "mse", which clips the rare largest values).

    Schemes of current GPUs with quantized inputs, each what compressed-tensors' preset of that name says:
    W4A8 / W4AFP8, 4-bit symmetric integer groups with 8-bit inputs per token at run time, int8 or (act_type
    "float") FP8; FP8_BLOCK, FP8 weights (weight_type "float" with group_size 128) with one scale per 128 x 128
    block and inputs in FP8 with a scale per 128 values of a token; MXFP4 / MXFP8 (act_bits 4 / 8 on an MX weight
    type), inputs in the weights' element type with a power-of-two scale per 32 values, made at run time."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False  # asymmetric (zero points) by default: 0.7% larger, and clearly better
    weight_type: str = "int"
    act_bits: int | None = None
    act_dynamic: bool = True
    act_range: str = "max"
    act_type: str | None = None  # the inputs' type where it is not the weights' ("float": W4AFP8's FP8 inputs)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise LlmqError(f"--bits {self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and (self.group_size < 1 or self.group_size % 8):
            raise LlmqError(f"--group-size {self.group_size} is not supported; use a multiple of 8 (32, 64, 128) or -1")
        if self.weight_type not in WEIGHT_TYPES:
            raise LlmqError(f"weight type {self.weight_type!r} is not supported; use int or float (FP8)")
        if (self.bits == 16) != (self.weight_type in CAST_TYPES):
            raise LlmqError("16 bits is a cast: use --scheme fp16 or bf16 alone, without --bits")
        if self.weight_type == "nf4" and (self.bits, self.group_size, self.symmetric, self.act_bits) != (4, 64, True, None):
            raise LlmqError("NF4 is 4 bits with one absmax per 64 weights: use --scheme nf4 alone")
        if self.weight_type in MICROSCALING:
            self._check_microscaling()
            return
        if self.weight_type in CAST_TYPES and self.act_bits is not None:
            raise LlmqError("a 16-bit cast quantizes no inputs; drop --act-bits")
        per_channel_8bit = self.bits == 8 and self.group_size == -1 and self.symmetric
        if self.weight_type == "float" and not (per_channel_8bit or self.fp8_blocks):
            raise LlmqError("FP8 weights are 8 bits, symmetric, one scale per channel (--scheme fp8 / fp8_dynamic) or "
                            "per 128 x 128 block (--scheme FP8_BLOCK): use one of those alone, without --bits, "
                            "--group-size or --asym")
        if self.fp8_blocks and (self.act_bits, self.act_dynamic, self.act_type) != (8, True, None):
            raise LlmqError("FP8_BLOCK quantizes inputs in FP8 per 128 values at run time: use --scheme FP8_BLOCK alone")
        if self.act_type is not None and (self.act_type not in ACT_TYPES or self.act_bits != 8
                                          or self.weight_type != "int"):
            raise LlmqError("an input type of its own is FP8 inputs for integer weights (W4AFP8): use --scheme "
                            "W4AFP8 alone")
        w4a8 = self.bits == 4 and self.symmetric and self.act_bits == 8 and self.act_dynamic
        if self.act_bits is not None and (self.act_bits not in ACT_BITS or not (per_channel_8bit or w4a8
                                                                                 or self.fp8_blocks)):
            raise LlmqError("quantized activations need 8-bit symmetric per-channel weights and --act-bits 8 or 16 "
                            "(--scheme w8a8 or fp8), or 4-bit symmetric weights with inputs per token at run time "
                            "(--scheme W4A8 or W4AFP8): use one of those alone")
        if self.act_bits == 16 and self.weight_type != "int":
            raise LlmqError("--act-bits 16 is int16 inputs with int8 weights; FP8 inputs are 8 bits: drop --act-bits")
        if not self.act_dynamic and self.act_bits is None:
            raise LlmqError("--act-static fixes the scale of quantized inputs; it needs --scheme w8a8 or fp8 (or --act-bits)")
        if self.act_range not in ACT_RANGES:
            raise LlmqError(f"--act-range {self.act_range} is unknown; use one of {', '.join(ACT_RANGES)}")
        if self.act_range != "max" and not self.static_inputs:
            raise LlmqError(f"--act-range {self.act_range} chooses a static input scale; add --act-static "
                            "(with --scheme w8a8 or fp8)")

    def _check_microscaling(self) -> None:
        bits, group, name = MICROSCALING[self.weight_type]
        fp4_inputs = self.weight_type == "nvfp4" and self.act_bits == 4 and not self.act_dynamic
        mx_inputs = self.weight_type != "nvfp4" and self.act_bits == bits and self.act_dynamic  # MXFP4 / MXFP8
        weights_only = self.act_bits is None and self.act_dynamic
        if (self.bits, self.group_size, self.symmetric) != (bits, group, True) or not (
                weights_only or fp4_inputs or mx_inputs) or self.act_range != "max" or self.act_type is not None:
            raise LlmqError(f"{name} is {bits}-bit floats with one scale per {group} weights: use --scheme {name} "
                            f"alone (or {name.removesuffix('A16')} for inputs in that format too), without --bits, "
                            "--group-size, --asym or --act-*")

    @property
    def name(self) -> str:
        """W4A16 g128 asym, W8A8 int8, W8A8 FP8: what the summary, the card and the output's name say."""
        if self.weight_type in MICROSCALING:
            name = MICROSCALING[self.weight_type][2]
            return name if self.act_bits is None else name.removesuffix("A16")
        if self.fp8_blocks:
            return "FP8_BLOCK"
        if self.act_bits is not None and self.bits == 4:
            return f"{'W4AFP8' if self.act_type == 'float' else 'W4A8 int8'} g{self.group_size}"
        if self.act_bits is not None:
            inputs = "A8" if self.act_bits == 8 else f"A{self.act_bits}-int{self.act_bits}"
            timing = "" if self.act_dynamic else " static" + ("" if self.act_range == "max" else f" {self.act_range}")
            return f"W8{inputs} {'FP8' if self.weight_type == 'float' else 'int8'}{timing}"
        if self.weight_type == "float":
            return "W8A16 FP8"
        if self.is_cast:
            return "FP16" if self.weight_type == "float16" else "BF16"
        if self.weight_type == "nf4":
            return "NF4"
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits}A16 {group} {'sym' if self.symmetric else 'asym'}"

    @property
    def static_inputs(self) -> bool:
        """Inputs quantized with one scale per Linear fixed from calibration (which then needs data)."""
        return self.act_bits is not None and not self.act_dynamic

    @property
    def fp8_blocks(self) -> bool:
        """FP8_BLOCK: FP8 weights with one scale per 128 x 128 block (BlockScaledTensor), not per row."""
        return self.weight_type == "float" and self.group_size != -1

    @property
    def float_inputs(self) -> bool:
        """Inputs rounded to FP8 E4M3 (FP8 weights' own, or W4AFP8's), not to integers."""
        return self.weight_type == "float" or self.act_type == "float"

    @property
    def input_group_size(self) -> int | None:
        """Input values per run-time scale along a token, where not the whole token: FP8_BLOCK's 128, MX's 32."""
        if self.fp8_blocks:
            return FP8_BLOCK
        if self.microscaling and self.act_bits is not None and self.act_dynamic:
            return self.group_size
        return None

    @property
    def is_cast(self) -> bool:
        return self.weight_type in CAST_TYPES

    @property
    def microscaling(self) -> bool:
        """NVFP4 / MXFP4 / MXFP8: float elements with one scale per 16 or 32 weights (llmq/methods/grids/microscaling.py)."""
        return self.weight_type in MICROSCALING

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group_size_for(self, in_features: int) -> int:
        """The input columns per scale of a Linear `in_features` wide: the group size where it divides that width,
        else the whole row (one scale per channel). A target first picks a group size that divides every Linear it
        can (fitting_group_size), so only widths no power of two from 32 divides take the whole row."""
        if self.group_size == -1 or in_features % self.group_size:
            return in_features
        return self.group_size

    def fitting_group_size(self, widths) -> int:
        """The group size a run uses for Linears of these input widths: the scheme's where it divides them all;
        else the largest power of two from 32 below it that divides every width some such power divides (the
        group sizes serving kernels such as vLLM's Marlin run; one size for the whole model, since transformers
        dequantizes an asymmetric checkpoint with one config group's scheme). SmolLM2-135M (576 and 1536 wide)
        under the default 128 takes 64 throughout; a width no power of two from 32 divides keeps one scale per
        channel (group_size_for)."""
        widths = set(widths)
        if self.group_size == -1 or all(width % self.group_size == 0 for width in widths):
            return self.group_size
        floor = 32 if self.group_size >= 32 else 8  # below 32 only when asked for: no serving kernel runs it
        size = 1 << (self.group_size.bit_length() - 1)  # the largest power of two <= group_size
        while size > floor and (size == self.group_size or any(width % size for width in widths if width % floor == 0)):
            size //= 2
        return max(size, floor)

    @property
    def act_half_range(self) -> float:
        """What an input's scale divides its largest |x| by. Per token at run time, compressed-tensors' own:
        (qmax - qmin) / 2 (127.5 for int8: the largest value rounds to 128 and is clipped half a step). A static
        scale is fixed once for inputs it has not seen, so it keeps the whole range: qmax (127), so the
        calibration maximum is never clipped. FP8 either way: 448, E4M3's largest value."""
        if self.float_inputs:
            return FP8_MAX
        qmax = (1 << (self.act_bits - 1)) - 1
        return qmax + 0.5 if self.act_dynamic else float(qmax)

    @property
    def act_limits(self) -> tuple[float, float]:
        """The input codes' range: [-128, 127] for int8, [-448, 448] for FP8."""
        if self.float_inputs:
            return -FP8_MAX, FP8_MAX
        return -float(1 << (self.act_bits - 1)), float((1 << (self.act_bits - 1)) - 1)


# Named schemes (`--scheme NAME`, any case), the fields each one fixes. The upper-case names are llm-compressor's
# presets and mean what they mean there: W4A16 4-bit symmetric groups of 128, W4A16_ASYM the same with zero points,
# W8A16 8-bit symmetric per channel, W8A8 int8 per channel with int8 inputs per token at run time, FP8 E4M3 weights
# with one static input scale per Linear from calibration, FP8_DYNAMIC the same with per-token input scales
# (llm-compressor's FP8 keeps one weight scale per tensor; llmq's one per output channel, which is finer).
# NVFP4A16: E2M1 weights, an FP8-E4M3 scale per 16 and one float32 global scale per tensor; MXFP4A16 / MXFP8A16:
# E2M1 / E4M3 weights with a power-of-two (E8M0) scale per 32 (the OCP microscaling formats).
# Then llmq's own: the 16-bit casts and NF4 (QLoRA's, in bitsandbytes' layout).
PRESETS = {
    "w4a16": {"bits": 4, "group_size": 128, "symmetric": True, "weight_type": "int", "act_bits": None},
    "w4a16_asym": {"bits": 4, "group_size": 128, "symmetric": False, "weight_type": "int", "act_bits": None},
    "w8a16": {"bits": 8, "group_size": -1, "symmetric": True, "weight_type": "int", "act_bits": None},
    "w8a8": {"bits": 8, "group_size": -1, "symmetric": True, "weight_type": "int", "act_bits": 8},
    "fp8": {"bits": 8, "group_size": -1, "symmetric": True, "weight_type": "float", "act_bits": 8, "act_dynamic": False},
    "fp8_dynamic": {"bits": 8, "group_size": -1, "symmetric": True, "weight_type": "float", "act_bits": 8,
                    "act_dynamic": True},
    "fp16": {"bits": 16, "group_size": -1, "symmetric": True, "weight_type": "float16"},
    "bf16": {"bits": 16, "group_size": -1, "symmetric": True, "weight_type": "bfloat16"},
    "nf4": {"bits": 4, "group_size": 64, "symmetric": True, "weight_type": "nf4"},
    **{name.lower(): {"bits": bits, "group_size": group, "symmetric": True, "weight_type": weight_type, "act_bits": None}
       for weight_type, (bits, group, name) in MICROSCALING.items()},
    # W4A4: inputs in E2M1 too, an FP8 scale per 16 of them made at run time under a global scale from calibration
    "nvfp4": {"bits": 4, "group_size": 16, "symmetric": True, "weight_type": "nvfp4", "act_bits": 4, "act_dynamic": False},
    # MX inputs too, each 32 of them with a power-of-two scale made at run time
    "mxfp4": {"bits": 4, "group_size": 32, "symmetric": True, "weight_type": "mxfp4", "act_bits": 4, "act_dynamic": True},
    "mxfp8": {"bits": 8, "group_size": 32, "symmetric": True, "weight_type": "mxfp8", "act_bits": 8, "act_dynamic": True},
    # int4 groups of 128 with 8-bit inputs per token at run time: int8 (W4A8) or FP8 (W4AFP8, Hopper's mixed kernels)
    "w4a8": {"bits": 4, "group_size": 128, "symmetric": True, "weight_type": "int", "act_bits": 8, "act_dynamic": True,
             "act_type": None},
    "w4afp8": {"bits": 4, "group_size": 128, "symmetric": True, "weight_type": "int", "act_bits": 8,
               "act_dynamic": True, "act_type": "float"},
    # FP8 in 128 x 128 weight blocks, inputs in FP8 with a scale per 128 values of a token (DeepSeek-V3's layout)
    "fp8_block": {"bits": 8, "group_size": FP8_BLOCK, "symmetric": True, "weight_type": "float", "act_bits": 8,
                  "act_dynamic": True},
}
_FLAG_OF = {"bits": "--bits", "group_size": "--group-size", "symmetric": "--sym/--asym", "act_bits": "--act-bits",
            "act_dynamic": "--act-static/--act-dynamic", "act_range": "--act-range"}


LLM_COMPRESSOR_PRESETS = ("W4A16", "W4A16_ASYM", "W8A16", "W8A8", "W4A8", "W4AFP8", "FP8", "FP8_DYNAMIC", "FP8_BLOCK",
                          "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4", "MXFP8A16", "MXFP8")


def preset_names() -> list[str]:
    """The --scheme names as users write them: llm-compressor's in upper case, llmq's own in lower case."""
    return [*LLM_COMPRESSOR_PRESETS, *(name for name in PRESETS if name.upper() not in LLM_COMPRESSOR_PRESETS)]


def scheme_with_preset(name: str | None, fields: dict, typed: Iterable[str] = ()) -> QuantScheme:
    """The scheme of these fields, or of the named preset. A field the preset fixes is refused when the user typed
    it (`typed`: field names given on the command line), whatever its value, or when it was set away from its
    default to another value than the preset's (`--scheme fp8 --bits 4` means nothing)."""
    if name is None:
        return QuantScheme(**fields)
    if name.lower() not in PRESETS:
        raise LlmqError(f"--scheme {name} is unknown; use one of {', '.join(preset_names())}")
    name = name.lower()
    defaults, fixed = QuantScheme(), PRESETS[name]
    clash = [_FLAG_OF.get(key, key) for key, value in fields.items()
             if key in fixed and (key in typed or value not in (getattr(defaults, key), fixed[key]))]
    if clash:
        raise LlmqError(f"--scheme {name} fixes {', '.join(clash)}; drop them")
    return QuantScheme(**{**fields, **fixed})


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """Integers (as float) for w under broadcastable scale/zero."""
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(scheme.qmin, scheme.qmax)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(q - z) * s in float32: exact, since s holds a storage-dtype value and q - z is a small integer."""
    if zero is not None:
        q = q - zero
    return q * scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Full [out, in] float32 weight from integers and per-group parameters."""
    rows, cols = qweight.shape
    g = qweight.float().reshape(rows, cols // group_size, group_size)
    z = None if zero_point is None else zero_point.float().unsqueeze(-1)
    return dequantize_values(g, scale.float().unsqueeze(-1), z).reshape(rows, cols)


def round_input_codes(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """x / scale (float32) to the input codes, as W8A8 inputs are rounded at run time: int8/int16 integers, or E4M3
    values, clamped to the scheme's range."""
    low, high = scheme.act_limits
    if not scheme.float_inputs:
        return torch.round(x).clamp_(low, high)
    return x.clamp(low, high).to(torch.float8_e4m3fn).float()


def static_input_scale(absmax: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype,
                       histogram: AbsHistogram | None = None) -> torch.Tensor:
    """The one input scale [1] of a Linear, in its storage dtype. With act_range "max", from the largest |x| it saw
    in calibration: the smallest value of `dtype` at which max|x| / scale stays within the half range in float32,
    as inputs are divided at run time (so the calibration maximum is never clipped, however the cast to `dtype`
    rounds). With "mse", the clip point of least error over the calibration values' `histogram`."""
    top = absmax.float().max().reshape(1)
    if scheme.act_range == "mse":
        if histogram is None:
            raise ValueError("act_range mse needs the histogram of the calibration inputs")
        clip = histogram.least_error_maximum(float(top), lambda x: round_input_codes(x, scheme), scheme.act_half_range)
        scale = torch.tensor([clip / scheme.act_half_range], device=absmax.device)
        return scale.clamp(min=torch.finfo(dtype).tiny).to(dtype)
    scale = (top / scheme.act_half_range).clamp(min=torch.finfo(dtype).tiny).to(dtype)
    while bool((top / scale.float() > scheme.act_half_range).any()):  # rounded down by the cast: one step up
        scale = (scale.float() * (1 + torch.finfo(dtype).eps)).to(dtype)
    return scale


@record
@dataclass
class QuantizedTensor:
    """A weight on the integer grid: signed integers, one scale (and zero point) per (row, group)."""

    qweight: torch.Tensor  # int8 [out, in]; float8_e4m3fn for FP8 weights (the E4M3 values themselves)
    scale: torch.Tensor  # [out, n_groups], storage dtype
    zero_point: torch.Tensor | None  # int8 [out, n_groups]; None when symmetric
    scheme: QuantScheme
    input_scale: torch.Tensor | None = None  # [1], storage dtype: static input quantization (act_dynamic False)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero_point, self.scheme.group_size_for(self.qweight.shape[1]))

    def rows(self, rows: slice) -> QuantizedTensor:
        """Some rows as an independent QuantizedTensor on the CPU (no storage shared with the others); the input
        scale is the whole Linear's (the rows share their input)."""
        own = lambda t: None if t is None else t[rows].to("cpu", copy=True)
        scale = None if self.input_scale is None else self.input_scale.to("cpu", copy=True)
        return QuantizedTensor(own(self.qweight), own(self.scale), own(self.zero_point), self.scheme, scale)


@record
@dataclass
class MicroscaledTensor:
    """A weight on a microscaling grid (NVFP4, MXFP4, MXFP8: llmq/methods/grids/microscaling.py): element values,
    one scale per (row, group), and NVFP4's global scale; w = value * scale (/ global_scale)."""

    values: torch.Tensor  # float8_e4m3fn [out, in]: the E2M1 or E4M3 element values (E2M1's are E4M3 values too)
    scale: torch.Tensor  # float32 [out, in / group]: NVFP4's E4M3 value S, or MX's 2^e
    global_scale: torch.Tensor | None  # float32 [1]: NVFP4's g (w = e2m1 * S / g); None for MX
    scheme: QuantScheme
    input_global_scale: torch.Tensor | None = None  # float32 [1]: NVFP4 (W4A4)'s inputs' g, from calibration

    def effective_scale(self) -> torch.Tensor:
        return self.scale if self.global_scale is None else self.scale / self.global_scale

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.values, self.effective_scale(), None, self.scheme.group_size)

    def rows(self, rows: slice) -> MicroscaledTensor:
        own = lambda t: t[rows].to("cpu", copy=True)
        whole = lambda t: None if t is None else t.to("cpu", copy=True)  # the Linear's own, shared by its rows
        return MicroscaledTensor(own(self.values), own(self.scale), whole(self.global_scale), self.scheme,
                                 whole(self.input_global_scale))

    def damage(self) -> str | None:
        """Why these tensors (read back from a checkpoint) are not a weight of this scheme, or None."""
        rows, columns = self.values.shape
        groups = columns // self.scheme.group_size
        limit = E2M1_MAX if self.scheme.bits == 4 else FP8_MAX
        if tuple(self.scale.shape) != (rows, groups) or not bool((self.scale >= 0).all()):
            return f"scales are {tuple(self.scale.shape)}, not ({rows}, {groups}) non-negative values"
        if self.values.numel() and float(self.values.float().abs().max()) > limit:
            return f"values beyond the {self.scheme.name} element range (+-{limit:g})"
        if (self.global_scale is None) != (self.scheme.weight_type != "nvfp4"):
            return "a global scale where the scheme has none, or none where it needs one"
        if (self.input_global_scale is None) == self.scheme.static_inputs:
            return f"{'no' if self.scheme.static_inputs else 'an'} input global scale for {self.scheme.name}"
        return None


def block_scale_shape(rows: int, columns: int) -> tuple[int, int]:
    """FP8_BLOCK's scales of a [rows, columns] weight: one per block, the edge blocks partial."""
    return -(-rows // FP8_BLOCK), -(-columns // FP8_BLOCK)


def expand_blocks(scale: torch.Tensor, rows: int, columns: int | None = None) -> torch.Tensor:
    """FP8_BLOCK's scales [ceil(rows / 128), ceil(columns / 128)] as float32 per row [rows, ceil(columns / 128)], or
    per weight [rows, columns] when `columns` is given (the blocks at the edges cut to the matrix)."""
    per_row = scale.float().repeat_interleave(FP8_BLOCK, dim=0)[:rows]
    return per_row if columns is None else per_row.repeat_interleave(FP8_BLOCK, dim=1)[:, :columns]


@record
@dataclass
class BlockScaledTensor:
    """A weight of FP8_BLOCK (llmq/methods/grids/fp8.py): E4M3 values and one scale per FP8_BLOCK x FP8_BLOCK block
    of the matrix, the blocks at the bottom and right edges partial where the shape is not a multiple; w = value *
    its block's scale."""

    values: torch.Tensor  # float8_e4m3fn [out, in]
    scale: torch.Tensor  # [ceil(out / 128), ceil(in / 128)], storage dtype
    scheme: QuantScheme

    def dequantize(self) -> torch.Tensor:
        return self.values.float() * expand_blocks(self.scale, *self.values.shape)

    def rows(self, rows: slice) -> BlockScaledTensor:
        """Rows starting at a block's first row (a Linear's own, when a target solves each Linear alone)."""
        start, stop, _ = rows.indices(self.values.shape[0])
        if start % FP8_BLOCK:
            raise ValueError(f"rows from {start} split a {FP8_BLOCK}-row block of scales")
        blocks = slice(start // FP8_BLOCK, -(-stop // FP8_BLOCK))
        return BlockScaledTensor(self.values[start:stop].to("cpu", copy=True), self.scale[blocks].to("cpu", copy=True),
                                 self.scheme)

    def damage(self) -> str | None:
        """Why these tensors (read back from a checkpoint) are not an FP8_BLOCK weight, or None."""
        blocks = block_scale_shape(*self.values.shape)
        if tuple(self.scale.shape) != blocks or not bool((self.scale > 0).all()):
            return f"scales are {tuple(self.scale.shape)}, not {blocks} positive values"
        return None
