"""A ternary (BitNet) checkpoint as GGUF TQ1_0 / TQ2_0, run by llama.cpp itself, beside llmq's own model.

For a transformers-native BitNet checkpoint (e.g. bench_out/bitnet-qat300 from bench_quality.py):
  - `llmq export-gguf --type TQ1_0|TQ2_0` files, and an F32 GGUF of the same ternary weights (no encoding at all);
  - their sizes; perplexity by llama.cpp in its own protocol (wikitext2 test, 512-token chunks scored on the
    second half, first --chunks chunks); llmq's perplexity of the same checkpoint in the same protocol;
  - greedy tokens for a short prompt, llama.cpp vs llmq.
SmolLM2's 576-wide rows are not multiples of 256: there llama.cpp's fallback (Q4_0) holds the ternary values
(exactly up to the fp16 scale); only ffn_down is TQ. tests/test_bitnet.py covers a model with 256-multiple rows.

    python scripts/bench_ternary_gguf.py bench_out/bitnet-qat300 --chunks 20
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

from llmq.core import log
from llmq.eval.llamacpp import llamacpp_perplexity, open_llama
from llmq.export import densify, export_bitnet_gguf, write_plain_gguf
from llmq.targets.bitnet import load_bitnet

PROMPT = "The history of the city begins"


@torch.no_grad()
def llmq_perplexity_llamacpp_protocol(model, tokenizer, text: str, n_ctx: int, chunks: int) -> float:
    """The same chunks, BOS and scored half as llamacpp_perplexity, computed by llmq's model."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    first, nll, count = n_ctx // 2, 0.0, 0
    for i in range(chunks):
        chunk = torch.tensor(ids[i * n_ctx : (i + 1) * n_ctx]).unsqueeze(0)
        logits = model(chunk).logits[0, first : n_ctx - 1].double()
        targets = chunk[0, first + 1 :]
        nll -= torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets].sum().item()
        count += len(targets)
    return math.exp(nll / count)


def greedy_llamacpp(path: Path, ids: list[int], n: int) -> list[int]:
    with open_llama(path, n_ctx=128) as llm:
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            out.append(token)
            if len(out) == n:
                break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args()
    log.quiet = True
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    text = (DATA / "wikitext2_test.txt").read_text(encoding="utf-8")
    model = load_bitnet(args.checkpoint, torch.float32)
    prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    llmq_ppl = llmq_perplexity_llamacpp_protocol(model, tokenizer, text, 512, args.chunks)

    files = {}
    for qtype in ("TQ1_0", "TQ2_0"):
        files[qtype] = args.checkpoint.with_name(f"{args.checkpoint.name}-{qtype}.gguf")
        export_bitnet_gguf(args.checkpoint, files[qtype], qtype, overwrite=True)
    files["F32"] = args.checkpoint.with_name(f"{args.checkpoint.name}-F32.gguf")
    densify(model)
    write_plain_gguf(model, tokenizer, "F32", files["F32"], overwrite=True)

    print(f"{args.checkpoint.name}: llama.cpp perplexity protocol, wikitext2 test, {args.chunks} chunks x 512; "
          f"greedy 16 tokens after {PROMPT!r}\n")
    print("| file | size MB | llama.cpp ppl | greedy tokens equal to llmq's |")
    print("|---|---|---|---|")
    print(f"| llmq (transformers-native checkpoint, int8 activations) | "
          f"{sum(f.stat().st_size for f in args.checkpoint.glob('*.safetensors')) / 1e6:.1f} | {llmq_ppl:.3f} (llmq) | - |")
    for name, path in files.items():
        ppl, _ = llamacpp_perplexity(path, text, n_ctx=512, max_chunks=args.chunks)
        got = greedy_llamacpp(path, prompt, 16)
        same = sum(a == b for a, b in zip(got, expected))
        print(f"| {name} | {path.stat().st_size / 1e6:.1f} | {ppl:.3f} | {same}/16 |")
    print(f"\nllmq greedy: {tokenizer.decode(expected)!r}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
