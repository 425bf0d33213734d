"""`llmq export-gguf`: an existing quantized checkpoint re-expressed as one GGUF file.

- an llmq (compressed-tensors, packed) checkpoint: each Linear in the GGUF type its grid fits exactly
  (Q4_0 / Q4_1 / Q8_0 with the same integers), else re-encoded into the nearest k-quant;
- a BitNet b1.58 checkpoint (transformers' packed ternary layout): TQ1_0 / TQ2_0 with llama.cpp's mixture.

It reads checkpoints through the runtime (llmq.load) and writes through the GGUF target's writer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType
from torch import nn

from llmq.calib.models import model_tokenizer
from llmq.core import log
from llmq.core.device import human_size
from llmq.core.errors import LlmqError
from llmq.methods.bitnet import ternary_modules
from llmq.methods.grids.blocks import Codes, block_type, fp16
from llmq.methods.grids.kquant_search import encode_bytes
from llmq.runtime.modeling import QuantLinear, load
from llmq.targets.atomic import OutputKind, atomic_output_file, check_output
from llmq.targets.bitnet import load_bitnet
from llmq.targets.compressed_tensors import UNPACKED_FORMATS
from llmq.targets.gguf.mixtures import fallback, get_mixture, is_quantizable
from llmq.targets.gguf.target import encode_tensors, permute_rows, tensor_plan
from llmq.targets.gguf.writer import (
    EncodedTensor,
    assemble_tensors,
    encode_float,
    expert_slot,
    exported_tensors,
    language_config,
    model_name,
    model_name_map,
    prepare_float,
    write_gguf,
)
from llmq.targets.packing import unpack_int32

TERNARY_GGUF_TYPES = ("TQ1_0", "TQ2_0")


@dataclass
class ExportReport:
    out: Path
    size: int
    exact: list[str]  # GGUF tensors whose values are bit-identical to the checkpoint's
    rounded: dict[str, float]  # same integers, fp16 rounding of a stored scale/min: tensor -> relative error
    requantized: dict[str, float]  # re-encoded into another grid: tensor -> relative error


def _exact_blocks(q, scale, zero, bits, symmetric, group_size):
    """Q4_0 / Q4_1 / Q8_0 codes holding exactly the checkpoint's grid, or None when the grid does not fit.

    Every 32-wide block lies inside one llmq group (group sizes are multiples of 32), so it takes that group's
    scale as its fp16 d; integers shift to unsigned: L = q + 8 (<= 4 bits) or q + 128 (8 bits).
    """
    cols = q.shape[1]
    q = q.to(torch.int32)  # unpacked as int8: q + 128 would wrap
    if cols % 32 or (group_size != -1 and group_size % 32):
        return None
    group = cols if group_size == -1 else group_size
    per_block = lambda t: t.float().repeat_interleave(group // 32, dim=1).reshape(-1)
    d = per_block(scale)
    if bits <= 4:
        L = (q + 8).reshape(-1, 32).to(torch.int32)
        if symmetric:
            return T.Q4_0, Codes(d=fp16(d), L=L)
        return T.Q4_1, Codes(d=fp16(d), L=L, dmin=fp16(-d * (per_block(zero) + 8)))
    if bits == 8 and symmetric:
        return T.Q8_0, Codes(d=fp16(d), L=(q + 128).reshape(-1, 32).to(torch.int32))
    return None


def _nearest_type(bits: int, cols: int) -> T:
    k_type = {2: T.Q2_K, 3: T.Q3_K, 4: T.Q4_K}.get(bits, T.Q8_0)
    return fallback(k_type, cols)


def check_gguf_output(directory: str | Path, out: str | Path, overwrite: bool) -> None:
    if Path(out).suffix != ".gguf":
        raise LlmqError(f"export-gguf writes one file; name it *.gguf (not --out {out})")
    check_output(out, overwrite, OutputKind(directory=False), inputs=(Path(directory),))


def export_checkpoint(directory: str | Path, out: str | Path, overwrite: bool = False) -> ExportReport:
    """Re-express an llmq GPTQ/AWQ checkpoint (compressed-tensors, packed) as one GGUF file."""
    check_gguf_output(directory, out, overwrite)
    config_file = Path(directory) / "config.json"
    quant_format = (json.loads(config_file.read_text()).get("quantization_config") or {}).get("format") \
        if config_file.exists() else None
    quant_method = (json.loads(config_file.read_text()).get("quantization_config") or {}).get("quant_method") \
        if config_file.exists() else None
    if quant_method == "bitsandbytes":  # before the weights are read
        raise LlmqError(f"{directory} is NF4 (bitsandbytes), which no GGUF type holds exactly; quantize the original "
                        "model with --format gguf (e.g. --type Q4_K_M) instead")
    if quant_format in UNPACKED_FORMATS.values():  # before the weights are read
        raise LlmqError(f"{directory} is {quant_format} (8-bit weights with quantized activations, or FP8), which GGUF "
                        "does not hold; quantize the original model with --format gguf --type Q8_0 instead")
    model = load(directory, dtype=torch.float32)
    tokenizer = model_tokenizer(str(directory))
    config = language_config(model.config)
    gguf_name_of = model_name_map(model)
    encoded: list[tuple[str, str, EncodedTensor]] = []  # (HF name, GGUF name, tensor): assemble_tensors stacks experts
    exact, rounded, requantized = [], {}, {}
    quantized = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    for module_name, module in log.progress(list(quantized.items()), desc="export", unit="Linear"):
        gguf_name = gguf_name_of(f"{module_name}.weight")
        s = module.scheme
        q = unpack_int32(module.weight_packed, s.bits, module.in_features)
        zero = None if module.weight_zero_point is None else unpack_int32(module.weight_zero_point, s.bits,
                                                                            module.out_features, dim=0)
        dense = module.dequantized_weight()
        fit = _exact_blocks(q, module.weight_scale, zero, s.bits, s.symmetric, s.group_size)
        if fit is not None:
            qtype, codes = fit
            cls = block_type(qtype)
            data = cls.pack(codes).reshape(module.out_features, -1)
            decoded = cls.values(codes).reshape(dense.shape)
        else:
            qtype = _nearest_type(s.bits, module.in_features)
            data = torch.from_numpy(encode_bytes(dense, qtype))
            decoded = block_type(qtype).decode(data).reshape(dense.shape)
        error = ((decoded - dense).norm() / dense.norm().clamp_min(1e-30)).item()
        encoded.append((f"{module_name}.weight", gguf_name,
                        EncodedTensor(qtype, permute_rows(config, gguf_name, data.numpy()))))
        slot = expert_slot(f"{module_name}.weight")
        label = gguf_name if slot is None else f"{gguf_name}[{slot[1]}]"  # one entry per expert in the report
        if torch.equal(decoded, dense):
            exact.append(label)
        else:
            (rounded if fit is not None else requantized)[label] = error
        if module.bias is not None:
            bias = f"{module_name}.bias"
            encoded.append((bias, gguf_name_of(bias), encode_float(module.bias.detach().float(), T.F32)))
    for hf_name, param in exported_tensors(model):
        if hf_name.rpartition(".")[0] in quantized:  # a QuantLinear's own tensors, written above
            continue
        gguf_name = gguf_name_of(hf_name)
        values = prepare_float(config, gguf_name, param)
        quantizable = is_quantizable(gguf_name, tuple(values.shape)) and values.shape[-1] % 32 == 0
        encoded.append((hf_name, gguf_name, EncodedTensor(T.Q8_0, encode_bytes(values, T.Q8_0)) if quantizable
                        else encode_float(values, T.F32)))
    tensors = assemble_tensors(encoded)
    ordered = {name: tensors[name] for name in sorted(tensors, key=_gguf_order)}
    types = [t.qtype for t in ordered.values() if t.qtype in (T.Q4_0, T.Q4_1, T.Q8_0)]
    file_type = {T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1}.get(
        max(set(types), key=types.count) if types else T.Q8_0, LlamaFileType.MOSTLY_Q8_0)
    with atomic_output_file(out, overwrite) as (tmp, _):
        size = write_gguf(tmp, model, tokenizer, ordered, file_type, name=model_name(model, Path(out).stem))
    worst = lambda d: f" (largest relative error {max(d.values()):.1e})" if d else ""
    log.info(f"llmq: wrote {out}: {human_size(size)}; of {len(exact) + len(rounded) + len(requantized)} quantized "
             f"tensors {len(exact)} carried over exactly, {len(rounded)} with a scale or min rounded to fp16"
             f"{worst(rounded)}, {len(requantized)} re-encoded into a k-quant{worst(requantized)}")
    return ExportReport(Path(out), size, exact, rounded, requantized)


def _gguf_order(name: str):
    """token_embd first, then blocks in layer order, then the final norm and output (llama.cpp's habit)."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


# ---- a BitNet checkpoint as GGUF TQ types -----------------------------------------------------------------------


def densify(model) -> None:
    """Replace every TernaryLinear by a plain Linear holding gamma * codes (what a GGUF encoder reads)."""
    for name, module in ternary_modules(model).items():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.data = module.dequantized_weight()
        if module.bias is not None:
            linear.bias.data = module.bias.detach().float()
        model.set_submodule(name, linear)


def write_plain_gguf(model, tokenizer, gguf_type: str, out: str | Path, overwrite: bool = False) -> int:
    """A loaded float model's tensors, each encoded plainly in the type the mixture plans; returns the file size."""
    mixture = get_mixture(gguf_type)
    names, types = tensor_plan(model, mixture, has_imatrix=False)
    tensors = encode_tensors(model, names, types, {})
    with atomic_output_file(out, overwrite) as (tmp, _):
        return write_gguf(tmp, model, tokenizer, tensors, mixture.file_type,
                          name=model_name(model, Path(out).stem))


def export_bitnet_gguf(directory: str | Path, out: str | Path, gguf_type: str = "TQ2_0", overwrite: bool = False) -> int:
    """An existing BitNet b1.58 checkpoint (transformers' packed layout, any architecture) as GGUF TQ types."""
    if gguf_type.upper() not in TERNARY_GGUF_TYPES:
        raise LlmqError(f"ternary weights go into GGUF {' or '.join(TERNARY_GGUF_TYPES)}, not {gguf_type}; "
                        "pass --type TQ2_0")
    check_gguf_output(directory, out, overwrite)
    model = load_bitnet(directory, torch.float32)
    densify(model)
    size = write_plain_gguf(model, model_tokenizer(str(directory)), gguf_type, out, overwrite)
    log.info(f"llmq: wrote {out} ({gguf_type.upper()}, from ternary checkpoint {Path(directory).name}): {human_size(size)}")
    return size
