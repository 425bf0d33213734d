"""What the data-free first run (`llmq quantize` with no arguments) spends its time on, and what each knob costs in
quality: prints one table.

Part 1, generation: the embedded default writes its own calibration text (texts x tokens) in bfloat16 or float32,
with transformers' dynamic or static KV cache; seconds and tokens/s.
Part 2, the whole run: `llmq.quantize(None, ...)` (GPTQ W4, the default scheme) with data-free calibration of each
size and compute dtype; seconds by stage, and the output's perplexity on wikitext2 test (N windows of 2048 tokens,
scored by llmq.load in float32) against the unquantized model's on the same windows.

Usage: python scripts/first_run_options.py [--part gen|run|both] [--windows 10] [--rows 16x256:float32 ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2_test.txt"


def generation_rows(texts: int, tokens: int):
    from llmq.calib.models import load_embedded_default
    from llmq.calib.text import self_generated_samples

    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        model, tokenizer = load_embedded_default(dtype)
        for cache in ("dynamic", "static"):
            started = time.perf_counter()
            self_generated_samples(model, tokenizer, texts, tokens, torch.device("cpu"), cache=cache)
            seconds = time.perf_counter() - started
            rows.append((str(dtype).removeprefix("torch."), cache, texts, tokens, seconds, texts * (tokens - 1) / seconds))
    print("\n| dtype | KV cache | texts x tokens | seconds | tokens/s |\n|---|---|---|---|---|")
    for dtype, cache, n, length, seconds, rate in rows:
        print(f"| {dtype} | {cache} | {n} x {length} | {seconds:.1f} | {rate:.0f} |")


def perplexity(model, windows) -> float:
    from llmq.eval import evaluate

    return evaluate(model, windows, None, "cpu").perplexity


def run_rows(specs: list[str], windows: int):
    import llmq
    from llmq.calib.models import load_embedded_default
    from llmq.eval import evaluation_windows

    base, tokenizer = load_embedded_default(torch.float32)
    test = evaluation_windows(tokenizer, str(DATA), 2048, windows)
    reference = perplexity(base, test)
    del base
    print(f"unquantized (float32): perplexity {reference:.3f} on {windows} x 2048 tokens of wikitext2 test", flush=True)
    rows = []
    for spec in specs:
        size, _, dtype = spec.partition(":")
        samples, seqlen = map(int, size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            result = llmq.quantize(None, out, llmq.QuantizeConfig.of(samples=samples, seqlen=seqlen, dtype=dtype or "auto",
                                                                    device="cpu"))
            ppl = perplexity(llmq.load(out, dtype=torch.float32), test)
        stages = ", ".join(f"{k} {v:.0f}" for k, v in sorted(result.stage_seconds.items(), key=lambda kv: -kv[1])[:5])
        size = result.size_after / 1e6
        rows.append((spec, result.seconds, stages, ppl, size))
        print(f"{spec}: {result.seconds:.0f} s ({stages}); perplexity {ppl:.3f} ({ppl / reference:.3f}x), {size:.1f} MB",
              flush=True)
    print("\n| calibration (texts x tokens : dtype) | run s | top stages (s) | ppl | ratio to unquantized | size MB |\n"
          "|---|---|---|---|---|---|")
    for spec, seconds, stages, ppl, size in rows:
        print(f"| {spec} | {seconds:.0f} | {stages} | {ppl:.2f} | {ppl / reference:.3f} | {size:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["gen", "run", "both"], default="both")
    parser.add_argument("--gen-size", default="16x256", help="texts x tokens for the generation rows")
    parser.add_argument("--rows", nargs="+", default=["16x256:float32", "32x256:float32", "32x512:float32",
                                                       "32x256:bfloat16"])
    parser.add_argument("--windows", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.part in ("gen", "both"):
        generation_rows(*map(int, args.gen_size.split("x")))
    if args.part in ("run", "both"):
        run_rows(args.rows, args.windows)


if __name__ == "__main__":
    main()
