"""QuantLinear and `llmq.load`: run a packed checkpoint without ever materializing the dense model."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from llmq import log
from llmq.errors import LlmqError
from llmq.formats.compressed_tensors import read_weights, scheme_from_config
from llmq.kernels.cpu import quant_linear_cpu
from llmq.kernels.reference import dequantize_packed
from llmq.methods.grid import QuantScheme


class QuantLinear(nn.Module):
    """A Linear whose weight stays packed (compressed-tensors layout); forward picks a kernel by device.

    Buffers use the checkpoint's names, so a state dict round-trips unchanged. A device kernel only needs to
    provide `forward` for its device type in `_KERNELS`; the buffers are the portable layout.
    """

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, weight_packed: torch.Tensor,
                 weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_zero_point", weight_zero_point)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_packed(self.weight_packed, self.weight_scale, self.weight_zero_point,
                                 self.in_features, self.scheme.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _KERNELS.get(x.device.type, quant_linear_cpu)
        return kernel(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                      self.in_features, self.scheme.bits, self.bias)

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, symmetric={s.symmetric}")


# Device type -> kernel with quant_linear_cpu's signature. The CUDA kernel registers itself here.
_KERNELS: dict[str, object] = {}


def kernel_path(device: torch.device | str) -> str:
    device_type = torch.device(device).type
    kernel = _KERNELS.get(device_type, quant_linear_cpu)
    return "dequantize + dense GEMM (portable)" if kernel is quant_linear_cpu else f"{kernel.__module__} ({device_type})"


def _quant_linear_from_state(name: str, state: dict, scheme: QuantScheme, bias: torch.Tensor | None) -> QuantLinear:
    try:
        packed = state.pop(f"{name}.weight_packed")
        scale = state.pop(f"{name}.weight_scale")
        out_features, in_features = (int(v) for v in state.pop(f"{name}.weight_shape"))
    except KeyError as missing:
        raise LlmqError(f"checkpoint lacks {missing.args[0]}; the file is incomplete, re-create it") from None
    zero = state.pop(f"{name}.weight_zero_point", None)
    if not scheme.symmetric and zero is None:
        raise LlmqError(f"checkpoint lacks {name}.weight_zero_point for an asymmetric scheme; re-create it")
    return QuantLinear(in_features, out_features, scheme, packed, scale, zero, bias)


def load(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers CausalLM whose quantized Linears are QuantLinear modules kept packed.

    `dtype` is the compute dtype of everything unquantized (embeddings, norms, lm_head) and of activations.
    """
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise LlmqError(f"{directory} is not a model directory (no config.json); pass the --out of llmq quantize")
    config = AutoConfig.from_pretrained(directory)
    quant_config = getattr(config, "quantization_config", None)
    if quant_config is None:
        raise LlmqError(f"{directory} is not quantized (no quantization_config); load it with transformers")
    if not isinstance(quant_config, dict):
        quant_config = quant_config.to_dict()
    if quant_config.get("quant_method") == "bitnet":
        from llmq.formats.bitnet_hf import load_bitnet

        model = load_bitnet(directory, dtype).to(device)
        log.info(f"llmq: ternary BitNet checkpoint on {torch.device(device).type}: int8 codes, dequantized per call")
        return model
    scheme, _ = scheme_from_config(quant_config)
    state = read_weights(directory)

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    packed_names = [key[: -len(".weight_packed")] for key in state if key.endswith(".weight_packed")]
    for name in packed_names:
        parent_name, _, child = name.rpartition(".")
        bias = state.pop(f"{name}.bias", None)
        model.get_submodule(parent_name).register_module(child, _quant_linear_from_state(name, state, scheme, bias))

    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LlmqError(f"checkpoint lacks {len(missing)} tensors (first: {missing[0]}); the files are incomplete")
    model.to(device).eval()
    log.info(f"llmq: {len(packed_names)} packed Linears on {torch.device(device).type}: {kernel_path(device)}")
    return model
