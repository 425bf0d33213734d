"""Speed of packed 4-bit Linears: llmq's CUDA kernels against cuBLAS bf16, torch's int4 kernel and the HBM floor;
end-to-end decode; and the CPU path's perplexity evaluation against the dense float32 model.

    python scripts/bench_kernel.py --gpu      # per shape and M (needs a CUDA GPU); then decode tokens/s
    python scripts/bench_kernel.py --cpu      # perplexity evaluation time and peak memory, packed vs dense (CPU),
                                              # and bf16 greedy decode tokens/s

GPU protocol: weights random (speed does not depend on values), group 128, asymmetric, bf16 activations. Each
timing is the median of 50 CUDA-event-timed runs after 10 warm-up runs. The HBM floor is (packed weight +
fp16 scales + uint8 zeros + activation + output bytes) / copy bandwidth, the bandwidth measured in the same
run by a 2 GiB device-to-device copy (read + write bytes / time). torch int4 is
`torch.ops.aten._weight_int4pack_mm` (tinygemm) with group 128.

CPU protocol: the reference model (bench_quality.py) quantized with GPTQ W4 g64 (asymmetric), evaluated with
llmq.eval on wikitext2 test, 2048-token windows; the dense row is the bf16 reference loaded in float32. Each row
runs in its own process so the peak RSS is its own.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "scripts"))

SHAPES = {  # name: (K, N)
    "8B q/k/v": (4096, 6144),
    "8B o": (4096, 4096),
    "8B gate+up": (4096, 28672),
    "8B down": (14336, 4096),
    "70B gate+up": (8192, 57344),
    "70B down": (28672, 8192),
}
MS = (1, 4, 16, 64, 128, 512)


# ---- GPU -------------------------------------------------------------------------------------------------------


def _time_cuda(fn, repeats: int = 50, warmup: int = 10) -> float:
    """Median microseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write)."""
    source = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    us = _time_cuda(lambda: target.copy_(source), repeats=20, warmup=3)
    return 2 * (2 << 30) / (us * 1e-6)  # the buffers go when this frame does


def _random_w4(n: int, k: int, group: int = 128):
    from llmq.runtime.kernels.cuda import PackedW4

    g = torch.Generator(device="cuda").manual_seed(0)
    qweight = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32, generator=g)
    scales = (torch.rand(n, k // group, device="cuda", generator=g) * 0.01 + 1e-3).half()
    zeros = torch.randint(0, 16, (n, k // group), device="cuda", dtype=torch.uint8, generator=g)
    return PackedW4(qweight, scales, zeros, group, k, n)


def gpu_table() -> list[dict]:
    from llmq.runtime.kernels import fragments
    from llmq.runtime.kernels.build import load_extension
    from llmq.runtime.kernels.cuda import choose_path, w4_linear_cuda

    extension = load_extension()
    if extension is None:
        raise SystemExit("the llmq CUDA kernel did not build; see the message above")
    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name, (k, n) in SHAPES.items():
        packed = _random_w4(n, k)
        fragment = fragments.from_packed(packed)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        tinygemm = torch.ops.aten._convert_weight_to_int4pack(
            torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8), 8)
        scales_zeros = torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            cublas = _time_cuda(lambda: torch.matmul(x, dense.T))
            int4 = _time_cuda(lambda: torch.ops.aten._weight_int4pack_mm(x, tinygemm, 128, scales_zeros))
            ours = _time_cuda(lambda: w4_linear_cuda(extension, x, packed, None, out=None if choose_path(m) == "cublas" else out))
            # the other llmq kernels that can take this M, for comparison with the default choice; "tc" (the
            # fragment-ordered tensor-core kernel) takes every M
            others = {path: _time_cuda(lambda path=path: w4_linear_cuda(extension, x, packed, None, out=out, path=path,
                                                                        fragment=fragment))
                      for path, top in (("gemv", 8), ("mma", 128), ("tc", 1 << 30)) if m <= top and path != choose_path(m)}
            weight_bytes = n * k // 2 + packed.scales.numel() * 3
            floor = (weight_bytes + 2 * m * (k + n)) / bandwidth * 1e6
            rows.append({"shape": name, "M": m, "cublas_us": cublas, "torch_int4_us": int4, "llmq_us": ours,
                         "llmq_path": choose_path(m), "floor_us": floor,
                         **{f"llmq_{path}_us": us for path, us in others.items()}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    return rows


def print_gpu_table(rows: list[dict]) -> None:
    print("| shape | M | cuBLAS bf16 µs | torch int4 µs | llmq µs (path) | floor µs | llmq/floor | bf16/llmq | int4/llmq |"
          " other llmq path µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        others = ", ".join(f"{key[5:-3]} {value:.1f}" for key, value in r.items()
                           if key.startswith("llmq_") and key.endswith("_us") and key != "llmq_us")
        print(f"| {r['shape']} | {r['M']} | {r['cublas_us']:.1f} | {r['torch_int4_us']:.1f} | {r['llmq_us']:.1f} "
              f"({r['llmq_path']}) | {r['floor_us']:.1f} | {r['llmq_us'] / r['floor_us']:.2f} | "
              f"{r['cublas_us'] / r['llmq_us']:.2f} | {r['torch_int4_us'] / r['llmq_us']:.2f} | {others} |")


def graphed_decode(model, ids: torch.Tensor, tokens: int) -> float:
    """Greedy decode tokens/s with each one-token step replayed as a CUDA graph (static KV cache, static input
    buffers): what the kernels cost without Python's per-launch overhead, which dominates eager decode at batch 1."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + tokens + 1)
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True,
                       cache_position=torch.arange(ids.shape[1], device="cuda")).logits
        token = logits[:, -1:].argmax(-1)
        position = torch.tensor([ids.shape[1]], device="cuda")

        def step():
            out = model(input_ids=token, past_key_values=cache, use_cache=True, cache_position=position,
                        position_ids=position[None])
            token.copy_(out.logits[:, -1:].argmax(-1))

        side = torch.cuda.Stream()  # warm-up off the default stream, as graph capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
                position += 1
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(tokens - 3):
            position += 1
            graph.replay()
        torch.cuda.synchronize()
    return (tokens - 3) / (time.perf_counter() - started)


