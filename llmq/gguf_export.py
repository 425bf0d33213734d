"""`llmq quantize --format gguf`: quantize a model straight into a llama.cpp GGUF file.

Plan each tensor's GGML type with llama.cpp's mixture rules, encode the decoder Linears through the shared
calibration harness (plain k-quant search, imatrix-weighted with calibration text, or GPTQ on the k-quant
grid), encode embeddings/output plainly, and write metadata, tokenizer and tensors with gguf-py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from llmq import log
from llmq.calib.arch import layer_map_for, quantizable_linears
from llmq.calib.harness import check_weights_finite
from llmq.card import human_size
from llmq.errors import LlmqError
from llmq.formats.atomic import check_output_free
from llmq.formats.gguf import (
    EncodedTensor,
    encode_float,
    gguf_name_map,
    gguf_names,
    prepare_float,
    rope_row_permutation,
    write_gguf,
)
from llmq.formats.gguf_blocks import Codes, block_type, fp16
from llmq.formats.gguf_mixtures import fallback, get_mixture, plan_types
from llmq.methods import MethodOptions
from llmq.methods.grid import QuantScheme
from llmq.methods.kquant_methods import KQuantAWQ, KQuantAWQGPTQ, KQuantGPTQ, KQuantRound
from llmq.methods.kquants import QUANTIZED_TYPES, encode_bytes
from llmq.models import load_model, resolve_dtype

GGUF_METHODS = ("rtn", "gptq", "awq", "awq+gptq")
# the integer grid AWQ searches on, per mixture's main type: same bits (4 for the 5-bit types), 32-wide asymmetric
_AWQ_PROXY_BITS = {T.Q2_K: 2, T.Q3_K: 3, T.Q4_K: 4, T.Q5_K: 4, T.Q4_0: 4, T.Q6_K: 8, T.Q8_0: 8}


def _tensor_plan(hf_model, mixture, has_imatrix):
    config = hf_model.config
    names = gguf_names(hf_model)
    shapes = {names[n]: tuple(p.shape) for n, p in hf_model.named_parameters()}
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tied = "lm_head.weight" not in dict(hf_model.named_parameters())
    plan = plan_types(mixture, shapes, config.num_hidden_layers, config.num_attention_heads // kv_heads, tied,
                      has_imatrix)
    return names, plan


def _method(config, plan_by_module, mixture):
    if mixture.default in (T.TQ1_0, T.TQ2_0):
        raise LlmqError(f"--type {mixture.name} holds ternary weights; quantize with --method bitnet")
    options = MethodOptions(act_order=config.act_order, damp=config.damp, sink_weight=config.sink_weight)
    if config.method == "gptq":
        return KQuantGPTQ(plan_by_module, options)
    if config.method == "rtn":
        return KQuantRound(plan_by_module, use_importance=config.calib is not None, options=options)
    if config.method in ("awq", "awq+gptq") and mixture.default in _AWQ_PROXY_BITS:
        proxy = QuantScheme(_AWQ_PROXY_BITS[mixture.default], 32, symmetric=False)
        cls = KQuantAWQ if config.method == "awq" else KQuantAWQGPTQ
        return cls(plan_by_module, proxy, options)
    raise LlmqError(f"--method {config.method} cannot write GGUF {mixture.name}; use one of {', '.join(GGUF_METHODS)} "
                    "with a quantized --type")


def _permute_rows(config, gguf_name, data):
    perm = rope_row_permutation(config, gguf_name, data.shape[0])
    return data if perm is None else data[perm.numpy()]


def quantize_to_gguf(model: str | None, out: str | Path, config, overwrite: bool = False,
                     trust_remote_code: bool = False):
    from llmq.pipeline import _device, _tensor_bytes

    mixture = get_mixture(config.gguf_type)
    check_output_free(out, overwrite)
    started = time.perf_counter()
    hf_model, tokenizer, _ = load_model(model, resolve_dtype(config.dtype), trust_remote_code)
    return encode_model_to_gguf(hf_model, tokenizer, config, mixture, out, _device(config.device), overwrite,
                                started, _tensor_bytes(hf_model))


def encode_tensors(hf_model, names: dict[str, str], plan: dict[str, T], encoded: dict) -> dict[str, EncodedTensor]:
    """Every parameter as a GGUF tensor: the harness's encodings where given, else encoded plainly by the plan."""
    tensors: dict[str, EncodedTensor] = {}
    for hf_name, param in log.progress(list(hf_model.named_parameters()), desc="encode tensors", unit="tensor"):
        gguf_name, qtype = names[hf_name], plan[names[hf_name]]
        module = hf_name.removesuffix(".weight")
        if module in encoded and hf_name.endswith(".weight"):
            part = encoded[module]
            tensors[gguf_name] = EncodedTensor(part.qtype, _permute_rows(hf_model.config, gguf_name, part.data))
            continue
        values = prepare_float(hf_model.config, gguf_name, param)
        if qtype in QUANTIZED_TYPES:
            tensors[gguf_name] = EncodedTensor(qtype, encode_bytes(values, qtype))
        else:
            tensors[gguf_name] = encode_float(values, qtype)
    return tensors


