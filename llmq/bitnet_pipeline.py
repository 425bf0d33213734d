"""`llmq quantize --method bitnet`: ternary weights, optionally fine-tuned, written for transformers or llama.cpp.

1. Load the model and replace every decoder Linear with a latent TernaryLinear (absmean ternary, int8
   activations); embeddings, norms and lm_head stay as they are.
2. With --qat-steps N: distil the original model into it on calibration text (llmq/qat.py).
3. Freeze (codes + scales) and write either transformers' native BitNet checkpoint or a GGUF file whose
   ternary tensors are TQ1_0/TQ2_0 (llama.cpp's Q4_0 fallback where a row is not a multiple of 256).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from llmq import log
from llmq.calib.arch import layer_map_for, quantizable_linears
from llmq.calib.data import calibration_text, tokenize_text
from llmq.calib.harness import check_weights_finite
from llmq.card import human_size, render_card
from llmq.errors import LlmqError
from llmq.formats.atomic import atomic_output_dir, check_output_free
from llmq.methods.bitnet import TernaryScheme, relative_error, ternarize_model, ternary_modules
from llmq.models import load_model, resolve_dtype
from llmq.qat import QATConfig, distill, save_loss_curve, training_windows

TERNARY_GGUF_TYPES = ("TQ1_0", "TQ2_0")


def ternary_model(hf_model, tokenizer, config, device: torch.device, curve_path: Path | None = None):
    """hf_model with its decoder Linears ternary (and fine-tuned when config.qat_steps > 0), frozen, in place.

    Returns (model, description of what was done, relative weight error against the original weights).
    """
    layer_map = layer_map_for(hf_model.config.model_type)
    linears = quantizable_linears(hf_model, layer_map)
    check_weights_finite(linears)
    teacher = copy.deepcopy(hf_model) if config.qat_steps > 0 else None
    scheme = TernaryScheme(config.ternary_scale, config.group_size)
    ternarize_model(hf_model, list(linears), scheme)
    description = f"post-training ternary (absmean, per {scheme.granularity})"
    # the original weights, to report the error against: the teacher's, else the (untouched) latent weights
    originals = {name: (teacher or hf_model).get_submodule(name).weight for name in linears}
    if teacher is not None:
        qat = QATConfig(steps=config.qat_steps, lr=config.qat_lr, batch_size=config.qat_batch,
                        seqlen=config.qat_seqlen)
        windows = training_windows(tokenize_text(tokenizer, calibration_text(config.calib)), qat.seqlen)
        result = distill(hf_model, teacher, windows, qat, device)  # teacher stays in its dtype: half the memory
        hf_model.to("cpu")
        teacher.to("cpu")
        description += (f", then {qat.steps} steps of ternary-aware distillation ({result.tokens} tokens, "
                        f"{result.seconds:.0f} s, final KL {sum(result.losses[-20:]) / len(result.losses[-20:]):.3f})")
        if curve_path is not None:
            save_loss_curve(result, curve_path, f"ternary fine-tuning, {qat.steps} steps")
    error = relative_error(hf_model, originals)
    del teacher, originals
    for module in ternary_modules(hf_model).values():
        module.freeze()
    return hf_model.eval(), description, error


def densify(model) -> None:
    """Replace every TernaryLinear by a plain Linear holding gamma * codes (what a GGUF encoder reads)."""
    for name, module in ternary_modules(model).items():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.data = module.dequantized_weight()
        if module.bias is not None:
            linear.bias.data = module.bias.detach().float()
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, linear)


def write_ternary_gguf(model, tokenizer, gguf_type: str, out: Path, overwrite: bool) -> int:
    """A model with frozen TernaryLinears as GGUF: TQ1_0/TQ2_0 where rows allow, llama.cpp's mixture elsewhere."""
    from llmq.formats.gguf_mixtures import get_mixture
    from llmq.gguf_export import write_plain_gguf

    if gguf_type.upper() not in TERNARY_GGUF_TYPES:
        raise LlmqError(f"ternary weights go into GGUF {' or '.join(TERNARY_GGUF_TYPES)}, not {gguf_type}; pass --type TQ2_0")
    densify(model)
    return write_plain_gguf(model, tokenizer, get_mixture(gguf_type), out, overwrite)


