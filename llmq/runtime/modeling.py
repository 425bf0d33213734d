"""QuantLinear and `llmq.load`: run a packed checkpoint without ever materializing the dense model."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig

from llmq.calib.discover import find_decoder_layers
from llmq.calib.experts import unfuse_experts
from llmq.calib.kv_cache import KV_CACHE_SCHEME, SCALE_NAMES, add_kv_scales, quantizing_kv
from llmq.calib.models import causal_lm_class, check_model_files, fill_remaining_weights, unreadable_config
from llmq.calib.naming import has_per_expert_checkpoint, model_names
from llmq.core import log
from llmq.core.errors import LlmqError
from llmq.core.layers import linear_at
from llmq.core.scheme import QuantScheme
from llmq.runtime.kernels import cuda as cuda_kernels
from llmq.runtime.kernels import fragments
from llmq.runtime.kernels.build import load_extension
from llmq.runtime.kernels.cpu import (
    INT4_MAX_ROWS,
    int4_linear_cpu,
    int4_supported,
    quant_linear_cpu,
    repack_int4_cpu,
)
from llmq.runtime.kernels.reference import dequantize_packed
from llmq.runtime.microscaled import MicroscaledLinear
from llmq.runtime.w8 import W8Linear
from llmq.targets.bitnet import load_bitnet
from llmq.targets.bnb import load_nf4
from llmq.targets.compressed_tensors import (
    FORMAT,
    TENSOR_SUFFIXES,
    check_packed_tensors,
    checkpoint_format,
    linear_scheme,
    read_weights,
    scheme_from_config,
)


class QuantLinear(nn.Module):
    """A Linear whose weight stays packed (compressed-tensors layout); forward picks a kernel by device and size.

    Buffers use the checkpoint's names, so a state dict round-trips unchanged. Kernels that want another layout
    get a copy repacked once, on first use, kept beside the buffers (not in the state dict):
    - CUDA, 4-bit, fp16/bf16 activations: llmq's W4A16 kernels (llmq/runtime/kernels/cuda.py), built on first use;
    - CPU, 4-bit, up to INT4_MAX_ROWS[dtype] activation rows: torch's CPU int4 kernel;
    - anything else: dequantize this layer to float32 and run a dense GEMM (llmq/runtime/kernels/cpu.py).
    """

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, weight_packed: torch.Tensor,
                 weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_zero_point", weight_zero_point)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._repacked: dict[str, object] = {}  # kernel name -> its layout of the weight (None: not supported)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_packed(self.weight_packed, self.weight_scale, self.weight_zero_point,
                                 self.in_features, self.scheme.bits)

    def _layout(self, kernel: str, make):
        if kernel not in self._repacked:
            self._repacked[kernel] = make()
        return self._repacked[kernel]

    def _apply(self, fn, recurse=True):  # .to(device) / .half(): drop repacked copies made for the old placement
        self._repacked = {}
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cuda" and self.scheme.bits == 4 and x.dtype in (torch.float16, torch.bfloat16):
            extension = load_extension()
            packed = extension and self._layout("w4a16", lambda: cuda_kernels.repack(
                self.weight_packed, self.weight_scale, self.weight_zero_point, self.in_features, self.scheme.bits))
            if packed:
                path = cuda_kernels.choose_path(rows)
                fragment = path == "tc" and self._layout("w4a16-tc", lambda: fragments.from_packed(packed))
                return cuda_kernels.w4_linear_cuda(extension, x, packed, self.bias, path=path, fragment=fragment or None)
        if x.device.type == "cpu" and self.scheme.bits == 4:
            group = self.in_features // self.weight_scale.shape[1]
            if rows <= INT4_MAX_ROWS.get(x.dtype, 0) and int4_supported(4, self.in_features, group):
                weight = self._layout("int4-cpu", lambda: repack_int4_cpu(
                    self.weight_packed, self.weight_scale, self.weight_zero_point, self.in_features))
                return int4_linear_cpu(x, weight, self.bias)
        return quant_linear_cpu(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                                self.in_features, self.scheme.bits, self.bias)

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, symmetric={s.symmetric}")


def kernel_path(device: torch.device | str, bits: int = 4) -> str:
    """One line naming the path packed Linears take on `device`."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        if bits == 4 and load_extension() is not None:
            if cuda_kernels.choose_path(1) == "tc":
                return "llmq W4A16 CUDA kernel tc (fragment-ordered tensor cores, every M; LLMQ_W4_KERNEL=tc)"
            return "llmq W4A16 CUDA kernels (gemv M<=8, tensor cores M<=128, dequantize + cuBLAS above)"
        return "dequantize + cuBLAS (no llmq kernel for this model or machine)"
    if bits == 4:
        limits = ", ".join(f"{str(k).removeprefix('torch.')} {v}" for k, v in INT4_MAX_ROWS.items())
        return f"torch CPU int4 kernel up to ({limits}) rows, dequantize + dense GEMM above"
    return "dequantize + dense GEMM"


