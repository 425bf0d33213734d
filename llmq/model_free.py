"""Model-free quantization: a checkpoint rounded tensor by tensor from its safetensors, no model built.

For a model transformers has no class for yet (day 0), or when asked (`--model-free`), a data-free scheme needs
no forward pass: round-to-nearest onto W4A16 / W8A16 groups or FP8 rows is a function of each weight alone. So
the run reads the shards' tensors one at a time, rounds the decoder's matrix weights and copies everything else,
and writes a compressed-tensors checkpoint; peak memory is one tensor and its packed form, whatever the model.

Which tensors are rounded is decided by name, as llmq's discovery would decide on a model: a 2-D floating-point
`*.weight` inside a numbered decoder layer (`*.layers.N.*`, `*.h.N.*`, `*.blocks.N.*`), except routers
(`*.gate.weight`, `*router*`) and the modules --ignore names (llmq/core/config.py's is_ignored, as on the
model-class path, against the checkpoint's names). Embeddings, the head and norms stay as they are and
unquantized Linears are listed in the config's `ignore`, as the model-class path writes them. The group size
and the symmetric grid for experts are decided by the model-class path's own rule
(compressed_tensors.fitted_scheme, --strict-groups included).

The files are the model-class path's, byte for byte, on the models both can run (tests/test_model_free.py;
llmq/targets/shards.py lays a shard's tensors out in name order whatever order they come in). Beyond one 5 GB
shard the split between shards follows the order tensors come in, which differs between the two paths.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch

from llmq.calib.lazy import FLOAT_DTYPES, LAYER_INDEX, checkpoint_index, open_shard
from llmq.calib.models import check_model_files
from llmq.core import log
from llmq.core.config import QuantizeConfig, is_ignored
from llmq.core.device import human_size
from llmq.core.errors import LlmqError
from llmq.methods.grids.fp8 import Fp8BlockGrid, Fp8Grid
from llmq.methods.grids.integer import IntegerGrid
from llmq.methods.grids.microscaling import MicroscalingGrid
from llmq.targets.atomic import OutputKind, atomic_output_dir, check_output, write_marker
from llmq.targets.compressed_tensors import CompressedTensorsTarget, fitted_scheme, packed_tensors, quantization_config
from llmq.targets.shards import ShardWriter

COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")  # tokenizer, generation, chat files


def has_no_model_class(directory: Path) -> str | None:
    """The model_type of a local checkpoint transformers cannot build (then only a model-free run can quantize
    it), else None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "auto_map" in config:  # a model with its own code: the model-class path
        return None
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) and model_type not in CONFIG_MAPPING else None


def check_model_free(config: QuantizeConfig, why: str) -> None:
    """Only data-free rounding into compressed-tensors runs without a model; anything else is one line."""
    scheme, method = config.scheme, config.method.name
    if (config.target.format not in ("auto", "compressed-tensors") or method not in (None, "rtn") or scheme.is_cast
            or scheme.weight_type not in ("int", "float", "mxfp4", "mxfp8") or scheme.static_inputs
            or config.method.tune_steps or config.target.kv_cache
            or config.run.calib is not None):
        if scheme.weight_type == "nvfp4":
            raise LlmqError(f"{why}: {scheme.name}'s global scale is shared by the Linears that read one input (q/k/v, "
                            "gate/up), as vLLM fuses them, and a run without the model cannot see which those are; "
                            "use MXFP4A16 (no global scale), or a model transformers can build")
        raise LlmqError(f"{why}: a run without the model rounds each weight alone (round-to-nearest onto W4A16, W8A16, "
                        "W8A8, W4A8, W4AFP8, FP8_DYNAMIC, FP8_BLOCK or the MX schemes, into compressed-tensors, without "
                        "--calib); "
                        "drop --method, --calib, --format and static-input schemes")


def _selected(name: str, shape: list[int], dtype: str, ignore: tuple[str, ...]) -> bool:
    module = name.removesuffix(".weight")
    router = module.rsplit(".", 1)[-1] == "gate" or "router" in module  # MoE routers stay as they are
    return (name.endswith(".weight") and len(shape) == 2 and dtype in FLOAT_DTYPES
            and LAYER_INDEX.search(name) is not None and not router and not is_ignored(module, ignore))


@dataclasses.dataclass
class ModelFreeRun:
    size_before: int  # bytes of the checkpoint's safetensors
    size_after: int  # bytes of tensor data written
    seconds: float
    quantized_fraction: float  # of the decoder's matrix weights