def export_bitnet_gguf(directory: str | Path, out: str | Path, gguf_type: str = "TQ2_0", overwrite: bool = False) -> int:
    """An existing BitNet b1.58 checkpoint (transformers' packed layout, any architecture) as GGUF TQ types."""
    from transformers import AutoTokenizer

    from llmq.formats.bitnet_hf import load_bitnet

    check_output_free(out, overwrite)
    model = load_bitnet(directory, torch.float32)
    size = write_ternary_gguf(model, AutoTokenizer.from_pretrained(directory), gguf_type, Path(out), overwrite)
    log.info(f"llmq: wrote {out} ({gguf_type.upper()}, from ternary checkpoint {Path(directory).name}): {human_size(size)}")
    return size


def _check(config) -> None:
    if config.qat_steps > 0 and config.calib is None:
        raise LlmqError("--qat-steps needs --calib FILE (text to fine-tune on)")
    if config.format == "gguf" and config.gguf_type.upper() not in TERNARY_GGUF_TYPES:
        raise LlmqError(f"--method bitnet writes GGUF types {' or '.join(TERNARY_GGUF_TYPES)}, not {config.gguf_type}; "
                        "pass --type TQ2_0")
    if config.format == "gguf" and config.ternary_scale == "group" and config.group_size % 256:
        raise LlmqError(f"GGUF TQ blocks hold one scale per 256 weights, so --group-size {config.group_size} would not "
                        "survive the export; use --group-size 256 (or a multiple) or --ternary-scale channel")
    if config.format == "compressed-tensors" and config.ternary_scale != "tensor":
        raise LlmqError(f"transformers' BitNet layout holds one scale per tensor, not per {config.ternary_scale}; "
                        "use --ternary-scale tensor or --format gguf")


def _check_model(hf_model, config) -> None:
    """Refuse before any work (fine-tuning can take hours) what the chosen output cannot hold."""
    if config.format == "gguf":
        from llmq.formats.gguf import gguf_arch

        gguf_arch(hf_model.config)
        return
    layer_map = layer_map_for(hf_model.config.model_type)
    for name, linear in quantizable_linears(hf_model, layer_map).items():
        if linear.out_features % 4:
            raise LlmqError(f"{name} has {linear.out_features} output rows; transformers' BitNet layout packs four "
                            "rows per byte and needs a multiple of 4: use --format gguf")


def quantize_bitnet(model: str | None, out: str | Path, config, overwrite: bool = False,
                    trust_remote_code: bool = False):
    from llmq.formats import bitnet_hf
    from llmq.pipeline import QuantizeResult, _device, _tensor_bytes

    _check(config)
    check_output_free(out, overwrite)
    device = _device(config.device)
    started = time.perf_counter()
    hf_model, tokenizer, model_id = load_model(model, resolve_dtype(config.dtype), trust_remote_code)
    dtype = str(hf_model.dtype).removeprefix("torch.")
    _check_model(hf_model, config)
    size_before = _tensor_bytes(hf_model)
    out = Path(out)

    if config.format == "gguf":
        curve = out.with_name(out.stem + ".qat_loss.png")
        hf_model, description, error = ternary_model(hf_model, tokenizer, config, device, curve)
        size_after = write_ternary_gguf(hf_model, tokenizer, config.gguf_type, out, overwrite)
    else:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            hf_model, description, error = ternary_model(hf_model, tokenizer, config, device, tmp / "qat_loss.png")
            bitnet_hf.write_checkpoint(tmp, hf_model, tokenizer)
            size_after = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
            (tmp / "README.md").write_text(render_card(
                name=out.name, base_model=model_id, method="bitnet", bits="1.58", group_size="per-tensor scale",
                symmetric=True, act_order=False, mse=False, calibration=description,
                size_before=human_size(size_before), size_after=human_size(size_after),
                seconds=f"{time.perf_counter() - started:.0f} s", device=device.type, dtype=dtype, format_tag="ternary",
                summary=f"Ternary (BitNet b1.58: weights in {{-1, 0, 1}} times one scale per tensor, int8 "
                        f"activations) version of `{model_id}`, made with llmq.",
                layout="transformers BitNet (`bitlinear`: 2-bit packed rows, inverted scale)",
                loader_note="transformers' own BitNet loader"))
    seconds = time.perf_counter() - started
    log.info(f"llmq: wrote {out} ({description}): {human_size(size_before)} -> {human_size(size_after)} "
             f"({size_before / max(size_after, 1):.2f}x smaller), {seconds:.0f} s, "
             f"relative weight error {error:.2e}")
    return QuantizeResult(out, size_before, size_after, seconds, error, description)
