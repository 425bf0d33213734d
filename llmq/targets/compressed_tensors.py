"""The compressed-tensors `pack-quantized` checkpoint: what transformers (with the `compressed-tensors`
package) and vLLM load natively.

Per quantized Linear `name`, the safetensors hold:
    name.weight_packed      int32 [out, ceil(in * bits / 32)]   integers, dense bit-packed along rows
    name.weight_scale       [out, n_groups]                      the model's dtype
    name.weight_zero_point  int32 [ceil(out * bits / 32), n_groups]  asymmetric only, packed down columns
    name.weight_shape       int64 [2]                            (out, in)
Groups are contiguous runs of `group_size` input columns (act-order uses static groups, so no group index is
needed); config.json carries the scheme under `quantization_config`.

8-bit per-channel schemes whose inputs are quantized too (W8A8), and FP8 weights, use the unpacked formats that
compressed-tensors defines for them (llm-compressor's), which serving engines run on int8 / FP8 tensor cores:
    name.weight             int8 (`int-quantized`) or float8_e4m3fn (`float-quantized`) [out, in]
    name.weight_scale       [out, 1]                             the model's dtype
with `input_activations` {8 bits, the weights' type, symmetric, strategy token, dynamic: true}: each token's
input row is quantized at run time with its own scale max|x| / (range / 2). With static inputs (`--act-static`)
the config says {strategy tensor, dynamic: false} and each Linear holds its one input scale:
    name.input_scale        [1]                                  the model's dtype
The same formats hold W4A8 / W4AFP8 (int4 values in the int8 `weight`, `weight_scale` [out, n_groups]; int8 or
FP8 inputs per token) and FP8_BLOCK (`weight_scale` [ceil(out / 128), ceil(in / 128)], weights strategy `block`;
inputs {strategy group, group_size 128, dynamic: true}), as compressed-tensors' own presets of those names and its
format inference (int-quantized / float-quantized) make them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from llmq.calib.discover import find_decoder_layers
from llmq.calib.harness import Part, Plan
from llmq.calib.kv_cache import KV_CACHE_SCHEME
from llmq.calib.lazy import index_weight_map, tensor_of
from llmq.calib.naming import checkpoint_names, checkpoint_state
from llmq.core import log
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Quantized
from llmq.core.scheme import (
    CAST_TYPES,
    FP8_BLOCK,
    MICROSCALING,
    PRESETS,
    BlockScaledTensor,
    MicroscaledTensor,
    QuantizedTensor,
    QuantScheme,
    block_scale_shape,
)
from llmq.methods.grids.fp8 import Fp8BlockGrid, Fp8Grid
from llmq.methods.grids.integer import IntegerGrid
from llmq.methods.grids.microscaling import MicroscalingGrid, e8m0_bytes, pack_e2m1
from llmq.targets.base import RunReport, Target
from llmq.targets.card import model_card
from llmq.targets.packing import pack_int32, packed_words
from llmq.targets.shards import ShardWriter

FORMAT = "pack-quantized"
UNPACKED_FORMATS = {"int": "int-quantized", "float": "float-quantized"}
# compressed-tensors' formats of the microscaling schemes, by llmq weight type (llmq/methods/grids/microscaling.py)
MICROSCALING_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized"}
EXPERT_NAME = re.compile(r"\.experts\.\d+\.")  # a routed expert's Linear (llmq/calib/experts.py names them so)
TENSOR_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "input_scale",
                   "weight_global_scale", "input_global_scale")


def _input_observer(scheme: QuantScheme) -> str | None:
    """The name llm-compressor gives the way the static input scale was chosen (informational for loaders)."""
    if scheme.act_dynamic:
        return None
    return "mse" if scheme.act_range == "mse" else "minmax"


def checkpoint_format(scheme: QuantScheme) -> str:
    """pack-quantized for weight-only integer grids; the unpacked int/float format for W8A8 and FP8; the
    microscaling schemes' own formats."""
    if scheme.act_bits is None and scheme.weight_type == "int":
        return FORMAT
    if scheme.microscaling:
        return MICROSCALING_FORMATS[scheme.weight_type]
    return UNPACKED_FORMATS[scheme.weight_type]


def _weights_args(scheme: QuantScheme, group_size: int, act_order: bool, observer: str) -> dict:
    """compressed-tensors' QuantizationArgs of the weights, for Linears `group_size` columns per scale (-1: per channel)."""
    if scheme.microscaling:  # as compressed-tensors' own NVFP4A16 / MXFP4A16 / MXFP8A16 presets
        nvfp4 = scheme.weight_type == "nvfp4"
        return {"num_bits": scheme.bits, "type": "float", "symmetric": True,
                "strategy": "tensor_group" if nvfp4 else "group", "group_size": scheme.group_size, "dynamic": False,
                "actorder": "weight" if act_order else None, "observer": observer,
                "scale_dtype": "torch.float8_e4m3fn" if nvfp4 else "torch.uint8"}
    if scheme.fp8_blocks:  # as compressed-tensors' FP8_BLOCK preset
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block", "group_size": None,
                "block_structure": [FP8_BLOCK, FP8_BLOCK], "dynamic": False, "actorder": None, "observer": observer}
    return {
        "num_bits": scheme.bits,
        "type": scheme.weight_type,
        "symmetric": scheme.symmetric,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "dynamic": False,
        "actorder": "weight" if act_order and group_size != -1 else None,
        "observer": observer,
    }


