"""NF4 checkpoints in bitsandbytes' pre-quantized 4-bit layout: what `AutoModelForCausalLM.from_pretrained` loads with
bitsandbytes installed (on GPUs and, with bitsandbytes 0.45 or newer, on CPUs), as transformers itself saves a
model it quantized with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)`.

Per quantized Linear `name` (llmq/methods/grids/nf4.py has the maths):
    name.weight                                      uint8 [rows * cols / 2, 1]  two codes a byte, the first high
    name.weight.absmax                               uint8 [blocks]     double-quantized block absmax
    name.weight.nested_absmax                        float32 [ceil(blocks / 256)]
    name.weight.nested_quant_map                     float32 [256]      the 8-bit dynamic map of the above
    name.weight.quant_map                            float32 [16]       the NF4 levels
    name.weight.quant_state.bitsandbytes__nf4        uint8: JSON {quant_type, blocksize, dtype, shape,
                                                     nested_blocksize, nested_dtype, nested_offset}
config.json carries transformers' BitsAndBytesConfig; Linears left in the model's dtype are listed in
`llm_int8_skip_modules`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmq.calib.harness import Part, Plan
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Quantized
from llmq.methods.grids.nf4 import NESTED_BLOCK, Nf4Grid, Nf4Tensor, stored_absmax
from llmq.targets.base import RunReport
from llmq.targets.card import model_card
from llmq.targets.compressed_tensors import (
    CompressedTensorsTarget,
    checkpoint_tensors,
    ignored_linears,
    read_weights,
    write_weights,
)

QUANT_STATE = "quant_state.bitsandbytes__nf4"


def nf4_tensors(name: str, q: Nf4Tensor) -> dict[str, torch.Tensor]:
    """One Linear's tensors under the names bitsandbytes' Params4bit reads."""
    codes = q.codes.reshape(-1)
    state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": q.dtype, "shape": list(q.codes.shape),
             "nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": q.offset}
    return {
        f"{name}.weight": ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1),
        f"{name}.weight.absmax": q.qabsmax,
        f"{name}.weight.nested_absmax": q.nested_absmax,
        f"{name}.weight.nested_quant_map": q.nested_map,
        f"{name}.weight.quant_map": q.levels,
        f"{name}.weight.{QUANT_STATE}": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8),
    }


def quantization_config(compute_dtype: torch.dtype, skipped: list[str]) -> dict:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skipped).to_dict()


class BitsAndBytesTarget(CompressedTensorsTarget):
    """A Hugging Face model directory in bitsandbytes' NF4 layout (`--scheme nf4`)."""

    name = "bitsandbytes"

    def check(self) -> None:
        if self.config.scheme.weight_type != "nf4":
            raise LlmqError("--format bitsandbytes writes NF4: add --scheme nf4 (or leave --format out)")
        if self.method.ternary or self.method.searches:
            raise LlmqError(f"--method {self.method.name} cannot round onto NF4; use gptq or rtn")
        if self.config.target.gguf_type is not None:
            raise LlmqError("--type picks a GGUF mixture; it applies to --format gguf only")
        from llmq.methods.grids.nf4 import nf4_levels

        nf4_levels()  # bitsandbytes must be installed: refused here, before anything is loaded

    def check_model(self, model, linears) -> None:
        for name, linear in linears.items():
            if linear.in_features % self.config.scheme.group_size:
                raise LlmqError(f"NF4 blocks of {self.config.scheme.group_size} weights need in_features divisible by "
                                f"{self.config.scheme.group_size}; {name} has {linear.in_features}")

    def plan(self, model, linears, storage_dtype, calibrated) -> Plan:
        # one part per Linear: bitsandbytes double-quantizes each Linear's block absmax on its own
        grid = Nf4Grid(self.config.scheme, storage_dtype)
        return lambda names: [Part((name,), grid) for name in names]

    def write(self, path, model, tokenizer, plan, quantized: dict[str, Quantized], report: RunReport) -> int:
        write_weights(path, checkpoint_tensors(model, quantized, pack=nf4_tensors))
        model.config.quantization_config = quantization_config(model.dtype, ignored_linears(model, quantized))
        model.config.save_pretrained(path)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(path)
        tokenizer.save_pretrained(path)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        (path / "README.md").write_text(model_card(
            report, size, bits=4, group_size=self.config.scheme.group_size, symmetric=True, act_order=self.act_order,
            mse=False, format_tag="bitsandbytes", summary=f"NF4 4-bit quantization of `{report.base_model}`, made "
            "with llmq.", layout="bitsandbytes NF4 with double-quantized absmax (transformers' pre-quantized 4-bit)",
            loader_note="needs the bitsandbytes package"))
        return size

    def describe(self) -> str:
        return "bitsandbytes NF4"

    def default_out(self, base: str) -> str:
        return f"{base}-{self.method.name}-nf4"


def decode_nf4(name: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Linear `name`'s float32 weight from its NF4 tensors (popped from `state`), as bitsandbytes decodes them."""
    try:
        meta = json.loads(bytes(state.pop(f"{name}.weight.{QUANT_STATE}").tolist()))
        packed, qabsmax = state.pop(f"{name}.weight"), state.pop(f"{name}.weight.absmax")
        nested, nested_map = state.pop(f"{name}.weight.nested_absmax"), state.pop(f"{name}.weight.nested_quant_map")
        levels = state.pop(f"{name}.weight.quant_map")
    except KeyError as missing:
        raise LlmqError(f"checkpoint lacks {missing.args[0]}; the file is incomplete, re-create it") from None
    except ValueError:
        raise LlmqError(f"{name}'s NF4 quant state is not JSON; the checkpoint is damaged: re-create it") from None
    if meta.get("quant_type") != "nf4" or meta.get("nested_blocksize", NESTED_BLOCK) != NESTED_BLOCK:
        raise LlmqError(f"{name} is {meta.get('quant_type')} with nested blocks of {meta.get('nested_blocksize')}; "
                        "llmq.load reads NF4 with double quantization over 256 blocks")
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
    absmax = stored_absmax(qabsmax, nested.float(), nested_map.float(), float(meta["nested_offset"]))
    values = levels.float()[codes].reshape(-1, int(meta["blocksize"])) * absmax[:, None]
    return values.reshape(meta["shape"])


def load_nf4(directory: Path, model: nn.Module, dtype: torch.dtype) -> int:
    """Fill a weightless model from an NF4 checkpoint, each quantized weight decoded once into a float Linear (an
    evaluation path: the model then runs in `dtype`); returns how many were decoded."""
    from llmq.calib.models import fill_remaining_weights
    from llmq.core.layers import linear_at

    state = read_weights(directory)
    names = [key.removesuffix(f".weight.{QUANT_STATE}") for key in state if key.endswith(QUANT_STATE)]
    for name in names:
        linear = linear_at(model, name)
        weight = decode_nf4(name, state)
        if linear is None or tuple(weight.shape) != (linear.out_features, linear.in_features):
            raise LlmqError(f"checkpoint quantizes {name} as {tuple(weight.shape)}, which this model's config has no "
                            "such Linear for; the config and the weights do not belong together")
        state[f"{name}.weight"] = weight.to(dtype)
    fill_remaining_weights(model, state, dtype)
    return len(names)
