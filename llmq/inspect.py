"""`llmq inspect PATH`: what a checkpoint directory or GGUF file holds, read from its headers alone (no weights
are loaded): the scheme of each group of Linears, bits per weight, size, which clients load it, and the recipe
when llmq wrote it. A user checks a file with it before serving it."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llmq.core.device import human_size
from llmq.core.errors import LlmqError, reason
from llmq.targets.atomic import MARKER

# who loads what (each checked by a test or the benchmark scripts; docs/clients.md says how)
CLIENTS = {
    "pack-quantized": "transformers (with compressed-tensors), vLLM, llmq.load",
    "int-quantized": "transformers (with compressed-tensors), vLLM, llmq.load",
    "float-quantized": "transformers (with compressed-tensors), vLLM, llmq.load",
    **{fmt: "transformers (with compressed-tensors; load it in bf16 or fp16), llmq.load; vLLM on GPUs (not checked "
              "here; its CPU build has no kernel for it)" for fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized",
                                                                   "mxfp8-quantized")},
    "bitsandbytes": "transformers (with bitsandbytes), llmq.load",
    "bitnet": "transformers (BitNet layout), llmq.load",
    "gguf": "llama.cpp (llama-cli, llama-server), ollama, llama-cpp-python; transformers with gguf_file= (dequantized)",
    "plain": "transformers, vLLM, llama.cpp after conversion",
}
# schemes whose format's line above says too much: what vLLM 0.32's CPU build does with them (docs/schemes.md)
W4AFP8_CLIENTS = ("transformers (with compressed-tensors), llmq.load; vLLM on Hopper GPUs (not checked here; its CPU "
                  "build has no kernel for int4 weights with FP8 inputs)")
FP8_BLOCK_CLIENTS = ("transformers (with compressed-tensors), llmq.load; vLLM on GPUs and on CPUs with AMX (not checked "
                     "here; without AMX its CPU build has no kernel for it)")


@dataclass
class Inspection:
    path: Path
    format: str
    size: int  # bytes of weights (safetensors / GGUF files)
    groups: list[str] = field(default_factory=list)  # one line per scheme group
    bits_per_weight: float | None = None  # of the quantized matrices (codes, scales and zero points)
    recipe: dict | None = None
    clients: str | None = None  # who loads it, where the format alone does not say

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.format}, {human_size(self.size)}"]
        out += [f"  {line}" for line in self.groups]
        if self.bits_per_weight is not None:
            out.append(f"  bits per weight of the quantized matrices: {self.bits_per_weight:.2f}")
        out.append(f"  loads in: {self.clients or CLIENTS.get(self.format, 'unknown')}")
        if self.recipe is None:
            out.append("  recipe: none (not written by llmq 0.2 or later)")
        else:
            config = self.recipe.get("config", {})
            out.append(f"  recipe: llmq {self.recipe.get('version', '?')}, --method {self.recipe.get('method')}, "
                       f"base model {self.recipe.get('base_model')}, calibration {self.recipe.get('calibration')}")
            out.append(f"  config: {json.dumps(config, sort_keys=True)}")
            sizing = self.recipe.get("sizing")
            if isinstance(sizing, dict):  # a --target-bpw / --target-size file: its per-tensor choice is recorded
                out.append(f"  sized to {sizing.get('target')}: {sizing.get('bits_per_weight')} bits per weight planned, "
                           f"predicted KL increase {sizing.get('predicted_kl', 0):.4f}; each tensor's type, bytes and "
                           f"predicted cost under the recipe's \"sizing\"")
            out.append(f"  repeat: llmq quantize --recipe {self.path}")
        return out


def inspect(path: str | Path) -> Inspection:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _inspect_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _inspect_directory(path)
    raise LlmqError(f"{path} is neither a model directory (with config.json) nor a .gguf file")


def _inspect_gguf(path: Path) -> Inspection:
    from gguf import GGMLQuantizationType, GGUFReader

    from llmq.targets.recipe import gguf_recipe_text

    try:
        reader = GGUFReader(path)
    except Exception as error:
        raise LlmqError(f"{path} is not a readable GGUF file ({reason(error)})") from None
    counts, elements, n_bytes = Counter(), Counter(), Counter()
    for tensor in reader.tensors:
        kind = GGMLQuantizationType(int(tensor.tensor_type)).name
        counts[kind] += 1
        elements[kind] += int(tensor.n_elements)
        n_bytes[kind] += int(tensor.n_bytes)
    groups = [f"{kind}: {counts[kind]} tensors, {elements[kind]:,} weights, {8 * n_bytes[kind] / elements[kind]:.2f} bits "
              "per weight" for kind in sorted(counts, key=lambda k: -elements[k])]
    matrices = [kind for kind in counts if kind not in ("F32", "F16", "BF16")]
    bpw = (8 * sum(n_bytes[k] for k in matrices) / sum(elements[k] for k in matrices)) if matrices else None
    text = gguf_recipe_text(path)
    recipe = json.loads(text) if text else None
    return Inspection(path, "gguf", path.stat().st_size, groups, bpw, recipe)


def _safetensors_headers(directory: Path) -> dict[str, tuple[str, list[int], int]]:
    """Every tensor's (dtype, shape, bytes) from the shards' headers; a packed Linear's `weight_shape` (two int64s)
    as its value, in place of its own shape."""
    from safetensors import safe_open

    from llmq.targets.compressed_tensors import checkpoint_files

    headers = {}
    for file in checkpoint_files(directory):
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    shape, dtype = tensor.get_shape(), tensor.get_dtype()
                    count = 1
                    for n in shape:
                        count *= n
                    if key.endswith(".weight_shape") and shape == [2]:
                        shape = f.get_tensor(key).tolist()
                    headers[key] = (dtype, shape, count * _DTYPE_BYTES.get(dtype, 4))
        except Exception as error:
            raise LlmqError(f"cannot read {file} ({reason(error)}); the file is truncated or damaged") from None
    return headers


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1,
                "F8_E5M2": 1, "BOOL": 1}


def _inspect_directory(path: Path) -> Inspection:
    from llmq.calib.models import check_model_files

    check_model_files(path)  # bounded, as every other reader of a model directory
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise LlmqError(f"cannot read {path / 'config.json'} ({reason(error)})") from None
    recipe = None
    if (path / MARKER).is_file():
        from llmq.targets.recipe import read_recipe

        try:
            recipe = read_recipe(path)
        except LlmqError:
            recipe = None  # an output of llmq before 0.2: no config recorded
    headers = _safetensors_headers(path)
    size = sum(entry[2] for entry in headers.values())
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not quant:
        return Inspection(path, "plain", size, [f"no quantization_config: {len(headers)} tensors, "
                                                f"{Counter(e[0] for e in headers.values()).most_common(1)[0][0]}"], None, recipe)
    method = quant.get("quant_method")
    if method == "compressed-tensors":
        return _inspect_compressed(path, quant, headers, size, recipe)
    fmt = "bitsandbytes" if method == "bitsandbytes" else method
    return Inspection(path, fmt, size, [f"quant_method {method}: {json.dumps(quant, sort_keys=True)[:200]}"], None, recipe)


def _inspect_compressed(path: Path, quant: dict, headers: dict, size: int, recipe: dict | None) -> Inspection:
    groups, clients = [], None
    for name, group in (quant.get("config_groups") or {}).items():
        weights, inputs = group.get("weights") or {}, group.get("input_activations")
        if weights.get("strategy") == "block":
            clients = FP8_BLOCK_CLIENTS
        elif inputs and weights.get("type") == "int" and weights.get("num_bits") == 4 and inputs.get("type") == "float":
            clients = W4AFP8_CLIENTS
        scheme = (f"{weights.get('num_bits')}-bit {weights.get('type')} weights, {weights.get('strategy')}"
                  f"{'' if weights.get('group_size') is None else ' of ' + str(weights['group_size'])}, "
                  f"{'symmetric' if weights.get('symmetric') else 'asymmetric'}")
        if inputs:
            timing = ("a scale per 16 at run time under a calibrated global scale" if inputs.get("dynamic") == "local"
                      else f"a scale per {inputs.get('group_size')} values at run time"
                      if inputs.get("dynamic") and inputs.get("strategy") == "group"
                      else "per token at run time" if inputs.get("dynamic") else "static per tensor")
            scheme += f"; {inputs.get('num_bits')}-bit {inputs.get('type')} inputs, {timing}"
        targets = ", ".join(group.get("targets", []))
        groups.append(f"{name} ({targets}): {scheme}")
    fmt = quant.get("format", "?")
    marker = ".weight_packed" if fmt == "pack-quantized" else ".weight_scale"
    linears = [key[: -len(marker)] for key in headers if key.endswith(marker)]
    weights = quant_bytes = 0
    for linear in linears:
        shape_key = linear + (".weight_shape" if fmt == "pack-quantized" else ".weight")
        out_in = headers.get(shape_key, (None, None, 0))[1]
        if not out_in:
            continue
        weights += out_in[0] * out_in[1]
        quant_bytes += sum(headers[linear + suffix][2] for suffix in
                           (".weight_packed", ".weight", ".weight_scale", ".weight_zero_point") if linear + suffix in headers)
    ignored = len(quant.get("ignore") or [])
    groups.append(f"{len(linears)} quantized Linears; {ignored} left unquantized (ignore list)")
    if kv := quant.get("kv_cache_scheme"):
        scales = sum(key.endswith((".k_scale", ".v_scale")) for key in headers)
        groups.append(f"KV cache: {kv.get('num_bits')}-bit {kv.get('type')}, one static scale per {kv.get('strategy')} "
                      f"({scales} k/v scales)")
    return Inspection(path, fmt, size, groups, 8 * quant_bytes / weights if weights else None, recipe, clients)