def _module_suffix(name: str) -> str:
    """A Linear's name after its layer index: model.layers.3.self_attn.q_proj -> self_attn.q_proj."""
    return re.split(r"\.\d+\.", name)[-1]


def _group_targets(names: list[str], others: list[str]) -> list[str]:
    """Targets matching exactly `names` among all Linears (`names` + `others`): one `re:` pattern per module
    suffix after the layer index (`re:.*\\.self_attn\\.q_proj$`) where that suffix names none of `others`, else
    the exact names (what both compressed-tensors and vLLM match before class names)."""
    taken = {_module_suffix(name) for name in others}
    patterns, exact = [], []
    for name in names:
        key = _module_suffix(name)
        if key in taken or key == name:
            exact.append(name)
        elif (pattern := rf"re:.*\.{re.escape(key)}$") not in patterns:
            patterns.append(pattern)
    return sorted(patterns) + exact


def quantization_config(scheme: QuantScheme, act_order: bool, ignore: list[str], observer: str,
                        group_sizes: Mapping[str, int] | None = None, kv_cache: str | None = None) -> dict:
    """config.json's quantization_config. `group_sizes`: each quantized Linear's on-disk name -> its columns per
    scale (group_size_for), when they are not all the scheme's: one config group per group size, each targeting
    its Linears by name, since compressed-tensors keeps one group size per config group."""
    sizes = sorted(set((group_sizes or {}).values()), reverse=True) or [scheme.group_size]
    per_channel = lambda size: size == -1 or scheme.group_size == -1
    inputs = None
    if scheme.microscaling and scheme.static_inputs:  # NVFP4: as compressed-tensors' own preset
        inputs = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
                  "dynamic": "local", "actorder": None, "observer": "minmax", "scale_dtype": "torch.float8_e4m3fn"}
    elif scheme.microscaling and scheme.act_bits is not None:  # MXFP4 / MXFP8: as their presets
        inputs = {"num_bits": scheme.bits, "type": "float", "symmetric": True, "strategy": "group",
                  "group_size": scheme.group_size, "dynamic": True, "actorder": None, "observer": None,
                  "scale_dtype": "torch.uint8"}
    elif scheme.act_bits is not None:
        group = scheme.input_group_size  # FP8_BLOCK's 128
        inputs = {"num_bits": scheme.act_bits, "type": "float" if scheme.float_inputs else "int", "symmetric": True,
                  "strategy": "group" if group else "token" if scheme.act_dynamic else "tensor", "group_size": group,
                  "dynamic": scheme.act_dynamic, "actorder": None, "observer": _input_observer(scheme)}
    groups = {}
    for index, size in enumerate(sizes):
        weights = _weights_args(scheme, -1 if per_channel(size) else size, act_order, observer)
        if len(sizes) == 1:
            targets = ["Linear"]
        else:
            mine = [name for name, own in group_sizes.items() if own == size]
            targets = _group_targets(mine, [name for name, own in group_sizes.items() if own != size])
        groups[f"group_{index}"] = {"targets": targets, "weights": weights, "input_activations": inputs,
                                    "output_activations": None}
    config = {
        "quant_method": "compressed-tensors",
        "format": checkpoint_format(scheme),
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": dict(KV_CACHE_SCHEME) if kv_cache else None,
    }
    if not scheme.symmetric:
        # transformers (5.x, compressed-tensors 0.20) sizes packed zero points unpacked when it keeps weights
        # compressed, and refuses the checkpoint; its dequantize-at-load path reads them right.
        # compressed-tensors' QuantizationConfig accepts the extra key.
        config["dequantize"] = True
    return config


def scheme_from_config(quant_config: dict) -> tuple[QuantScheme, set[int]]:
    """The llmq scheme of a compressed-tensors config (int or FP8 weights, inputs quantized per token at run time
    or not), and the group sizes its config groups name (-1: per channel). Config groups that differ only in group
    size (a Linear no group divides, kept per channel) are one scheme: each Linear's group size is read from its
    scales' shape (linear_scheme)."""
    formats = (FORMAT, *UNPACKED_FORMATS.values(), *MICROSCALING_FORMATS.values())
    if quant_config.get("quant_method") != "compressed-tensors" or quant_config.get("format") not in formats:
        raise LlmqError(f"checkpoint is not a compressed-tensors model in one of the formats llmq.load reads "
                        f"({', '.join(formats)})")
    groups = list(quant_config.get("config_groups", {}).values())
    if not groups or any(not isinstance(group, dict) for group in groups):
        raise LlmqError("the checkpoint's quantization_config has no config groups; re-create it")
    schemes = [_group_scheme(group, quant_config["format"]) for group in groups]
    base = schemes[0]
    if any(dataclasses.replace(other, group_size=base.group_size) != base for other in schemes[1:]):
        raise LlmqError("checkpoint mixes several quantization schemes; llmq.load reads one weight scheme (config "
                        "groups may differ in group size only)")
    return base, {scheme.group_size for scheme in schemes}


