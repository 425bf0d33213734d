"""What vLLM's CPU W4A8 path costs a W4A16 checkpoint: perplexity with every quantized Linear's input rounded to
8 bits per token, emulated in llmq's own evaluation (README, Benchmark: served quality).

On CPUs with AMX, vLLM 0.32 runs compressed-tensors W4A16 files through `int4_scaled_mm_cpu`, which quantizes
each Linear's input per token (`VLLM_CPU_INT4_W4A8=1`, its default). This prints the perplexity of CHECKPOINT on
the first WINDOWS 2048-token windows of wikitext2 test: as written, with inputs rounded per token on an
asymmetric u8 grid, and on a symmetric int8 grid.

    python scripts/w4a8_emulate.py bench_out/q18/gptq-w4g64-sym-ao --windows 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llmq.eval import evaluate, evaluation_windows, load_for_eval

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def round_per_token(x: torch.Tensor, asymmetric: bool) -> torch.Tensor:
    """x with each token (last axis) rounded to 8 bits on its own range."""
    if asymmetric:
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        scale = ((high - low) / 255).clamp(min=1e-8)
        zero = torch.round(-low / scale)
        return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load_for_eval(args.checkpoint, "cpu", torch.float32)
    windows = evaluation_windows(tokenizer, str(DATA / "wikitext2_test.txt"), 2048, args.windows)
    quantized = [m for m in model.modules() if type(m).__name__ == "QuantLinear"]
    result = {"checkpoint": args.checkpoint, "windows": args.windows, "as written": evaluate(model, windows).perplexity}
    for asymmetric, name in ((True, "inputs u8 asymmetric per token"), (False, "inputs int8 symmetric per token")):
        hooks = [m.register_forward_pre_hook(lambda module, inputs, a=asymmetric: (round_per_token(inputs[0], a),))
                 for m in quantized]
        result[name] = evaluate(model, windows).perplexity
        for hook in hooks:
            hook.remove()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