def write_plain_gguf(hf_model, tokenizer, mixture, out: str | Path, overwrite: bool) -> int:
    """Every tensor encoded plainly by the mixture's plan (no calibration); returns the file size."""
    names, plan = _tensor_plan(hf_model, mixture, has_imatrix=False)
    return write_gguf(out, hf_model, tokenizer, encode_tensors(hf_model, names, plan, {}), mixture.file_type,
                      overwrite=overwrite)


def encode_model_to_gguf(hf_model, tokenizer, config, mixture, out: str | Path, device: torch.device,
                         overwrite: bool, started: float, size_before: int):
    """Encode a loaded model's tensors by the mixture's plan (decoder Linears through the harness) and write."""
    from llmq.pipeline import QuantizeResult, run_harness

    layer_map = layer_map_for(hf_model.config.model_type)
    linears = quantizable_linears(hf_model, layer_map)
    check_weights_finite(linears)

    calibrated = config.method != "rtn" or config.calib is not None
    names, plan = _tensor_plan(hf_model, mixture, has_imatrix=calibrated)
    plan_by_module = {n.removesuffix(".weight"): plan[g] for n, g in names.items() if n.removesuffix(".weight") in linears}
    method = _method(config, plan_by_module, mixture)

    encoded, calibration, error = run_harness(hf_model, tokenizer, layer_map, method, config, device,
                                              "none (plain k-quant search)")
    tensors = encode_tensors(hf_model, names, plan, encoded)
    seconds = time.perf_counter() - started
    size_after = write_gguf(out, hf_model, tokenizer, tensors, mixture.file_type, overwrite=overwrite)
    what = {"gptq": "GPTQ on the k-quant grid", "rtn": "imatrix-weighted" if calibrated else "plain",
            "awq": "AWQ + imatrix-weighted", "awq+gptq": "AWQ + GPTQ on the k-quant grid"}[config.method]
    log.info(f"llmq: wrote {out} ({mixture.name}, {what}): {human_size(size_before)} -> {human_size(size_after)} "
             f"({size_before / max(size_after, 1):.2f}x smaller), {seconds:.0f} s, "
             f"mean relative weight error of the decoder Linears {error:.2e}")
    return QuantizeResult(Path(out), size_before, size_after, seconds, error, calibration)


# ---- llmq export-gguf: a packed llmq checkpoint re-expressed in GGUF types ----------------------------------


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


def export_checkpoint(directory: str | Path, out: str | Path, overwrite: bool = False) -> ExportReport:
    """Re-express an llmq GPTQ/AWQ checkpoint (compressed-tensors, packed) as one GGUF file."""
    from transformers import AutoTokenizer

    from llmq.formats.packing import unpack_int32
    from llmq.modeling import QuantLinear, load

    check_output_free(out, overwrite)
    model = load(directory, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = model.config
    name_of = gguf_name_map(config)
    tensors: dict[str, EncodedTensor] = {}
    exact, rounded, requantized = [], {}, {}
    quantized = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    for module_name, module in log.progress(list(quantized.items()), desc="export", unit="Linear"):
        gguf_name = name_of(f"{module_name}.weight")
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
        if torch.equal(decoded, dense):
            exact.append(gguf_name)
        else:
            (rounded if fit is not None else requantized)[gguf_name] = error
        tensors[gguf_name] = EncodedTensor(qtype, _permute_rows(config, gguf_name, data.numpy()))
        if module.bias is not None:
            tensors[name_of(f"{module_name}.bias")] = encode_float(module.bias.detach().float(), T.F32)
    for hf_name, param in model.named_parameters():
        if hf_name.rpartition(".")[0] in quantized:  # a QuantLinear's bias, written above
            continue
        gguf_name = name_of(hf_name)
        values = prepare_float(config, gguf_name, param)
        if values.dim() >= 2 and values.shape[-1] % 32 == 0:
            tensors[gguf_name] = EncodedTensor(T.Q8_0, encode_bytes(values, T.Q8_0))
        else:
            tensors[gguf_name] = encode_float(values, T.F32)
    ordered = {name: tensors[name] for name in sorted(tensors, key=_gguf_order)}
    types = [t.qtype for t in ordered.values() if t.qtype in (T.Q4_0, T.Q4_1, T.Q8_0)]
    file_type = {T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1}.get(
        max(set(types), key=types.count) if types else T.Q8_0, LlamaFileType.MOSTLY_Q8_0)
    size = write_gguf(out, model, tokenizer, ordered, file_type, overwrite=overwrite)
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
