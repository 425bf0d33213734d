"""The peer's side of scripts/bench_quality.py's `llmc-*` rows: one scheme made by llm-compressor.

Runs in llm-compressor's own virtual environment (it pins its own transformers and compressed-tensors), on the
calibration windows llmq drew (a JSON list of token-id lists written by bench_quality.py), so both tools see the
same 128 x 512 tokens. The recipes are llm-compressor's documented ones for each scheme: its presets where one
exists (W8A8, FP8_DYNAMIC), else an explicit config group (channel weights, per-tensor static inputs) with
llm-compressor's default observers; lm_head is left in 16 bits as llmq leaves it.

    /path/to/llmc-venv/bin/python scripts/peer_llmcompressor.py ROW MODEL WINDOWS.json OUT
"""

from __future__ import annotations

import json
import re
import sys
import time


def weights(kind: str) -> dict:
    return {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "channel", "dynamic": False}


def static_inputs(kind: str, bits: int = 8) -> dict:
    return {"num_bits": bits, "type": kind, "symmetric": True, "strategy": "tensor", "dynamic": False}


def weight_only(row: str) -> dict | None:
    """A W4A16-style row (`gptq-w4g64-sym-ao`): integer weights in groups, inputs left alone; else None."""
    found = re.fullmatch(r"(?:rtn|gptq)-w(\d)g(\d+)-(sym|asym)(?:-ao)?", row)
    if not found:
        return None
    bits, group, symmetric = int(found[1]), int(found[2]), found[3] == "sym"
    return {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group}}}


def scheme_of(row: str):
    """The `scheme` argument of llm-compressor's modifiers for a row: a preset name or config groups."""
    if found := re.fullmatch(r"(?:rtn|gptq)-(nvfp4a16|mxfp4a16|mxfp8a16|nvfp4|mxfp4|mxfp8)", row):
        return found[1].upper()  # its own presets of the microscaling formats
    if found := re.fullmatch(r"(?:rtn|gptq)-(w4a8|w4afp8)", row):
        # its W4A8 / W4AFP8 presets with groups of 64, as llmq writes them on this model (128 does not divide 576)
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

        preset = PRESET_SCHEMES[found[1].upper()]
        weights_args = preset["weights"].model_dump() | {"group_size": 64}
        return {"group_0": {"targets": ["Linear"], "weights": weights_args,
                            "input_activations": preset["input_activations"].model_dump()}}
    if groups := weight_only(row):
        return groups
    kind = "float" if "fp8" in row else "int"
    if row.endswith("-static"):
        bits = 16 if "a16int16" in row else 8
        return {"group_0": {"targets": ["Linear"], "weights": weights(kind),
                            "input_activations": static_inputs(kind, bits)}}
    return "FP8_DYNAMIC" if kind == "float" else "W8A8"


def recipe_of(row: str) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    name = row.removeprefix("llmc-")
    steps = [SmoothQuantModifier(smoothing_strength=0.5)] if name.startswith("sq") else []
    scheme = scheme_of(name)
    arguments = {"config_groups": scheme} if isinstance(scheme, dict) else {"targets": "Linear", "scheme": scheme}
    if "gptq" not in name:
        return steps + [QuantizationModifier(ignore=["lm_head"], **arguments)]
    # GPTQ's act-order: llm-compressor's default is "static" (llmq's kind: the column order changes, the groups
    # do not); rows without `-ao` switch it off
    actorder = {} if name.endswith("-ao") or weight_only(name) is None else {"actorder": None}
    return steps + [GPTQModifier(ignore=["lm_head"], **arguments, **actorder)]


def main() -> None:
    row, model_path, windows_path, out = sys.argv[1:5]
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = json.loads(open(windows_path).read())
    data = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe_of(row), num_calibration_samples=len(windows),
            max_seq_length=len(windows[0]), shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    print(json.dumps({"seconds": seconds, "version": f"llmcompressor {llmcompressor.__version__}"}))


if __name__ == "__main__":
    main()