def _microscaling_scheme(group: dict, fmt: str) -> QuantScheme:
    """The NVFP4A16 / MXFP4A16 / MXFP8A16 scheme a config group of that format must hold."""
    weight_type = next(kind for kind, name in MICROSCALING_FORMATS.items() if name == fmt)
    scheme = QuantScheme(**PRESETS[MICROSCALING[weight_type][2].lower()])
    weights = group.get("weights") or {}
    if (weights.get("type"), weights.get("num_bits"), weights.get("group_size")) != ("float", scheme.bits,
                                                                                  scheme.group_size):
        raise LlmqError(f"the checkpoint's quantization_config is not one llmq reads (format {fmt} with "
                        f"{weights.get('num_bits')}-bit {weights.get('type')} weights in groups of "
                        f"{weights.get('group_size')}, not {scheme.name}); re-create it")
    inputs = group.get("input_activations")
    if inputs is not None:
        found = (inputs.get("type"), inputs.get("num_bits"), inputs.get("group_size"), inputs.get("dynamic"))
        with_inputs = QuantScheme(**PRESETS[scheme.name.removesuffix("A16").lower()])  # NVFP4, MXFP4, MXFP8
        wanted = ("float", with_inputs.act_bits, 16 if weight_type == "nvfp4" else with_inputs.group_size,
                  "local" if weight_type == "nvfp4" else True)
        if found != wanted:
            raise LlmqError(f"the checkpoint quantizes inputs ({fmt}, {inputs.get('num_bits')}-bit "
                            f"{inputs.get('type')} in groups of {inputs.get('group_size')}, dynamic="
                            f"{inputs.get('dynamic')}); llmq.load reads the inputs of compressed-tensors' NVFP4, MXFP4 "
                            "and MXFP8 presets and the weight-only microscaling schemes")
        scheme = with_inputs
    return scheme


def _group_scheme(group: dict, fmt: str) -> QuantScheme:
    """One config group's scheme; anything llmq does not read is one line."""
    if fmt in MICROSCALING_FORMATS.values():
        return _microscaling_scheme(group, fmt)
    if group.get("weights", {}).get("type") not in ("int", "float"):
        raise LlmqError("checkpoint holds a weight type llmq.load does not read (int or float)")
    weights, inputs = group["weights"], group.get("input_activations")
    try:
        if weights.get("strategy") not in ("channel", "group", "block"):
            raise LlmqError(f"weight strategy {weights.get('strategy')!r} is not read (channel, group or block)")
        if weights.get("strategy") == "block" and weights.get("block_structure") != [FP8_BLOCK, FP8_BLOCK]:
            raise LlmqError(f"blocks of {weights.get('block_structure')} are not read (FP8_BLOCK's 128 x 128)")
        group_size = {"channel": -1, "block": FP8_BLOCK}.get(weights["strategy"]) or int(weights["group_size"])
        if not isinstance(weights["num_bits"], int):
            raise LlmqError(f"num_bits {weights['num_bits']!r} is not an integer")
        timing = None if inputs is None else (inputs.get("strategy"), inputs.get("dynamic"), inputs.get("group_size"))
        block_inputs = ("group", True, FP8_BLOCK) if weights["strategy"] == "block" else None
        if inputs is not None and (timing not in (("token", True, None), ("tensor", False, None), block_inputs)
                                   or inputs.get("type") not in ("int", "float") or not inputs.get("symmetric", True)):
            raise LlmqError("only symmetric input quantization per token at run time, static per tensor, or (FP8_BLOCK) "
                            "per 128 values at run time is read")
        act_type = "float" if inputs is not None and inputs["type"] == "float" and weights["type"] == "int" else None
        scheme = QuantScheme(int(weights["num_bits"]), group_size, bool(weights["symmetric"]), weights["type"],
                             None if inputs is None else int(inputs["num_bits"]), timing is None or timing[1] is True,
                             act_type=act_type)
        if checkpoint_format(scheme) != fmt:
            raise LlmqError(f"format {fmt} does not hold {scheme.name}")
    except (KeyError, TypeError, ValueError, LlmqError) as error:
        reason = error.args[0] if error.args else type(error).__name__
        raise LlmqError(f"the checkpoint's quantization_config is not one llmq reads ({reason}); re-create it") from None
    return scheme


