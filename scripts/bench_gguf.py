"""GGUF files from llmq against llama.cpp's own tools, scored by llama.cpp's own `llama-perplexity`.

Protocol (what llama.cpp users run): the reference model (SmolLM2-135M-Instruct bf16, as in bench_quality.py)
written by llmq as an F32 GGUF; `llama-perplexity -c 512 --chunks 50 -nr` on ../shared/data/wikitext2_test.txt
read as bytes (its CRLF line ends kept: Python's text mode turns them into LF and the F32 model then scores 23.30
instead of llama.cpp's 21.48); KL divergence to the F32 file's logits over the same tokens
(`--kl-divergence-base` / `--kl-divergence`, the llama.cpp community's quant metric) and the share of tokens whose
top token is unchanged. Calibration: ../shared/data/wikitext2_valid_calib.txt, 128 x 512 tokens.
The tools are llama.cpp's, built from the source llama-cpp-python vendors: scripts/build_llamacpp.sh.

Rows per mixture:
  llama.cpp            `llama-quantize F32.gguf out.gguf MIXTURE` (plain)
  llama.cpp imatrix    `llama-imatrix -c 512 --chunks 128` on the calibration text, then `llama-quantize --imatrix`
  llmq                 llmq's plain k-quant search (no data)
  llmq imatrix         llmq, importance-weighted, imatrix collected through the harness
  llmq GPTQ            GPTQ on the k-quant grid

    scripts/build_llamacpp.sh                          # once: the tools into bench_out/llama.cpp/build/bin
    python scripts/bench_gguf.py                       # Q6_K Q4_K_M Q3_K_M Q4_0, 50 chunks
    python scripts/bench_gguf.py --types Q4_K_M --encoders llama.cpp llmq --chunks 150
    python scripts/bench_gguf.py --scorer python       # no tools: llama-cpp-python, llama.cpp's protocol, no KL
    python scripts/bench_gguf.py --speed --types Q4_K_M IQ4_XS   # encoder seconds per 1e9 weights; whole runs' wall time
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "scripts"))

from bench_quality import reference_model

from llmq import QuantizeConfig, quantize
from llmq.core import log
from llmq.core.errors import LlmqError
from llmq.eval.llamacpp import llamacpp_perplexity, llamacpp_quantize_tensor
from llmq.methods.grids.kquant_search import QUANTIZED_TYPES, encode_bytes
from llmq.targets.gguf.mixtures import IMATRIX_MIXTURES, get_mixture
from llmq.targets.gguf.target import tensor_plan

CALIB = DATA / "wikitext2_valid_calib.txt"
TEST = DATA / "wikitext2_test.txt"
ENCODERS = ["llama.cpp", "llama.cpp imatrix", "llmq", "llmq imatrix", "llmq GPTQ"]


def llmq_file(reference: Path, out: Path, mixture: str, method: str, calib: Path | None) -> float:
    started = time.perf_counter()
    config = QuantizeConfig.of(method=method, format="gguf", gguf_type=mixture,
                               calib=None if calib is None else str(calib), samples=128, seqlen=512)
    quantize(str(reference), out, config, overwrite=True)
    return time.perf_counter() - started


class LlamaCppTools:
    """llama.cpp's own binaries: quantize, imatrix, perplexity (with KL divergence to a saved F32 run)."""

    def __init__(self, bin_dir: Path, threads: int):
        self.bin_dir, self.threads = bin_dir, threads
        missing = [t for t in ("llama-perplexity", "llama-quantize", "llama-imatrix") if not (bin_dir / t).exists()]
        if missing:
            sys.exit(f"bench_gguf: {', '.join(missing)} not in {bin_dir}; build them with scripts/build_llamacpp.sh "
                     "(or score without them: --scorer python)")

    def _run(self, tool: str, *args) -> str:
        done = subprocess.run([str(self.bin_dir / tool), *map(str, args)], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench_gguf: {tool} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done.stdout + done.stderr

    def quantize(self, source: Path, target: Path, mixture: str, imatrix: Path | None = None) -> None:
        extra = [] if imatrix is None else ["--imatrix", imatrix]
        self._run("llama-quantize", *extra, source, target, mixture, self.threads)

    def imatrix(self, model: Path, calib: Path, out: Path, chunks: int = 128) -> None:
        self._run("llama-imatrix", "-m", model, "-f", calib, "-o", out, "-c", 512, "--chunks", chunks, "-nr",
                  "--no-ppl", "-t", self.threads)

    def perplexity(self, path: Path, chunks: int, kl_base: Path, save_base: bool) -> dict:
        """PPL over `chunks` x 512; with save_base, this file's logits become the KL base, else KL against it."""
        kl = ["--kl-divergence-base", kl_base] + ([] if save_base else ["--kl-divergence"])
        out = self._run("llama-perplexity", "-m", path, "-f", TEST, "-c", 512, "--chunks", chunks, "-nr",
                        "-t", self.threads, *kl)
        if save_base:
            return {"ppl": float(re.search(r"Final estimate: PPL = ([\d.]+)", out).group(1))}
        number = lambda label: float(re.search(label + r"\s*:\s*([\d.]+)", out).group(1))
        return {"ppl": number(r"Mean PPL\(Q\)"), "kl": number(r"Mean\s+KLD"), "same_top": number("Same top p")}


def python_perplexity(path: Path, chunks: int) -> dict:
    """llama.cpp's protocol through llama-cpp-python: the same tokens and chunks as llama-perplexity, no KL."""
    text = TEST.read_bytes().decode("utf-8")  # bytes as llama.cpp reads them: CRLF kept
    return {"ppl": llamacpp_perplexity(path, text, 512, chunks)[0]}


def whole_run_speed(reference: Path, tools: LlamaCppTools, out_dir: Path, mixtures: list[str]) -> None:
    """Wall time of a whole plain run: `llmq quantize` as a user starts it (a new process: imports, model load,
    encoding, writing) against `llama-quantize` on the F32 file of the same model (its own start-up included),
    both with every thread of the machine."""
    f32 = out_dir / "F32.gguf"
    if not f32.exists():
        llmq_file(reference, f32, "F32", "rtn", None)
    print(f"| mixture | llmq quantize s | llama-quantize s | ratio |  ({torch.get_num_threads()} threads)")
    print("|---|---:|---:|---:|")
    for mixture in mixtures:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmq", "quantize", str(reference), "--format", "gguf", "--type", mixture,
                        "--out", str(out_dir / f"speed-{mixture}.gguf"), "--overwrite"], check=True,
                       capture_output=True)
        ours = time.perf_counter() - started
        started = time.perf_counter()
        tools.quantize(f32, out_dir / f"speed-{mixture}-llamacpp.gguf", mixture)
        theirs = time.perf_counter() - started
        print(f"| {mixture} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.1f}x |", flush=True)


