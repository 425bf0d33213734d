"""`llmq quantize --format gguf`: quantize a model straight into a llama.cpp GGUF file.

Plan each tensor's GGML type with llama.cpp's mixture rules, encode the decoder Linears through the shared
calibration harness (plain k-quant search, imatrix-weighted with calibration text, or GPTQ on the k-quant
grid), encode embeddings/output plainly, and write metadata, tokenizer and tensors with gguf-py.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from llmq import log
from llmq.calib.arch import layer_map_for, quantizable_linears
from llmq.calib.data import calibration_samples
from llmq.calib.harness import capture_layer_inputs, check_weights_finite, quantize_layers
from llmq.card import human_size
from llmq.errors import LlmqError
from llmq.formats.atomic import check_output_free
from llmq.formats.gguf import (
    EncodedTensor,
    encode_float,
    gguf_names,
    prepare_float,
    rope_row_permutation,
    write_gguf,
)
from llmq.formats.gguf_mixtures import get_mixture, plan_types
from llmq.methods import MethodOptions
from llmq.methods.kquant_methods import KQuantGPTQ, KQuantRound
from llmq.methods.kquants import QUANTIZED_TYPES, encode_bytes
from llmq.models import load_model, resolve_dtype

GGUF_METHODS = ("rtn", "gptq")


def _tensor_plan(hf_model, mixture, has_imatrix):
    config = hf_model.config
    names = gguf_names(hf_model)
    shapes = {names[n]: tuple(p.shape) for n, p in hf_model.named_parameters()}
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tied = "lm_head.weight" not in dict(hf_model.named_parameters())
    plan = plan_types(mixture, shapes, config.num_hidden_layers, config.num_attention_heads // kv_heads, tied,
                      has_imatrix)
    return names, plan


def _method(config, plan_by_module):
    options = MethodOptions(act_order=config.act_order, damp=config.damp)
    if config.method == "gptq":
        return KQuantGPTQ(plan_by_module, options)
    if config.method == "rtn":
        return KQuantRound(plan_by_module, use_importance=config.calib is not None, options=options)
    raise LlmqError(f"--method {config.method} cannot write GGUF yet; use --method rtn (plain or imatrix) or gptq")


def _permute_rows(config, gguf_name, data):
    perm = rope_row_permutation(config, gguf_name, data.shape[0])
    return data if perm is None else data[perm.numpy()]


def quantize_to_gguf(model: str | None, out: str | Path, config, overwrite: bool = False,
                     trust_remote_code: bool = False):
    from llmq.pipeline import QuantizeResult, _device, _tensor_bytes

    mixture = get_mixture(config.gguf_type)
    check_output_free(out, overwrite)
    device = _device(config.device)
    started = time.perf_counter()
    hf_model, tokenizer, model_id = load_model(model, resolve_dtype(config.dtype), trust_remote_code)
    layer_map = layer_map_for(hf_model.config.model_type)
    linears = quantizable_linears(hf_model, layer_map)
    check_weights_finite(linears)
    size_before = _tensor_bytes(hf_model)

    calibrated = config.method == "gptq" or config.calib is not None
    names, plan = _tensor_plan(hf_model, mixture, has_imatrix=calibrated)
    plan_by_module = {n.removesuffix(".weight"): plan[g] for n, g in names.items() if n.removesuffix(".weight") in linears}
    method = _method(config, plan_by_module)

    inputs, calibration = None, "none (plain k-quant search)"
    if method.needs_calibration:
        samples, calibration = calibration_samples(hf_model, tokenizer, config.calib, config.samples, config.seqlen,
                                                   device)
        calibration = f"{calibration}, {config.samples} x {config.seqlen} tokens"
        batch = max(1, config.calib_batch_tokens // config.seqlen)
        inputs = capture_layer_inputs(hf_model, layer_map, samples, device, batch)
    encoded = quantize_layers(hf_model, layer_map, method, inputs, device)
    del inputs

    tensors: dict[str, EncodedTensor] = {}
    for hf_name, param in log.progress(list(hf_model.named_parameters()), desc="other tensors", unit="tensor"):
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
    seconds = time.perf_counter() - started
    size_after = write_gguf(out, hf_model, tokenizer, tensors, mixture.file_type, overwrite=overwrite)
    what = {"gptq": "GPTQ on the k-quant grid", "rtn": "imatrix-weighted" if calibrated else "plain"}[config.method]
    log.info(f"llmq: wrote {out} ({mixture.name}, {what}): {human_size(size_before)} -> {human_size(size_after)} "
             f"({size_before / max(size_after, 1):.2f}x smaller), {seconds:.0f} s")
    return QuantizeResult(Path(out), size_before, size_after, seconds, float("nan"), calibration)
