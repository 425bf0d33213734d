"""One process against `--nproc N`: how many stored integers differ, and whether quality does.

    python scripts/ranks_vs_one.py --calib ../shared/data/wikitext2_valid_calib.txt \
        --eval ../shared/data/wikitext2_test.txt [--model DIR] [--nproc 2] [--windows 10]

The ranks sum each group's statistics (GPTQ's Hessian) over their shares of the windows: the same products added
in another order than one process adds them, so the sums differ in their last bits, and GPTQ's sweep (each
rounding decision feeds the next column's error) turns a few changed decisions into many. This prints, for each
run, its wall time, the share of stored integers that differ from the one-process run's, and perplexity and KL
to the unquantized model on the same evaluation windows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmq.eval import evaluate, evaluation_windows, load_for_eval


def quantize(model: str | None, out: Path, calib: str, nproc: int) -> float:
    argv = [sys.executable, "-m", "llmq", "quantize", *([model] if model else []), "--method", "gptq",
            "--calib", calib, "--out", str(out), "--nproc", str(nproc)]
    started = time.perf_counter()
    subprocess.run(argv, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def integers(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(path).items() if not v.is_floating_point()})
    return tensors


def unpacked_differences(one: dict, other: dict) -> tuple[int, int]:
    """(differing 4-bit codes, all codes): packed int32 words compared nibble by nibble."""
    differing = total = 0
    for name, words in one.items():
        a, b = words.view(torch.int32), other[name].view(torch.int32)
        for shift in range(0, 32, 4):
            differing += ((a >> shift) & 0xF).ne((b >> shift) & 0xF).sum().item()
        total += words.numel() * 8
    return differing, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--windows", type=int, default=10, help="evaluation windows of 2048 tokens")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        outs = {1: Path(work) / "one", args.nproc: Path(work) / f"ranks{args.nproc}"}
        seconds = {n: quantize(args.model, out, args.calib, n) for n, out in outs.items()}
        base, tokenizer = load_for_eval(args.model or "embedded")
        windows = evaluation_windows(tokenizer, args.eval, 2048, args.windows)
        reference = integers(outs[1])
        print("| run | wall s | codes differing from one process | perplexity | KL to unquantized |")
        print("|---|---:|---:|---:|---:|")
        for n, out in outs.items():
            model = load_for_eval(str(out))[0]
            result = evaluate(model, windows, base)
            differing, total = unpacked_differences(reference, integers(out))
            label = "one process" if n == 1 else f"--nproc {n}"
            print(f"| {label} | {seconds[n]:.0f} | {differing / total:.2%} | {result.perplexity:.3f} | "
                  f"{result.kl_divergence:.5f} |")


if __name__ == "__main__":
    main()