def quantize_model_free(model: str, out: str | Path, config: QuantizeConfig, overwrite: bool = False) -> ModelFreeRun:
    """Quantize the checkpoint in directory `model` into `out` without building the model (module docstring)."""
    directory, out = Path(model).expanduser(), Path(out)
    if not (directory / "config.json").is_file():
        raise LlmqError(f"{directory} has no config.json; a model-free run reads a local checkpoint directory")
    check_model_files(directory)
    files = checkpoint_index(directory)
    if not files:
        raise LlmqError(f"{directory} holds no safetensors; a model-free run reads safetensors only")
    check_output(out, overwrite, OutputKind(directory=True), inputs=(directory,))
    started = time.perf_counter()

    shapes = {}
    for path in sorted(set(files.values())):
        with open_shard(path) as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shapes[key] = (list(tensor.get_shape()), tensor.get_dtype())
    chosen = [k for k, (shape, dtype) in shapes.items() if _selected(k, shape, dtype, config.target.ignore)]
    if not chosen:
        raise LlmqError(f"no decoder matrix weights found in {directory} (2-D *.weight tensors under *.layers.N.); "
                        "nothing to quantize")
    widths = {k.removesuffix(".weight"): shapes[k][0][1] for k in chosen}
    if config.scheme.microscaling:  # the format's own group, as the model-class path checks it
        CompressedTensorsTarget.check_microscaling_widths(config.scheme, widths)
    if config.scheme.fp8_blocks:
        CompressedTensorsTarget.check_fp8_block_widths(widths)
    scheme = fitted_scheme(config.scheme, widths, config.target.strict_groups)[0]  # as the model-class path does
    chosen_set = set(chosen)
    raw = json.loads((directory / "config.json").read_text())
    storage = {"BF16": torch.bfloat16, "F16": torch.float16}.get(shapes[chosen[0]][1], torch.float32)
    grid = (MicroscalingGrid(scheme) if scheme.microscaling else Fp8BlockGrid(scheme, storage) if scheme.fp8_blocks
            else Fp8Grid(scheme, storage) if scheme.weight_type == "float" else IntegerGrid(scheme, storage, mse=config.method.mse))

    log.info(f"llmq: model-free: rounding {len(chosen)} matrix weights of {directory.name} one at a time "
             f"({scheme.name}, round-to-nearest; no model built)")
    size_before = sum(p.stat().st_size for p in set(files.values()))
    group_sizes = {}
    with atomic_output_dir(out, overwrite=overwrite) as stage:
        shards = ShardWriter(stage)
        for path in log.progress(sorted(set(files.values())), desc="model-free shards", unit="shard"):
            with open_shard(path) as f:
                for key in sorted(f.keys()):
                    tensor = f.get_tensor(key)
                    if key not in chosen_set:
                        shards.add(key, tensor)
                        continue
                    name = key.removesuffix(".weight")
                    fit = grid.fit(tensor.float())
                    quantized = fit.result(fit.nearest())
                    group_sizes[name] = -1 if tensor.shape[1] % max(scheme.group_size, 1) else scheme.group_size
                    for packed_name, packed in packed_tensors(name, quantized).items():
                        shards.add(packed_name, packed)
        size_after = shards.close()
        ignored = sorted(k.removesuffix(".weight") for k, (shape, dtype) in shapes.items()
                         if k.endswith(".weight") and len(shape) == 2 and k not in chosen_set and "embed" not in k)
        if raw.get("tie_word_embeddings") and "lm_head" not in ignored:  # the head is the embedding, not on disk
            ignored.append("lm_head")
        uniform = scheme.group_size == -1 or all(s == scheme.group_size for s in group_sizes.values())
        raw["quantization_config"] = quantization_config(scheme, False, ignored, "minmax",
                                                         None if uniform else group_sizes)
        (stage / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for source in sorted(directory.iterdir()):
            if (source.is_file() and source.suffix in COPIED_SUFFIXES and source.name != "config.json"
                    and source.name != "model.safetensors.index.json"):
                shutil.copyfile(source, stage / source.name)
        write_marker(stage, format="compressed-tensors", method="rtn", model_free=True, scheme=scheme.name,
                     base_model=directory.name)
    seconds = time.perf_counter() - started
    total = sum(math.prod(shape) for k, (shape, dtype) in shapes.items() if len(shape) >= 2
                and LAYER_INDEX.search(k) and dtype in FLOAT_DTYPES)
    fraction = sum(math.prod(shapes[k][0]) for k in chosen) / max(total, 1)
    log.info(f"llmq: wrote {out} (compressed-tensors, {scheme.name}, rtn, model-free): {human_size(size_before)} -> "
             f"{human_size(size_after)}, {seconds:.0f} s, {fraction:.1%} of the decoder's matrix weights stored "
             "quantized")
    return ModelFreeRun(size_before, size_after, seconds, fraction)