def decode_speed(tokens: int = 128) -> dict:
    """Greedy decode tokens/s of an 8B-shaped Llama (random weights), bf16 vs every Linear packed 4-bit: eager
    transformers `generate`, and one-token steps replayed as CUDA graphs (graphed_decode); int4 with the kernels
    chosen by M and with the "tc" kernel alone (LLMQ_W4_KERNEL=tc)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmq.core.scheme import QuantScheme
    from llmq.runtime.modeling import QuantLinear

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, 16), device="cuda")

    def eager() -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        torch.cuda.synchronize()
        return tokens / (time.perf_counter() - started)

    def graphed() -> float | str:
        try:
            return graphed_decode(model, ids, tokens)
        except Exception as error:  # one failed capture must not lose the rest of the device run
            return f"graph capture failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"

    eager()
    result = {"bf16_tokens_per_s": eager(), "bf16_graphed_tokens_per_s": graphed()}
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            n, k = module.out_features, module.in_features
            packed = _random_w4(n, k)
            zero_words = torch.zeros((n + 7) // 8, k // 128, device="cuda", dtype=torch.int32)
            layer = QuantLinear(k, n, QuantScheme(4, 128, False), packed.qweight, packed.scales.to(torch.bfloat16),
                                zero_words, None)
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(child, layer)
    torch.cuda.empty_cache()
    eager()
    result.update(int4_tokens_per_s=eager(), int4_graphed_tokens_per_s=graphed())
    os.environ["LLMQ_W4_KERNEL"] = "tc"
    try:
        eager()
        result.update(int4_tc_tokens_per_s=eager(), int4_tc_graphed_tokens_per_s=graphed())
    finally:
        del os.environ["LLMQ_W4_KERNEL"]
    return result


# ---- CPU -------------------------------------------------------------------------------------------------------


def cpu_row(kind: str, windows: int) -> dict:
    from llmq.core import log
    from llmq.eval import evaluate, evaluation_windows, load_for_eval

    log.quiet = True
    work = ROOT / "bench_out"
    if kind == "packed":
        target = work / "gptq-w4g64-asym-ao"
        if not (target / "config.json").exists():
            from llmq import QuantizeConfig, quantize

            quantize(str(work / "SmolLM2-135M-Instruct-bf16"), target,
                     QuantizeConfig.of(method="gptq", group_size=64, calib=str(DATA / "wikitext2_valid_calib.txt")))
    else:
        target = work / "SmolLM2-135M-Instruct-bf16"
    model, tokenizer = load_for_eval(str(target), "cpu", torch.float32)
    data = evaluation_windows(tokenizer, str(DATA / "wikitext2_test.txt"), 2048, windows)
    started = time.perf_counter()
    result = evaluate(model, data)
    return {"kind": kind, "seconds": time.perf_counter() - started, "ppl": result.perplexity,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def cpu_decode(tokens: int = 64) -> dict:
    """Greedy decode tokens/s on the CPU in bf16: the dense reference vs the packed GPTQ W4 g64 checkpoint
    (torch's CPU int4 kernel at one row per step)."""
    from transformers import AutoModelForCausalLM

    import llmq
    from llmq.core import log

    log.quiet = True
    work = ROOT / "bench_out"
    models = {"dense": AutoModelForCausalLM.from_pretrained(work / "SmolLM2-135M-Instruct-bf16", dtype=torch.bfloat16),
              "packed": llmq.load(work / "gptq-w4g64-asym-ao", dtype=torch.bfloat16)}
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 2536]])
    result = {}
    for name, model in models.items():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        result[name] = tokens / (time.perf_counter() - started)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--decode", action="store_true", help="with --gpu: also the 8B decode tokens/s")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(cpu_row(args.one, args.windows)))
        return
    if args.gpu:
        print_gpu_table(gpu_table())
        if args.decode:
            print(json.dumps(decode_speed()))
    if args.cpu:
        from bench_quality import reference_model

        reference_model(ROOT / "bench_out")
        rows = []
        for kind in ("dense", "packed"):
            done = subprocess.run([sys.executable, __file__, "--one", kind, "--windows", str(args.windows)],
                                  capture_output=True, text=True, env=os.environ, check=False)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"CPU ({os.cpu_count()} cores), SmolLM2-135M-Instruct, wikitext2 test, {args.windows} x 2048 tokens\n")
        print("| model | eval s | s / window | perplexity | peak RSS GB |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kind']} | {r['seconds']:.1f} | {r['seconds'] / args.windows:.2f} | {r['ppl']:.3f} | "
                  f"{r['peak_rss_gb']:.2f} |")
        print(f"\npacked / dense time: {rows[1]['seconds'] / rows[0]['seconds']:.3f}x; "
              f"peak memory {rows[1]['peak_rss_gb'] / rows[0]['peak_rss_gb']:.3f}x")
        decode = cpu_decode()
        print(f"\nbf16 greedy decode, 64 tokens: dense {decode['dense']:.1f} tokens/s, packed "
              f"{decode['packed']:.1f} tokens/s ({decode['packed'] / decode['dense']:.2f}x)")


if __name__ == "__main__":
    main()