def _quant_linear_from_state(model: nn.Module, name: str, state: dict, scheme: QuantScheme,
                             bias: torch.Tensor | None, group_sizes: set[int]) -> QuantLinear:
    """The QuantLinear for `name` from its packed tensors (popped from `state`), checked against the config."""
    try:
        packed = state.pop(f"{name}.weight_packed")
        scale = state.pop(f"{name}.weight_scale")
        shape = state.pop(f"{name}.weight_shape")
    except KeyError as missing:
        raise LlmqError(f"checkpoint lacks {missing.args[0]}; the file is incomplete, re-create it") from None
    zero = state.pop(f"{name}.weight_zero_point", None)
    if not scheme.symmetric and zero is None:
        raise LlmqError(f"checkpoint lacks {name}.weight_zero_point for an asymmetric scheme; re-create it")
    linear = linear_at(model, name)
    if linear is None:
        raise LlmqError(f"checkpoint packs {name}, which this model's config has no Linear for; the config and the "
                        "weights do not belong together")
    if shape.tolist() != [linear.out_features, linear.in_features]:
        raise LlmqError(f"{name}.weight_shape is {shape.tolist()} but the config makes that Linear "
                        f"[{linear.out_features}, {linear.in_features}]; the config and the weights do not belong together")
    tensors = {"weight_packed": packed, "weight_scale": scale} | ({} if zero is None else {"weight_zero_point": zero})
    scheme = linear_scheme(scheme, linear.in_features, scale, group_sizes)
    check_packed_tensors(name, tensors, scheme, linear.out_features, linear.in_features)
    return QuantLinear(linear.in_features, linear.out_features, scheme, packed, scale, zero, bias)


def _w8_linear_from_state(model: nn.Module, name: str, state: dict, scheme: QuantScheme,
                          bias: torch.Tensor | None, group_sizes: set[int]) -> W8Linear:
    """The W8Linear for `name` from its int8 / FP8 weight and scales (popped from `state`), checked."""
    try:
        weight, scale = state.pop(f"{name}.weight"), state.pop(f"{name}.weight_scale")
    except KeyError as missing:
        raise LlmqError(f"checkpoint lacks {missing.args[0]}; the file is incomplete, re-create it") from None
    linear = linear_at(model, name)
    if linear is None:
        raise LlmqError(f"checkpoint quantizes {name}, which this model's config has no Linear for; the config and "
                        "the weights do not belong together")
    tensors = {"weight": weight, "weight_scale": scale}
    if not scheme.fp8_blocks:  # W4A8's groups may differ by Linear (the per-channel fallback)
        scheme = linear_scheme(scheme, linear.in_features, scale, group_sizes)
    if f"{name}.input_scale" in state:
        tensors["input_scale"] = state.pop(f"{name}.input_scale")
    check_packed_tensors(name, tensors, scheme, linear.out_features, linear.in_features)
    return W8Linear(linear.in_features, linear.out_features, scheme, weight, scale, bias, tensors.get("input_scale"))


def _microscaled_linear_from_state(model: nn.Module, name: str, state: dict, scheme: QuantScheme,
                                   bias: torch.Tensor | None) -> MicroscaledLinear:
    """The MicroscaledLinear for `name` from its NVFP4 / MXFP4 / MXFP8 tensors (popped from `state`), checked."""
    linear = linear_at(model, name)
    if linear is None:
        raise LlmqError(f"checkpoint quantizes {name}, which this model's config has no Linear for; the config and "
                        "the weights do not belong together")
    suffixes = ("weight_packed", "weight", "weight_scale", "weight_global_scale", "input_global_scale")
    tensors = {suffix: state.pop(f"{name}.{suffix}") for suffix in suffixes if f"{name}.{suffix}" in state}
    check_packed_tensors(name, tensors, scheme, linear.out_features, linear.in_features)
    return MicroscaledLinear(linear.in_features, linear.out_features, scheme, tensors, bias)


