"""`llmq.quantize(model, config, out)`: load, calibrate, quantize layer by layer, write the checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmq import log
from llmq.calib.arch import layer_map_for, quantizable_linears
from llmq.calib.data import calibration_samples, check_calib_source
from llmq.calib.harness import capture_layer_inputs, check_weights_finite, quantize_layers
from llmq.card import human_size, render_card
from llmq.errors import LlmqError
from llmq.formats.atomic import atomic_output_dir, check_output_free
from llmq.formats.compressed_tensors import (
    checkpoint_state_dict,
    ignored_linears,
    quantization_config,
    write_weights,
)
from llmq.methods import MethodOptions, QuantScheme, get_method
from llmq.methods.grid import check_group_divides
from llmq.models import load_model, resolve_dtype


@dataclass
class QuantizeConfig:
    """Everything `llmq quantize` takes besides the model and the output path."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128  # -1: per output channel
    symmetric: bool = False  # asymmetric (zero points) by default: 0.7% larger here, and clearly better
    act_order: bool = True  # GPTQ: static-group act-order; free for loaders, much better on outlier channels
    mse: bool = False
    calib: str | None = None  # .txt/.jsonl path or a dataset name; None: wikitext2, else data-free
    samples: int = 128
    seqlen: int = 512
    damp: float = 0.01
    sink_weight: float = 16.0  # GPTQ: weight of each calibration window's first token (llmq/methods/gptq.py)
    device: str = "auto"  # cuda when available, else cpu
    dtype: str = "auto"  # compute/storage dtype of the unquantized parts; auto: the checkpoint's
    calib_batch_tokens: int = 4096  # tokens per forward pass during calibration
    format: str = "compressed-tensors"  # or "gguf" (one llama.cpp file; `gguf_type` picks the mixture)
    gguf_type: str = "Q4_K_M"
    # --method bitnet: scale granularity (tensor | channel | group) and ternary-aware fine-tuning (0: none)
    ternary_scale: str = "tensor"
    qat_steps: int = 0
    qat_lr: float = 5e-4
    qat_batch: int = 4
    qat_seqlen: int = 256

    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, self.symmetric)


@dataclass
class QuantizeResult:
    out: Path
    size_before: int
    size_after: int
    seconds: float
    relative_weight_error: float
    calibration: str


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LlmqError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LlmqError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None


def _check_config(config: QuantizeConfig) -> None:
    if config.samples < 1 or config.seqlen < 2:
        raise LlmqError("--samples must be at least 1 and --seqlen at least 2")
    if not 0 < config.damp < 1:
        raise LlmqError(f"--damp {config.damp} is out of range; use a fraction such as 0.01")
    if not 1 <= config.sink_weight <= 1e4:
        raise LlmqError(f"--sink-weight {config.sink_weight} is out of range; use 1 (off) to a few hundred, e.g. 16")
    if config.calib is not None:
        check_calib_source(config.calib)


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _write_checkpoint(directory: Path, hf_model, tokenizer, quantized, scheme: QuantScheme, act_order: bool,
                      mse: bool) -> None:
    """Packed weights, config with quantization_config, generation config and tokenizer into `directory`."""
    write_weights(directory, checkpoint_state_dict(hf_model, quantized))
    hf_model.config.quantization_config = quantization_config(
        scheme, act_order, ignored_linears(hf_model, quantized), "mse" if mse else "minmax")
    hf_model.config.save_pretrained(directory)
    if hf_model.generation_config is not None:
        hf_model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def run_harness(hf_model, tokenizer, layer_map, method, config: QuantizeConfig, device: torch.device,
                no_data: str) -> tuple[dict, str, float]:
    """Calibrate when the method needs it and quantize every decoder layer.

    Returns (quantized weights by module name, a description of the calibration, mean relative weight error).
    """
    inputs, calibration = None, no_data
    if method.needs_calibration:
        samples, calibration = calibration_samples(hf_model, tokenizer, config.calib, config.samples, config.seqlen, device)
        calibration = f"{calibration}, {config.samples} x {config.seqlen} tokens"
        if "gptq" in method.name and config.sink_weight != 1:
            calibration += f", first token of each window x{config.sink_weight:g} in GPTQ's Hessian"
        batch = max(1, config.calib_batch_tokens // config.seqlen)
        inputs = capture_layer_inputs(hf_model, layer_map, samples, device, batch)
    errors = []
    quantized = quantize_layers(hf_model, layer_map, method, inputs, device,
                                on_layer=lambda report: errors.append(report.relative_weight_error))
    return quantized, calibration, sum(errors) / max(len(errors), 1)


def quantize(model: str | None, out: str | Path, config: QuantizeConfig | None = None,
             overwrite: bool = False, trust_remote_code: bool = False) -> QuantizeResult:
    """Quantize `model` (hub id, local directory, or None for the embedded default) into directory `out`."""
    config = config or QuantizeConfig()
    _check_config(config)
    if config.method == "bitnet":
        from llmq.bitnet_pipeline import quantize_bitnet

        return quantize_bitnet(model, out, config, overwrite, trust_remote_code)
    if config.format == "gguf":
        from llmq.gguf_export import quantize_to_gguf

        return quantize_to_gguf(model, out, config, overwrite, trust_remote_code)
    if config.format != "compressed-tensors":
        raise LlmqError(f"--format {config.format} is not supported; use compressed-tensors or gguf")
    check_output_free(out, overwrite)
    scheme = config.scheme()
    options = MethodOptions(mse=config.mse, act_order=config.act_order, damp=config.damp,
                            sink_weight=config.sink_weight)
    method = get_method(config.method, scheme, options)
    act_order = config.act_order and method.orders_columns
    device = _device(config.device)
    started = time.perf_counter()

    hf_model, tokenizer, model_id = load_model(model, resolve_dtype(config.dtype), trust_remote_code)
    layer_map = layer_map_for(hf_model.config.model_type)
    linears = quantizable_linears(hf_model, layer_map)
    for name, linear in linears.items():
        check_group_divides(name, linear.in_features, scheme)
    check_weights_finite(linears)
    size_before = _tensor_bytes(hf_model)

    quantized, calibration, error = run_harness(hf_model, tokenizer, layer_map, method, config, device,
                                                "none (round-to-nearest needs no data)")
    seconds = time.perf_counter() - started

    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        _write_checkpoint(tmp, hf_model, tokenizer, quantized, scheme, act_order, config.mse)
        size_after = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        (tmp / "README.md").write_text(render_card(
            name=out.name, base_model=model_id, method=method.name, bits=scheme.bits,
            group_size="per-channel" if scheme.group_size == -1 else scheme.group_size,
            symmetric=scheme.symmetric, act_order=act_order, mse=config.mse, calibration=calibration,
            size_before=human_size(size_before), size_after=human_size(size_after), seconds=f"{seconds:.0f} s",
            device=device.type, dtype=str(hf_model.dtype).removeprefix("torch."), format_tag="compressed-tensors",
            summary=f"{scheme.bits}-bit weight-only quantization of `{model_id}`, made with llmq.",
            layout="compressed-tensors `pack-quantized`", loader_note="needs the compressed-tensors package",
        ))

    log.info(f"llmq: wrote {out}: {human_size(size_before)} -> {human_size(size_after)} "
             f"({size_before / max(size_after, 1):.2f}x smaller), {seconds:.0f} s, "
             f"mean relative weight error {error:.2e}")
    return QuantizeResult(out, size_before, size_after, seconds, error, calibration)
