"""Peak memory against depth: the same 1024-wide Llama at 8 and 32 decoder layers, quantized a layer at a time.

    python scripts/memory_by_depth.py [--layers 8 32] [--targets compressed-tensors gguf] [--tied]

Each run is a fresh process (`llmq.quantize`, GPTQ, W4 g128 or Q4_K_M, 16 x 128 calibration tokens from
wikitext2_valid_calib.txt) sampling its anonymous resident memory (RssAnon: what the run allocates, not the
checkpoint's memory-mapped pages) every 20 ms. A lazy run holds the embeddings, one layer and the calibration
activations whatever the depth, so the 32-layer peak should be close to the 8-layer one; the last column is the
ratio (goal <= 1.15). Random bf16 weights (written once under bench_out/memory/), right for memory, not quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=49152, max_position_embeddings=2048)


def write_checkpoint(directory: Path, layers: int, tied: bool) -> Path:
    """A random bf16 Llama checkpoint written a tensor at a time (weights N(0, 0.02), norms 1), SmolLM2's tokenizer."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmq.calib.models import embedded_gguf
    from llmq.targets.shards import ShardWriter

    if (directory / "config.json").exists():
        return directory
    staging = directory.with_name(directory.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=tied, dtype="bfloat16", **SHAPE)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    shards = ShardWriter(staging)
    for name, tensor in skeleton.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        value = (torch.ones(tensor.shape) if tensor.dim() == 1 else torch.randn(tensor.shape, generator=generator) * 0.02)
        shards.add(name, value.to(torch.bfloat16))
    shards.close()
    config.save_pretrained(staging)
    tokenizer = AutoTokenizer.from_pretrained(embedded_gguf().parent, gguf_file=embedded_gguf().name)
    tokenizer.save_pretrained(staging)
    staging.rename(directory)
    return directory


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def child(model: str, out: str, target: str, calib: str) -> dict:
    import llmq
    from llmq.core import log

    log.quiet = True
    peak, stop = [0], [False]

    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    options = dict(method="gptq", calib=calib, samples=16, seqlen=128, device="cpu")
    if target == "gguf":
        options.update(format="gguf", gguf_type="Q4_K_M")
    else:
        options.update(group_size=128)
    started = time.perf_counter()
    llmq.quantize(model, out, llmq.QuantizeConfig.of(**options))
    stop[0] = True
    thread.join()
    return {"seconds": time.perf_counter() - started, "peak": peak[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--targets", nargs="+", default=["compressed-tensors", "gguf"])
    parser.add_argument("--tied", action="store_true", help="tie the head to the embeddings")
    parser.add_argument("--calib", default=str(ROOT.parent / "shared" / "data" / "wikitext2_valid_calib.txt"))
    parser.add_argument("--work", type=Path, default=ROOT / "bench_out" / "memory")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.calib)))
        return

    print(f"| target | layers | {'tied' if args.tied else 'untied'} checkpoint | peak RssAnon | time | vs {args.layers[0]} layers |")
    print("|---|---:|---:|---:|---:|---:|")
    for target in args.targets:
        first = None
        for layers in args.layers:
            model = write_checkpoint(args.work / f"llama1024-{layers}{'-tied' if args.tied else ''}", layers, args.tied)
            size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
            out = args.work / f"out-{target}-{layers}{'.gguf' if target == 'gguf' else ''}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            run = subprocess.run([sys.executable, __file__, "--child", str(model), str(out), target,
                                  "--calib", args.calib], capture_output=True, text=True, check=True)
            result = json.loads(run.stdout.strip().splitlines()[-1])
            first = first or result["peak"]
            print(f"| {target} | {layers} | {size / 1e9:.2f} GB | {result['peak'] / 1e9:.2f} GB | "
                  f"{result['seconds']:.0f} s | {result['peak'] / first:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
