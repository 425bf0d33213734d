"""`--format bitnet`: transformers' native BitNet layout (`quant_method: "bitnet"`): write it, and read it back.

Each ternary Linear is stored as two tensors (transformers' BitLinear, `linear_class: "bitlinear"`):

    <name>.weight        uint8 [ceil(out / 4), in]   four ternary rows per byte row, each as t + 1 in 2 bits
    <name>.weight_scale  [1], the model's dtype       1 / gamma ("inverted": BitLinear divides by it)

Row packing: with R = ceil(out / 4), byte row r holds weight rows r, R + r, 2R + r, 3R + r:

    bits:    7 6 | 5 4 | 3 2 | 1 0
    row:    3R+r | 2R+r| R+r |  r

Checkpoints with `linear_class: "autobitlinear"` (offline) use the same packing but multiply by the scale
(it holds gamma itself); the reader takes both. Everything else (embeddings, norms, lm_head, any sub-norms)
stays in the model's dtype, and `modules_to_not_convert` names the Linears that are not ternary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from llmq.calib.harness import Part, Plan
from llmq.calib.models import fill_remaining_weights
from llmq.core.errors import LlmqError
from llmq.core.layers import linear_at
from llmq.methods.bitnet import TernaryLinear
from llmq.methods.grids.ternary import TernaryGrid, TernaryScheme, TernaryTensor, ternary_scheme
from llmq.targets.base import RunReport, Target
from llmq.targets.card import model_card
from llmq.targets.compressed_tensors import read_weights, write_weights

ROWS_PER_BYTE = 4


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes {-1, 0, 1} [out, in] -> uint8 [ceil(out / 4), in] in transformers' row-chunk packing."""
    out_rows = codes.shape[0]
    chunk = -(-out_rows // ROWS_PER_BYTE)
    padded = torch.ones(chunk * ROWS_PER_BYTE, codes.shape[1], dtype=torch.int32)  # pad rows decode to 0
    padded[:out_rows] = codes.to(torch.int32) + 1
    shifts = (2 * torch.arange(ROWS_PER_BYTE, dtype=torch.int32)).reshape(ROWS_PER_BYTE, 1, 1)
    return (padded.reshape(ROWS_PER_BYTE, chunk, -1) << shifts).sum(0).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, out_rows: int) -> torch.Tensor:
    """uint8 [ceil(out / 4), in] -> int8 codes [out, in]."""
    shifts = (2 * torch.arange(ROWS_PER_BYTE, dtype=torch.int32)).reshape(ROWS_PER_BYTE, 1, 1)
    fields = (packed.to(torch.int32).unsqueeze(0) >> shifts) & 3
    return (fields.reshape(-1, packed.shape[1])[:out_rows] - 1).to(torch.int8)


def quantization_config(not_converted: list[str]) -> dict:
    return {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
            "modules_to_not_convert": not_converted}


