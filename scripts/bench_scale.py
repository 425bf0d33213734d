"""Quantizing a model of real shape that does not fit in memory: time per layer, peak memory, end to end.

Writes a random-weight Llama-shaped checkpoint to disk as real safetensors shards (once; reused), then quantizes
it in a fresh process with `llmq.quantize` and prints one table row per run. Random weights are right for time
and memory at real shapes, never for quality.

Shapes: `8b` is Llama-3-8B's (hidden 4096, FFN 14336, 32 heads, 8 KV heads, vocab 128256, untied head: 16.1 GB in
bf16 at 32 layers); `--layers K` cuts the depth for quick runs (per-layer numbers do not depend on it).

    python scripts/bench_scale.py --layers 2                      # compressed-tensors GPTQ W4 g128, 2 layers
    python scripts/bench_scale.py --format gguf --type Q4_K_M     # the same into a GGUF file
    python scripts/bench_scale.py --device cuda --samples 128 --seqlen 2048
    python scripts/bench_scale.py --layers 2 --nproc 2                # 2 ranks (torchrun, gloo on the CPU)
    python scripts/bench_scale.py --model-free                    # RTN W4 g128 without building the model

Columns: per-layer seconds split into statistics (the forward passes that collect each group's Hessian),
solve (GPTQ's factorization, column sweep and rounding), next inputs (the quantized layer run on every
window) and load (reading the layer from the shards); end-to-end seconds; peak RSS of the quantizing process
(ru_maxrss, in KiB, as decimal GB like the sizes; with --nproc, rank 0's: each rank holds its own layer); peak GPU
memory where a GPU ran it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}
FULL_DEPTH = {"8b": 32, "1b": 16}


def write_checkpoint(directory: Path, shape: str, layers: int) -> Path:
    """A random bf16 Llama checkpoint written a tensor at a time (weights N(0, 0.02), norms 1), with SmolLM2's
    tokenizer (its ids are all below the vocabulary size); kept when it is already there."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmq.calib.models import embedded_gguf
    from llmq.targets.shards import ShardWriter

    if (directory / "config.json").exists():
        return directory
    staging = directory.with_name(directory.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, dtype="bfloat16", **SHAPES[shape])
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    shards = ShardWriter(staging)
    started = time.perf_counter()
    for name, tensor in skeleton.state_dict().items():
        if tensor.dim() == 1:
            value = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16)
        shards.add(name, value)
    size = shards.close()
    config.save_pretrained(staging)
    tokenizer = AutoTokenizer.from_pretrained(embedded_gguf().parent, gguf_file=embedded_gguf().name)
    tokenizer.save_pretrained(staging)
    staging.rename(directory)
    print(f"wrote {directory}: {size / 1e9:.1f} GB in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return directory


class RssByStage:
    """Peak resident memory per stage of the run (llmq/core/timing.py's open stages), sampled every 50 ms."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self._stop = False

    def _sample(self) -> None:
        from llmq.core.timing import stage_clock

        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page / 1e9
            stage = stage_clock.open[-1] if stage_clock.open else "other"
            self.peaks[stage] = max(self.peaks.get(stage, 0.0), rss)
            time.sleep(0.05)

    def __enter__(self):
        import threading

        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def run_child(args) -> dict:
    """One quantization, in this (fresh) process; returns its measurements."""
    import torch

    from llmq import QuantizeConfig, quantize

    options = dict(method=args.method, bits=4, group_size=args.group_size, symmetric=True,
                   calib=str(DATA / "wikitext2_valid_calib.txt"), samples=args.samples, seqlen=args.seqlen,
                   device=args.device, dtype=args.dtype)
    if args.format == "gguf":
        options = dict(method=args.method, format="gguf", gguf_type=args.type, calib=options["calib"],
                       samples=args.samples, seqlen=args.seqlen, device=args.device, dtype=args.dtype)
    if args.model_free:  # round-to-nearest from the safetensors, no model, no calibration
        options = dict(model_free=True, bits=4, group_size=args.group_size, symmetric=True)
    sampler = RssByStage()
    started = time.perf_counter()
    with sampler:
        result = quantize(args.model, args.out, QuantizeConfig.of(**options), overwrite=True)
    row = {"seconds": time.perf_counter() - started, "stages": result.stage_seconds, "rss_by_stage": sampler.peaks,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
           "size_before_gb": result.size_before / 1e9, "size_after_gb": result.size_after / 1e9}
    if torch.cuda.is_available() and args.device != "cpu":
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return row


STAGES = {"statistics": ("statistics",), "solve": ("factorization", "column sweep", "rounding"),
          "next inputs": ("next layer's inputs",), "load": ("load",)}


def table_row(args, layers: int, r: dict) -> str:
    per_layer = [sum(r["stages"].get(s, 0.0) for s in names) / layers for names in STAGES.values()]
    what = (f"{args.method} W4 g{args.group_size} sym" if args.format == "compressed-tensors"
            else f"{args.method} GGUF {args.type}")
    if args.model_free:
        what, args.samples, args.seqlen = f"model-free RTN W4 g{args.group_size} sym", 0, 0
    gpu = f"{r['peak_gpu_gb']:.1f}" if "peak_gpu_gb" in r else "-"
    ranks = f", {args.nproc} ranks" if args.nproc > 1 else ""
    return (f"| {args.shape} x {layers} layers | {what} | {args.samples} x {args.seqlen} | {args.device} {args.dtype}{ranks} | "
            + " | ".join(f"{t:.1f}" for t in per_layer)
            + f" | {r['seconds']:.0f} | {r['size_before_gb']:.1f} -> {r['size_after_gb']:.1f} | {r['peak_rss_gb']:.2f} | {gpu} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="8b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the full depth)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench_out" / "scale")
    parser.add_argument("--format", choices=("compressed-tensors", "gguf"), default="compressed-tensors")
    parser.add_argument("--type", default="Q4_K_M", help="GGUF mixture (with --format gguf)")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32",
                        help="what the layers compute in (float32 on CPUs without bf16 hardware: 4-5x faster)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="ranks (torch.distributed under torchrun; gloo on the CPU), each with cores/N threads")
    parser.add_argument("--model-free", action="store_true",
                        help="compressed-tensors round-to-nearest from the safetensors, no model built (llmq/model_free.py)")
    parser.add_argument("--keep", action="store_true", help="keep the quantized output")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = run_child(args)
        if int(os.environ.get("RANK", "0")) == 0:  # rank 0 reports (its own peak RSS: each rank holds a layer)
            print("RESULT " + json.dumps(row), flush=True)
        return

    layers = args.layers or FULL_DEPTH[args.shape]
    model = write_checkpoint(args.work / f"llama-{args.shape}-{layers}l", args.shape, layers)
    out = args.work / (f"out-{args.shape}-{layers}l" + (f"-{args.type}.gguf" if args.format == "gguf" else ""))
    # a bench measures a whole run: checkpoints an interrupted run left would be restored instead of quantized
    from llmq.calib.resume import resume_directory

    if resume_directory(out).exists():
        print(f"removing {resume_directory(out)} (an earlier run's checkpoints)", file=sys.stderr)
        subprocess.run(["rm", "-rf", str(resume_directory(out))], check=True)
    # the child does not take --nproc: under torchrun, its argparse would read it as its own --nproc-per-node
    passed = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--nproc") and sys.argv[i] != "--nproc"]
    command = [sys.executable, __file__, "--child", "--model", str(model), "--out", str(out), *passed]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.nproc > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
        from llmq.core.ranks import threads_per_rank

        env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(args.nproc)))
    started = time.perf_counter()
    process = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if process.returncode:
        sys.exit(f"the quantizing process failed ({process.returncode})")
    result = json.loads(next(line for line in process.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["peak_rss_gb"] = max(result["peak_rss_gb"], resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9)
    if not args.keep:
        subprocess.run(["rm", "-rf", str(out)], check=False)
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_quality import machine

    print(f"machine: {machine()}")
    print(f"wall {time.perf_counter() - started:.0f} s (process start and imports included)")
    print("| model | scheme | calibration | compute | statistics s/layer | solve s/layer | next inputs s/layer | "
          "load s/layer | end to end s | size GB | peak RSS GB | peak GPU GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(table_row(args, layers, result))
    print("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(result["stages"].items(), key=lambda kv: -kv[1])))
    print("peak RSS by stage: " + ", ".join(f"{k} {v:.2f} GB" for k, v in
                                             sorted(result["rss_by_stage"].items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