def speed(reference: Path) -> None:
    """Seconds per billion weights: llmq's encoder (torch, all threads) vs llama.cpp's (ggml_quantize_chunk, 1 thread)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    names, plan = tensor_plan(model, get_mixture("Q4_K_M"), has_imatrix=False)
    jobs = [(param.detach(), plan[names[n]]) for n, param in model.named_parameters() if plan[names[n]] in QUANTIZED_TYPES]
    square = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    cases = {"reference model, Q4_K_M plan": jobs, "4096 x 4096, Q4_K": [(square, T.Q4_K)],
             "4096 x 4096, Q6_K": [(square, T.Q6_K)]}
    print(f"| tensors | weights | llmq s per 1e9 weights ({torch.get_num_threads()} threads) | llama.cpp s per 1e9 (1 thread) |")
    print("|---|---:|---:|---:|")
    for name, work in cases.items():
        weights = sum(w.numel() for w, _ in work)
        started = time.perf_counter()
        for w, qtype in work:
            encode_bytes(w, qtype)
        ours = time.perf_counter() - started
        started = time.perf_counter()
        for w, qtype in work:
            llamacpp_quantize_tensor(w.numpy(), qtype)
        theirs = time.perf_counter() - started
        print(f"| {name} | {weights / 1e6:.1f} M | {ours / weights * 1e9:.0f} | {theirs / weights * 1e9:.0f} |")


def _not_applicable(mixture: str, encoder: str) -> str | None:
    """Why an encoder cannot make a mixture (llama.cpp's and llmq's own refusals), or None."""
    if mixture in IMATRIX_MIXTURES and encoder in ("llama.cpp", "llmq"):
        return "needs an importance matrix"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q6_K", "Q4_K_M", "Q3_K_M", "Q4_0"])
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--work", type=Path, default=ROOT / "bench_out")
    parser.add_argument("--encoders", nargs="+", choices=ENCODERS, default=ENCODERS)
    parser.add_argument("--scorer", choices=["llama.cpp", "python"], default="llama.cpp",
                        help="llama.cpp: its llama-perplexity (PPL and KL); python: llama-cpp-python, PPL only")
    parser.add_argument("--tools", type=Path, default=ROOT / "bench_out" / "llama.cpp" / "build" / "bin",
                        help="llama-perplexity / llama-quantize / llama-imatrix (scripts/build_llamacpp.sh)")
    parser.add_argument("--check-scorer", action="store_true",
                        help="also score the F32 file through llama-cpp-python (the two protocols should agree)")
    parser.add_argument("--speed", action="store_true")
    args = parser.parse_args()
    log.quiet = True
    for mixture in args.types:
        try:
            get_mixture(mixture)  # an unknown name fails here in one line, before any work
        except LlmqError as error:
            sys.exit(f"bench_gguf: {error}")
    reference = reference_model(args.work)
    if args.speed:
        speed(reference)
        whole_run_speed(reference, LlamaCppTools(args.tools, torch.get_num_threads()), args.work / "gguf", args.types)
        return
    needs_tools = args.scorer == "llama.cpp" or any(e.startswith("llama.cpp") for e in args.encoders)
    tools = LlamaCppTools(args.tools, torch.get_num_threads()) if needs_tools else None
    out_dir = args.work / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    kl_base = out_dir / f"F32-{args.chunks}.kld"
    results = []

    def evaluate(name, mixture, path, seconds):
        if args.scorer == "python":
            scores = python_perplexity(path, args.chunks)
        else:
            scores = tools.perplexity(path, args.chunks, kl_base, save_base=mixture == "F32")
        row = {"row": name, "mixture": mixture, "chunks": args.chunks, "mb": path.stat().st_size / 1e6,
               "seconds": seconds, **scores}
        results.append(row)
        print(json.dumps(row), flush=True)

    f32 = out_dir / "F32.gguf"
    seconds = llmq_file(reference, f32, "F32", "rtn", None)
    evaluate("F32 (llmq writer)", "F32", f32, seconds)
    if args.check_scorer:
        print(json.dumps({"row": "F32 through llama-cpp-python", **python_perplexity(f32, args.chunks)}), flush=True)

    imatrix = None  # llama-imatrix runs once per invocation, on first need
    for mixture in args.types:
        for encoder in args.encoders:
            path = out_dir / f"{mixture}-{encoder.replace(' ', '-').replace('.', '')}.gguf"
            why_not = _not_applicable(mixture, encoder)
            if why_not:
                print(json.dumps({"row": encoder, "mixture": mixture, "skipped": why_not}), flush=True)
                continue
            started = time.perf_counter()
            if encoder == "llama.cpp":
                tools.quantize(f32, path, mixture)
            elif encoder == "llama.cpp imatrix":
                if imatrix is None and (out_dir / "imatrix-llamacpp.gguf").exists():
                    imatrix = out_dir / "imatrix-llamacpp.gguf"  # an earlier invocation's (delete it to redo it)
                    print(json.dumps({"imatrix": str(imatrix), "reused": True}), flush=True)
                if imatrix is None:
                    imatrix = out_dir / "imatrix-llamacpp.gguf"
                    partial = out_dir / "imatrix-llamacpp.partial.gguf"  # llama-imatrix saves as it goes
                    tools.imatrix(f32, CALIB, partial)
                    partial.replace(imatrix)
                    print(json.dumps({"imatrix": str(imatrix), "seconds": time.perf_counter() - started}), flush=True)
                tools.quantize(f32, path, mixture, imatrix)
            elif encoder == "llmq":
                llmq_file(reference, path, mixture, "rtn", None)
            elif encoder == "llmq imatrix":
                llmq_file(reference, path, mixture, "rtn", CALIB)
            else:  # llmq GPTQ
                llmq_file(reference, path, mixture, "gptq", CALIB)
            evaluate(encoder, mixture, path, time.perf_counter() - started)

    base = next(r["ppl"] for r in results if r["mixture"] == "F32")
    print(f"\n| mixture | encoder | size MB | PPL ({args.chunks} x 512) | vs F32 | KL to F32 | same top % | make s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        top = f"{r['same_top']:.2f}" if "same_top" in r else "-"
        print(f"| {r['mixture']} | {r['row']} | {r['mb']:.1f} | {r['ppl']:.4f} | {r['ppl'] / base:.4f} | {kl} | {top} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