def _not_converted(model, quantized: dict[str, TernaryTensor]) -> list[str]:
    """Every Linear that stays in float (lm_head at least): BitLinear would otherwise replace it."""
    return sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name not in quantized)


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the unquantized tensors are stored in: the source checkpoint's (bf16 when it does not say)."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def checkpoint_state_dict(model, quantized: dict[str, TernaryTensor]) -> dict[str, torch.Tensor]:
    """The state dict transformers' BitLinear loads: packed codes and inverted per-tensor scales."""
    dtype = checkpoint_dtype(model.config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] in quantized:
            continue
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    for name, ternary in quantized.items():
        if ternary.scheme.granularity != "tensor":
            raise LlmqError(f"transformers' BitNet layout holds one scale per tensor but {name} has one per "
                            f"{ternary.scheme.granularity}; use --ternary-scale tensor or --format gguf")
        state[f"{name}.weight"] = pack_ternary(ternary.codes)
        state[f"{name}.weight_scale"] = (1.0 / ternary.gamma.reshape(1)).to(ternary.scale_dtype)
        bias = model.get_submodule(name).bias
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().to(ternary.scale_dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def write_checkpoint(directory: Path, model, tokenizer, quantized: dict[str, TernaryTensor]) -> None:
    """Packed weights, config with the bitnet quantization_config, generation config and tokenizer."""
    write_weights(directory, checkpoint_state_dict(model, quantized))
    config = model.config
    config.quantization_config = quantization_config(_not_converted(model, quantized))
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def is_bitnet_checkpoint(directory: str | Path) -> bool:
    """Whether a model directory's config.json says quant_method "bitnet"."""
    path = Path(directory) / "config.json"
    if not path.exists():
        return False
    try:
        quant = json.loads(path.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        raise LlmqError(f"{path} is not valid JSON; the checkpoint is damaged") from None
    return quant.get("quant_method") == "bitnet"


def load_bitnet(directory: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers model whose ternary Linears are frozen TernaryLinear modules (codes + per-tensor scale)."""
    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    multiplies = quant.get("linear_class", "bitlinear") == "autobitlinear"
    if multiplies and quant.get("quantization_mode", "offline") != "offline":
        raise LlmqError(f"{directory} holds float weights quantized on the fly (online mode); quantize it with "
                        "llmq quantize --method bitnet instead")
    if quant.get("use_rms_norm"):
        raise LlmqError(f"{directory} uses BitLinear's extra input RMSNorm (use_rms_norm), which llmq does not run")
    state = read_weights(directory)
    scale_dtype = next((t.dtype for k, t in state.items() if k.endswith(".weight_scale")), torch.bfloat16)
    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in [k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")]:
        linear = linear_at(model, name)
        if linear is None or f"{name}.weight" not in state:
            raise LlmqError(f"checkpoint has {name}.weight_scale but no packed {name}.weight for a Linear of its config; "
                            "the config and the weights do not belong together")
        packed, scale = state.pop(f"{name}.weight"), state.pop(f"{name}.weight_scale").float()
        if scale.numel() != 1:
            raise LlmqError(f"{name}.weight_scale holds {scale.numel()} values, but transformers' BitNet layout has one "
                            "per tensor; the checkpoint is damaged")
        scale = scale.reshape(1, 1)
        rows = -(-linear.out_features // ROWS_PER_BYTE)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, linear.in_features):
            raise LlmqError(f"{name}.weight is not a packed ternary tensor ({packed.dtype}, {tuple(packed.shape)}); "
                            "the checkpoint is damaged")
        if not torch.isfinite(scale).all() or (scale == 0).any():
            raise LlmqError(f"{name}.weight_scale is {scale.item()}, not a usable scale; the checkpoint is damaged")
        gamma = scale if multiplies else 1.0 / scale
        bias = state.pop(f"{name}.bias", None)
        module = TernaryLinear.from_codes(unpack_ternary(packed, linear.out_features), gamma, TernaryScheme(),
                                          scale_dtype, None if bias is None else bias.float())
        model.set_submodule(name, module)
    fill_remaining_weights(model, state, dtype)
    config.quantization_config = quant
    return model.eval()


class BitNetTarget(Target):
    """transformers' BitNet checkpoint: every decoder Linear ternary with one scale, packed four rows per byte."""

    name = "bitnet"
    default_method = "bitnet"

    def check(self) -> None:
        if not self.method.ternary:
            raise LlmqError(f"--format bitnet holds ternary weights; --method {self.method.name} does not make them: "
                            "use --method bitnet")
        if self.config.method.ternary_scale != "tensor":
            raise LlmqError(f"transformers' BitNet layout holds one scale per tensor, not per "
                            f"{self.config.method.ternary_scale}; use --ternary-scale tensor or --format gguf")
        unused = (self.config.changed("scheme") + self.config.changed("method", "mse")
                  + self.config.changed("target", "gguf_type", "ignore"))
        if unused:
            raise LlmqError(f"{', '.join(unused)} do not apply to transformers' BitNet layout (ternary weights, one "
                            "scale per tensor); drop them")

    def check_model(self, model, linears) -> None:
        for name, linear in linears.items():
            if linear.out_features % ROWS_PER_BYTE:
                raise LlmqError(f"{name} has {linear.out_features} output rows; transformers' BitNet layout packs four "
                                "rows per byte and needs a multiple of 4: use --format gguf")

    def plan(self, model, linears, storage_dtype, calibrated) -> Plan:
        grid = TernaryGrid(ternary_scheme(self.config), storage_dtype)
        return lambda names: [Part((name,), grid) for name in names]  # one scale per tensor: one part each

    def write(self, path, model, tokenizer, plan, quantized, report: RunReport) -> int:
        write_checkpoint(path, model, tokenizer, quantized)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        (path / "README.md").write_text(model_card(
            report, size, bits="1.58", group_size="per-tensor scale", symmetric=True, act_order=False, mse=False,
            format_tag="ternary",
            summary=f"Ternary (BitNet b1.58: weights in {{-1, 0, 1}} times one scale per tensor, int8 "
                    f"activations) version of `{report.base_model}`, made with llmq.",
            layout="transformers BitNet (`bitlinear`: 2-bit packed rows, inverted scale)",
            loader_note="transformers' own BitNet loader"))
        return size

    def describe(self) -> str:
        return "transformers BitNet layout"

    def default_out(self, base: str) -> str:
        steps = self.config.method.qat_steps
        return f"{base}-bitnet{f'-qat{steps}' if steps else ''}"