def linear_scheme(scheme: QuantScheme, in_features: int, scale: torch.Tensor, group_sizes: set[int]) -> QuantScheme:
    """The scheme of one packed Linear: the checkpoint's, with the group size its scales' shape says where that is
    one of the config's groups (config groups of one checkpoint may differ in group size). Scales that match no
    config group keep the checkpoint's scheme, which check_packed_tensors then refuses, naming the tensor."""
    if scale.dim() != 2 or scale.shape[1] < 1 or in_features % scale.shape[1]:
        return scheme
    groups = scale.shape[1]
    if groups == 1 and (-1 in group_sizes or in_features in group_sizes):
        return dataclasses.replace(scheme, group_size=-1 if -1 in group_sizes else in_features)
    if in_features // groups in group_sizes:
        return dataclasses.replace(scheme, group_size=in_features // groups)
    return scheme


def check_packed_tensors(name: str, tensors: dict[str, torch.Tensor], scheme: QuantScheme, out_features: int,
                         in_features: int) -> None:
    """Refuse packed tensors that disagree with the config (bits, groups, zero points) or the model's shapes:
    read with the wrong scheme they would decode to garbage without a word."""
    if scheme.microscaling:
        _check_microscaled_tensors(name, tensors, scheme, out_features, in_features)
        return
    if checkpoint_format(scheme) != FORMAT:
        _check_unpacked_tensors(name, tensors, scheme, out_features, in_features)
        return
    group = scheme.group_size_for(in_features)
    if in_features % group:
        raise LlmqError(f"{name}: group size {group} does not divide its {in_features} inputs; the config and the "
                        "weights do not belong together")
    expected = {"weight_packed": (torch.int32, (out_features, packed_words(in_features, scheme.bits))),
                "weight_scale": (None, (out_features, in_features // group)),
                "weight_zero_point": (torch.int32, (packed_words(out_features, scheme.bits), in_features // group))}
    if scheme.symmetric and "weight_zero_point" in tensors:
        raise LlmqError(f"{name} has zero points but the config says symmetric; the config and the weights do not "
                        "belong together")
    for suffix, tensor in tensors.items():
        dtype, shape = expected[suffix]
        if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
            raise LlmqError(f"{name}.{suffix} is {tensor.dtype} {tuple(tensor.shape)} but the config ({scheme.bits} bits, "
                            f"group {scheme.group_size}, {'sym' if scheme.symmetric else 'asym'}) and the layer "
                            f"[{out_features}, {in_features}] need {shape}; the config and the weights do not belong "
                            "together")
    scale = tensors["weight_scale"]
    if not scale.is_floating_point() or not torch.isfinite(scale).all():
        raise LlmqError(f"{name}.weight_scale holds non-finite or non-float values; the checkpoint is damaged: "
                        "re-create it")


def _check_microscaled_tensors(name: str, tensors: dict[str, torch.Tensor], scheme: QuantScheme, out_features: int,
                               in_features: int) -> None:
    groups = in_features // scheme.group_size
    nvfp4, fp4 = scheme.weight_type == "nvfp4", scheme.bits == 4
    expected = {"weight_packed" if fp4 else "weight": (torch.uint8 if fp4 else torch.float8_e4m3fn,
                                                       (out_features, in_features // 2 if fp4 else in_features)),
                "weight_scale": (torch.float8_e4m3fn if nvfp4 else torch.uint8, (out_features, groups))}
    if nvfp4:
        expected["weight_global_scale"] = (torch.float32, (1,))
    if scheme.static_inputs:
        expected["input_global_scale"] = (torch.float32, (1,))
    if in_features % scheme.group_size or set(tensors) != set(expected):
        raise LlmqError(f"{name} holds {sorted(tensors)} for {in_features} inputs, but {scheme.name} needs "
                        f"{sorted(expected)} in groups of {scheme.group_size}; the config and the weights do not "
                        "belong together")
    for suffix, (dtype, shape) in expected.items():
        tensor = tensors[suffix]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise LlmqError(f"{name}.{suffix} is {tensor.dtype} {tuple(tensor.shape)} but {scheme.name} and the layer "
                            f"[{out_features}, {in_features}] need {dtype} {shape}; the config and the weights do not "
                            "belong together")
    if nvfp4:
        scale = tensors["weight_scale"].float()
        globs = torch.cat([tensors[k].float() for k in ("weight_global_scale", "input_global_scale") if k in tensors])
        damaged = not bool(torch.isfinite(scale).all() and torch.isfinite(globs).all() and (globs > 0).all())
    else:
        damaged = bool((tensors["weight_scale"] == 255).any())  # E8M0's NaN
    if damaged:
        raise LlmqError(f"{name}'s scales hold non-finite or non-positive values; the checkpoint is damaged: re-create it")


def _unpacked_scale_shape(scheme: QuantScheme, out_features: int, in_features: int) -> tuple[int, int]:
    if scheme.fp8_blocks:
        return block_scale_shape(out_features, in_features)
    return out_features, in_features // scheme.group_size_for(in_features)


def _check_unpacked_tensors(name: str, tensors: dict[str, torch.Tensor], scheme: QuantScheme, out_features: int,
                            in_features: int) -> None:
    dtype = torch.int8 if scheme.weight_type == "int" else torch.float8_e4m3fn
    weight, scale = tensors["weight"], tensors["weight_scale"]
    scales = _unpacked_scale_shape(scheme, out_features, in_features)
    if weight.dtype != dtype or tuple(weight.shape) != (out_features, in_features) or tuple(scale.shape) != scales:
        raise LlmqError(f"{name} holds {weight.dtype} {tuple(weight.shape)} weights with {tuple(scale.shape)} scales but "
                        f"the config ({scheme.name}) and the layer need {dtype} ({out_features}, {in_features}) with "
                        f"{scales}; the config and the weights do not belong together")
    if scheme.weight_type == "int" and weight.numel() and (int(weight.min()) < scheme.qmin or int(weight.max()) > scheme.qmax):
        raise LlmqError(f"{name}.weight holds values outside [{scheme.qmin}, {scheme.qmax}], which {scheme.bits} bits "
                        "cannot; the config and the weights do not belong together")
    if not scale.is_floating_point() or not torch.isfinite(scale).all():
        raise LlmqError(f"{name}.weight_scale holds non-finite or non-float values; the checkpoint is damaged: "
                        "re-create it")
    static = scheme.static_inputs
    input_scale = tensors.get("input_scale")
    if static != (input_scale is not None):
        raise LlmqError(f"{name} {'lacks' if static else 'has'} an input_scale but the config says "
                        f"{'static' if static else 'no static'} input quantization; the config and the weights do not "
                        "belong together")
    if input_scale is not None and (input_scale.numel() != 1 or not input_scale.is_floating_point()
                                    or not bool(torch.isfinite(input_scale).all() and (input_scale > 0).all())):
        raise LlmqError(f"{name}.input_scale must be one positive finite float, not {input_scale.dtype} "
                        f"{tuple(input_scale.shape)}; the checkpoint is damaged: re-create it")


def fitted_scheme(scheme: QuantScheme, widths: Mapping[str, int], strict: bool) -> tuple[QuantScheme, str | None]:
    """The scheme written for Linears of these input widths (name -> in_features), and the group note for the
    model card: the group size they all take (fitting_group_size), said in one line, or refused with
    --strict-groups (`strict`); a symmetric grid when any is a routed expert. Shared by the model-class path
    (check_model) and the model-free one (llmq/model_free.py)."""
    note = None
    if scheme.group_size != -1 and any(width % scheme.group_size for width in widths.values()):
        chosen = scheme.fitting_group_size(widths.values())
        if strict:
            name = next(name for name, width in widths.items() if width % scheme.group_size)
            raise LlmqError(f"--group-size {scheme.group_size} does not divide {name} (in_features {widths[name]}) "
                            f"and --strict-groups is set; use --group-size {chosen}, or drop --strict-groups to let "
                            "llmq choose it")
        note = describe_groups(widths, scheme.group_size, chosen, scheme.symmetric)
        scheme = dataclasses.replace(scheme, group_size=chosen)
        log.info(f"llmq: {note} (--strict-groups refuses instead)")
    if not scheme.symmetric and any(EXPERT_NAME.search(name) for name in widths):
        # transformers (5.24) drops zero points when it merges dequantized experts, and vLLM's WNA16 MoE
        # kernels take symmetric weights only: an asymmetric MoE checkpoint would load in neither.
        scheme = dataclasses.replace(scheme, symmetric=True)
        log.info("llmq: mixture-of-experts model: writing a symmetric grid (--sym), the one transformers and "
                 "vLLM load for experts")
    return scheme, note


def describe_groups(widths: Mapping[str, int], requested: int, chosen: int, symmetric: bool) -> str:
    """One sentence: the group size the run takes instead of the requested one, and the Linears left per channel
    (with what that means for transformers when the grid is asymmetric). `widths`: Linear name -> in_features."""
    odd = {}
    for name, width in widths.items():
        if width % requested:
            odd.setdefault(width, []).append(name)
    said = ", ".join(f"{len(names)} Linears {width} wide ({_module_suffix(names[0])}, ...)"
                     for width, names in sorted(odd.items()))
    said = f"--group-size {requested} does not divide {said}"
    per_channel = sorted({width for width in widths.values() if width % chosen})
    if chosen != requested:
        said += f"; using groups of {chosen} for every Linear, the largest that divides them"
    if per_channel:
        said += f"; Linears {', '.join(map(str, per_channel))} wide take one scale per channel (no group from 32 divides them)"
        if not symmetric:  # transformers 5.x dequantizes asymmetric checkpoints with one config group's scheme
            said += (", so the checkpoint has two config groups, which transformers cannot dequantize on an asymmetric "
                     "grid (vLLM and llmq.load read it; --sym writes one transformers loads too)")
    return said


def microscaled_tensors(name: str, q: MicroscaledTensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' tensors of a microscaled weight: NVFP4's E2M1 nibbles, E4M3 group scales and the float32
    global scale; MXFP4's nibbles and E8M0 scale bytes; MXFP8's E4M3 weight and E8M0 scale bytes."""
    if q.scheme.weight_type == "nvfp4":
        tensors = {f"{name}.weight_packed": pack_e2m1(q.values), f"{name}.weight_scale": q.scale.to(torch.float8_e4m3fn),
                   f"{name}.weight_global_scale": q.global_scale.float()}
        if q.input_global_scale is not None:  # NVFP4 (W4A4)
            tensors[f"{name}.input_global_scale"] = q.input_global_scale.float()
        return tensors
    if q.scheme.weight_type == "mxfp4":
        return {f"{name}.weight_packed": pack_e2m1(q.values), f"{name}.weight_scale": e8m0_bytes(q.scale)}
    return {f"{name}.weight": q.values, f"{name}.weight_scale": e8m0_bytes(q.scale)}


def packed_tensors(name: str, q: QuantizedTensor | MicroscaledTensor | BlockScaledTensor) -> dict[str, torch.Tensor]:
    if isinstance(q, MicroscaledTensor):
        return microscaled_tensors(name, q)
    if isinstance(q, BlockScaledTensor):  # FP8_BLOCK: E4M3 values, one scale per block
        return {f"{name}.weight": q.values, f"{name}.weight_scale": q.scale}
    if checkpoint_format(q.scheme) != FORMAT:  # int8 / FP8 as they are, one scale per row
        tensors = {f"{name}.weight": q.qweight, f"{name}.weight_scale": q.scale}
        if q.input_scale is not None:
            tensors[f"{name}.input_scale"] = q.input_scale
        return tensors
    bits = q.scheme.bits
    tensors = {
        f"{name}.weight_packed": pack_int32(q.qweight, bits),
        f"{name}.weight_scale": q.scale,
        f"{name}.weight_shape": torch.tensor(q.qweight.shape, dtype=torch.int64),
    }
    if q.zero_point is not None:
        tensors[f"{name}.weight_zero_point"] = pack_int32(q.zero_point, bits, dim=0)
    return tensors


def checkpoint_tensors(model: nn.Module, quantized: Mapping[str, Quantized],
                       pack=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Packed tensors for the quantized Linears and the model's own tensors for everything else, all under the
    names transformers writes on disk (llmq/calib/naming.py: Mixtral's experts as `block_sparse_moe.experts.<e>.w1`),
    made a decoder layer at a time: the tensors outside the layers first, then each layer's. A lazy model's
    tensors left on disk are read as they come (llmq/calib/lazy.py), and so are its results.

    A tensor tied to an earlier one (lm_head to the embeddings) is stored once, under its first name, which
    is the name transformers ties from when it loads. `pack(name, result)` makes a quantized Linear's tensors
    (default: this format's, `packed_tensors`).
    """
    pack = pack or packed_tensors
    layers_path, layers = find_decoder_layers(model)
    in_layer = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.")
    chunk_of = lambda name: int(match.group(1)) if (match := in_layer.match(name)) else -1
    plain: dict[int, list[tuple[str, torch.Tensor]]] = {index: [] for index in range(-1, len(layers))}
    seen = set()
    for key, value in model.state_dict(keep_vars=True).items():
        module_name, _, param = key.rpartition(".")
        identity = ("object", id(value)) if value.is_meta else ("storage", value.data_ptr())
        if (module_name in quantized and param == "weight") or identity in seen:
            continue
        seen.add(identity)
        plain[chunk_of(key)].append((key, value))
    linears: dict[int, list[str]] = {index: [] for index in plain}
    for name in quantized:
        linears[chunk_of(name + ".")].append(name)
    disk = checkpoint_names(model, list(quantized))
    for index, tensors in plain.items():
        if index == -1:  # embeddings and head, one at a time: Llama-3-8B's are 2.1 GB each in float32
            for key, value in sorted(tensors, key=lambda item: item[0]):
                yield from checkpoint_state(model, {key: tensor_of(model, key, value).detach()}).items()
            continue
        state = checkpoint_state(model, {key: tensor_of(model, key, value).detach() for key, value in tensors})
        yield from sorted(state.items())  # one order, however the model came to hold its tensors
        for name in linears[index]:
            yield from pack(disk[name] or name, quantized[name]).items()


def _linear_like(module: nn.Module) -> bool:
    """An nn.Linear, or a module that holds a matrix `weight` of its own: transformers 5's MoE routers are not
    nn.Linear, but serving engines build them as Linear layers under the checkpoint's quantization config (vLLM's
    Qwen3-MoE gate), so they must be listed as ignored like any Linear left unquantized."""
    weight = module._parameters.get("weight")
    return isinstance(module, nn.Linear) or (weight is not None and weight.dim() == 2 and not isinstance(module, nn.Embedding))


def ignored_linears(model: nn.Module, quantized: dict[str, QuantizedTensor]) -> list[str]:
    """The Linears (and Linear-like routers) left unquantized, by their on-disk names (what loaders match `ignore`
    against)."""
    names = [name for name, module in model.named_modules() if _linear_like(module) and name not in quantized]
    disk = checkpoint_names(model, names)
    return [disk[name] or name for name in names]


def without_fused_experts(model: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    """The Linears this format can hold: experts that checkpoints of this model keep fused (GPT-OSS, Llama 4) have
    no per-expert packed layout that transformers loads, so they stay in the model's dtype, said in one line."""
    disk = checkpoint_names(model, [name for name in linears if EXPERT_NAME.search(name)])
    fused = {name for name, on_disk in disk.items() if on_disk is None}
    if fused:
        log.info(f"llmq: {model.config.model_type} checkpoints store the {len(fused)} expert projections fused; "
                 "compressed-tensors has no layout for that which transformers loads, so the experts stay in "
                 f"{str(next(iter(linears.values())).weight.dtype).removeprefix('torch.')} (use --format gguf "
                 "to quantize them)")
    return {name: linear for name, linear in linears.items() if name not in fused}


def write_weights(directory: Path, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
    """Safetensors shards (5 GB each) with an index when sharded, written a tensor at a time; returns the bytes of
    tensor data. Tied tensors must come once (the callers skip them)."""
    shards = ShardWriter(directory)
    for name, tensor in tensors.items() if isinstance(tensors, Mapping) else tensors:
        shards.add(name, tensor)
        del tensor  # else the loop would hold it while the next one is made (two 2.1 GB embeddings at once)
    return shards.close()


def checkpoint_files(directory: Path) -> list[Path]:
    weight_map = index_weight_map(directory)
    if weight_map is not None:
        return [directory / shard for shard in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if not single.exists():
        raise LlmqError(f"{directory} has no model.safetensors; point at a checkpoint directory llmq or transformers wrote")
    return [single]


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint; a truncated or damaged file is a one-line error."""
    state = {}
    for path in checkpoint_files(directory):
        try:
            state.update(load_file(path))
        except FileNotFoundError:
            raise LlmqError(f"shard {path} is missing; re-copy the checkpoint") from None
        except Exception as error:  # safetensors raises its own types for bad headers and short files
            raise LlmqError(f"cannot read {path} ({str(error).splitlines()[0]}); the file is truncated or damaged") from None
    return state


class CompressedTensorsTarget(Target):
    """A Hugging Face model directory: packed integer weights, config with `quantization_config`, tokenizer, card."""

    name = "compressed-tensors"
    lazy_layers = True
    group_note: str | None = None  # which Linears took a smaller group than --group-size (check_model)

    def check(self) -> None:
        if self.method.ternary:
            raise LlmqError(f"--method {self.method.name} makes ternary weights, which compressed-tensors does not hold; "
                            "use --format bitnet (its default) or --format gguf")
        if self.config.target.gguf_type is not None:
            raise LlmqError("--type picks a GGUF mixture; it applies to --format gguf only")
        if self.config.scheme.weight_type == "nf4":
            raise LlmqError("NF4 is written in bitsandbytes' layout: --format bitsandbytes (or leave --format out)")
        if self.config.scheme.is_cast and (self.method.name != "rtn" or self.method.folds):
            raise LlmqError(f"--scheme {self.config.scheme.name.lower()} casts the model and rounds nothing; drop "
                            f"--method {self.method.name}")
        if self.method.searches and self.config.scheme.weight_type not in ("int", *MICROSCALING):
            raise LlmqError(f"--method {self.method.name} searches on an integer or microscaling grid; "
                            f"{self.config.scheme.name} weights take --method gptq or rtn")

    @property
    def search_scheme(self) -> QuantScheme:
        return self.config.scheme

    def quantizable(self, model, linears):
        if self.config.scheme.is_cast:  # the model was loaded in the cast's dtype: written as it is
            return {}
        return without_fused_experts(model, linears)

    def check_model(self, model, linears) -> None:
        widths = {name: linear.in_features for name, linear in linears.items()}
        if self.config.scheme.microscaling:
            self.check_microscaling_widths(self.config.scheme, widths)
            return
        if self.config.scheme.fp8_blocks:
            self.check_fp8_block_widths(widths)
            return
        self.config.scheme, self.group_note = fitted_scheme(self.config.scheme, widths,
                                                            self.config.target.strict_groups)

    @staticmethod
    def check_microscaling_widths(scheme: QuantScheme, widths: Mapping[str, int]) -> None:
        """The group size is the format itself: no smaller group or per-channel fallback, so a Linear it does not
        divide is refused (shared with the model-free path)."""
        odd = [name for name, width in widths.items() if width % scheme.group_size]
        if odd:
            raise LlmqError(f"{scheme.name} groups {scheme.group_size} inputs per scale, which does not divide "
                            f"{odd[0]} ({widths[odd[0]]} inputs; {len(odd)} Linears in all); use another --scheme")

    @staticmethod
    def check_fp8_block_widths(widths: Mapping[str, int]) -> None:
        """FP8_BLOCK's inputs are quantized per 128 values of a token at run time (compressed-tensors and vLLM
        split each token into 128-wide groups), so every Linear's input width must be a multiple of 128."""
        odd = [name for name, width in widths.items() if width % FP8_BLOCK]
        if odd:
            raise LlmqError(f"FP8_BLOCK quantizes inputs per {FP8_BLOCK} values, which does not divide {odd[0]} "
                            f"({widths[odd[0]]} inputs; {len(odd)} Linears in all); use --scheme FP8_DYNAMIC")

    def plan(self, model, linears, storage_dtype, calibrated) -> Plan:
        # one grid for all: a group's Linears are rounded as one stacked matrix, one pass of the method
        scheme = self.config.scheme
        if scheme.fp8_blocks:  # each Linear its own blocks (q's rows need not end on one): solved one by one
            grid = Fp8BlockGrid(scheme, storage_dtype)
            return lambda names: [Part((name,), grid) for name in names]
        if scheme.microscaling:
            grid = MicroscalingGrid(scheme)
        elif scheme.weight_type == "float":
            grid = Fp8Grid(scheme, storage_dtype)
        else:
            grid = IntegerGrid(scheme, storage_dtype, mse=self.config.method.mse)
        return lambda names: [Part(tuple(names), grid)]

    @property
    def act_order(self) -> bool:
        return self.config.method.act_order and self.method.orders_columns

    def act_order_in_card(self) -> str:
        """The model card's act-order cell: with act-order, also when its static groups were fitted (GPTQ's
        --group-fit), which changes the result as much as act-order itself does."""
        scheme = self.config.scheme
        if not self.act_order or scheme.weight_type == "float" or scheme.microscaling or scheme.group_size == -1:
            return str(self.act_order)  # no groups to fit: FP8 and per-channel scales are fixed before the sweep
        return f"True (groups fitted {'in the sweep' if self.config.method.group_fit == 'sweep' else 'upfront'})"

    def _group_sizes(self, model, quantized: dict[str, QuantizedTensor]) -> dict[str, int] | None:
        """Each packed Linear's on-disk name -> its columns per scale, when they are not all the scheme's."""
        scheme = self.config.scheme
        if scheme.group_size == -1 or scheme.weight_type != "int":
            return None
        # a Linear the group does not divide is written per channel (-1), as compressed-tensors names that strategy
        sizes = {name: -1 if q.qweight.shape[1] % scheme.group_size else scheme.group_size for name, q in quantized.items()}
        if all(size == scheme.group_size for size in sizes.values()):
            return None
        disk = checkpoint_names(model, list(sizes))
        return {disk[name] or name: size for name, size in sizes.items()}

    def write(self, path, model, tokenizer, plan, quantized: dict[str, Quantized], report: RunReport) -> int:
        scheme, mse = self.config.scheme, self.config.method.mse
        write_weights(path, checkpoint_tensors(model, quantized))
        if scheme.is_cast:  # a plain checkpoint in the cast's dtype: no quantization_config
            model.config.dtype = CAST_TYPES[scheme.weight_type]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            model.config.quantization_config = quantization_config(
                scheme, self.act_order, ignored_linears(model, quantized), "mse" if mse else "minmax",
                self._group_sizes(model, quantized), self.config.target.kv_cache)
        model.config.save_pretrained(path)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(path)
        tokenizer.save_pretrained(path)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        if scheme.is_cast:
            (path / "README.md").write_text(model_card(
                report, size, bits=16, group_size="-", symmetric=True, act_order=False, mse=False, format_tag="safetensors",
                summary=f"`{report.base_model}` cast to {scheme.name} (every tensor; nothing rounded to a grid), made "
                        "with llmq.", layout=f"plain safetensors in {CAST_TYPES[scheme.weight_type]}".replace("torch.", ""),
                loader_note="loads with transformers as is"))
            return size
        timing = "per token at run time" if scheme.act_dynamic else "with one scale per Linear from calibration"
        if scheme.input_group_size:  # FP8_BLOCK, MXFP4, MXFP8
            timing = f"with a scale per {scheme.input_group_size} values at run time"
        if scheme.microscaling and scheme.static_inputs:
            timing = "in FP4 with an FP8 scale per 16 values at run time, under a global scale from calibration"
        what = (f"{scheme.name} quantization (weights, and each Linear's input {timing})" if scheme.act_bits else
                f"{scheme.name} weight-only quantization" if scheme.microscaling else
                f"{scheme.bits}-bit weight-only quantization")
        if self.config.target.kv_cache:
            what += ", with an FP8 KV cache (one key and one value scale per layer, from the calibration windows)"
        (path / "README.md").write_text(model_card(
            report, size, bits=scheme.bits, group_size=("per-channel" if scheme.group_size == -1 else scheme.group_size)
            if not self.group_note else f"{scheme.group_size} ({self.group_note})",
            symmetric=scheme.symmetric, act_order=self.act_order_in_card(), mse=mse, format_tag="compressed-tensors",
            summary=f"{what} of `{report.base_model}`, made with llmq.",
            layout=f"compressed-tensors `{checkpoint_format(scheme)}`", loader_note="needs the compressed-tensors package"))
        return size

    def describe(self) -> str:
        return f"compressed-tensors, {self.config.scheme.name}"

    def default_out(self, base: str) -> str:
        scheme = self.config.scheme
        if scheme.is_cast:
            return f"{base}-{scheme.name.lower()}"
        if scheme.act_bits is not None or scheme.weight_type == "float" or scheme.microscaling:
            return f"{base}-{self.method.name}-{scheme.name.lower().replace(' ', '-')}"
        group = "c" if scheme.group_size == -1 else scheme.group_size
        return f"{base}-{self.method.name}-w{scheme.bits}g{group}"