def _kv_cache_from_state(model: nn.Module, state: dict, kv_scheme: dict | None) -> dict[int, nn.Module]:
    """The attention modules given FP8 KV-cache scales from the checkpoint (popped from `state`, kept in float32),
    by layer; none without a kv_cache_scheme. Any KV cache scheme but FP8 per tensor is one line."""
    if not kv_scheme:
        return {}
    if {key: kv_scheme.get(key) for key in ("num_bits", "type", "strategy", "dynamic")} != {
            key: KV_CACHE_SCHEME[key] for key in ("num_bits", "type", "strategy", "dynamic")}:
        raise LlmqError(f"the checkpoint's kv_cache_scheme ({kv_scheme.get('num_bits')}-bit {kv_scheme.get('type')}, "
                        f"{kv_scheme.get('strategy')}) is not one llmq.load reads (FP8, one static scale per tensor)")
    _, layers = find_decoder_layers(model)
    modules = add_kv_scales(model, layers)
    names = {id(module): name for name, module in model.named_modules()}
    for module in modules.values():
        for scale_name in SCALE_NAMES:
            key = f"{names[id(module)]}.{scale_name}"
            if key not in state:
                raise LlmqError(f"checkpoint lacks {key} for its FP8 KV cache; the file is incomplete, re-create it")
            scale = state.pop(key)
            if scale.numel() != 1 or not scale.is_floating_point():
                raise LlmqError(f"{key} is {scale.dtype} {tuple(scale.shape)}, not one float; the checkpoint is "
                                "damaged: re-create it")
            module.get_buffer(scale_name).copy_(scale.float().reshape(1))
    return modules


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model without weights; routed experts as per-expert Linears where its checkpoints store them so."""
    with init_empty_weights(include_buffers=False):
        model = causal_lm_class(config).from_config(config, dtype=dtype)
    if unfuse_experts(model) and not has_per_expert_checkpoint(model):
        with init_empty_weights(include_buffers=False):  # experts stored fused (kept unquantized): as built
            model = causal_lm_class(config).from_config(config, dtype=dtype)
    return model


def load(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers CausalLM whose quantized Linears are QuantLinear modules kept packed.

    `dtype` is the compute dtype of everything unquantized (embeddings, norms, lm_head) and of activations.
    """
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise LlmqError(f"{directory} is not a model directory (no config.json); pass the --out of llmq quantize")
    check_model_files(directory)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except Exception as error:  # bad JSON, no model_type, an unknown architecture
        raise unreadable_config(directory, error) from None
    quant_config = getattr(config, "quantization_config", None)
    if quant_config is None:
        raise LlmqError(f"{directory} is not quantized (no quantization_config); load it with transformers")
    if not isinstance(quant_config, dict):
        quant_config = quant_config.to_dict()
    if quant_config.get("quant_method") == "bitsandbytes":
        if not quant_config.get("load_in_4bit") or quant_config.get("bnb_4bit_quant_type") != "nf4":
            raise LlmqError(f"{directory} is a bitsandbytes checkpoint but not NF4; llmq.load reads NF4 (load it "
                            "with transformers)")
        model = _skeleton(config, dtype)
        count = load_nf4(directory, model, dtype)
        log.info(f"llmq: {count} NF4 Linears decoded to {str(dtype).removeprefix('torch.')} once, at load")
        return model.to(device).eval()
    if quant_config.get("quant_method") == "bitnet":
        model = load_bitnet(directory, dtype).to(device)
        log.info(f"llmq: ternary BitNet checkpoint on {torch.device(device).type}: int8 codes, dequantized per call")
        return model
    scheme, group_sizes = scheme_from_config(quant_config)
    state = read_weights(directory)

    model = _skeleton(config, dtype)
    names = model_names(model, TENSOR_SUFFIXES)  # on-disk names (Mixtral's block_sparse_moe...) -> the model's
    state = {names.get(key, key): value for key, value in state.items()}
    unpacked = checkpoint_format(scheme) != FORMAT
    marker = ".weight_scale" if unpacked else ".weight_packed"
    packed_names = [key[: -len(marker)] for key in state if key.endswith(marker)]
    build = functools.partial(_w8_linear_from_state if unpacked else _quant_linear_from_state, group_sizes=group_sizes)
    if scheme.microscaling:
        build = _microscaled_linear_from_state
    for name in packed_names:
        bias = state.pop(f"{name}.bias", None)
        model.set_submodule(name, build(model, name, state, scheme, bias))
    kv_modules = _kv_cache_from_state(model, state, quant_config.get("kv_cache_scheme"))

    fill_remaining_weights(model, state, dtype)
    quantizing_kv(kv_modules)
    model.to(device).eval()
    path = ("int8 x int8 GEMM (torch._int_mm) where available" if scheme.weight_type == "int" else
            "FP8 codes multiplied in float32") if unpacked else kernel_path(device, scheme.bits)
    if unpacked and (scheme.bits == 4 or scheme.fp8_blocks):
        path = "inputs rounded as compressed-tensors rounds them, multiplied with the decoded weight in float32"
    if scheme.microscaling:
        path = "decoded to float32 per call, then a dense GEMM (no FP4 / MX kernel on this path)"
    if kv_modules:
        path += f"; keys and values rounded to FP8 under each layer's scales (the KV cache of {len(kv_modules)} layers)"
    log.info(f"llmq: {len(packed_names)} {scheme.name} Linears on {torch.device(device).type}: {path}")
    return model
