"""GPTQ's solve at Llama-3-8B shapes: llmq's factorization and column sweep against the reference gptq.py's.

For each Linear of one Llama-3-8B decoder layer (random weights N(0, 0.02), a Hessian from random correlated
activations of `--tokens` tokens), GPTQ W4 g128 (symmetric, act-order: llmq's defaults) runs twice on the same
inputs: once as llmq does it (one reversed Cholesky of the Hessian, no inverse; the sweep in sub-blocks on
transposed blocks) and once with the reference's steps (Cholesky, cholesky_inverse, Cholesky; a rank-1 update of
the whole block per column). Prints seconds per stage for both, their ratio, and how many of the integers
agree (the two are the same sums in another order: equal up to a rounding decision that float rounding flips,
after which the two sweeps push different errors) and the ratio of GPTQ's own loss tr((W - Q) H (W - Q)^T).

    python scripts/bench_gptq_sweep.py                 # the whole layer (about 4 minutes on 2 cores)
    python scripts/bench_gptq_sweep.py --only q_proj   # one Linear
    python scripts/bench_gptq_sweep.py --threads       # llmq's factorization on 1 thread vs all, by size: where
                                                       # llmq/core/device.py's SMALL_MATRIX threshold comes from
"""

from __future__ import annotations

import argparse
import time

import torch

from llmq.calib.statistics import HessianCollector
from llmq.core.config import MethodOptions
from llmq.core.scheme import QuantScheme
from llmq.core.timing import stage_clock
from llmq.methods import gptq
from llmq.methods.grids.integer import IntegerGrid

LINEARS = {  # name: (out_features, in_features) of Llama-3-8B
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}


def hessian(features: int, tokens: int, seed: int) -> HessianCollector:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, 64, generator=g)  # correlated channels, as a transformer's
    x = torch.randn(tokens, features, generator=g) + torch.randn(tokens, 64, generator=g) @ mix.T / 8
    stats = HessianCollector(features, torch.device("cpu"))
    stats.add(x)
    return stats


def solve(weight, stats, reference: bool):
    """(integers, {stage: seconds}) of one GPTQ run, llmq's or the reference's steps."""
    saved = {name: getattr(gptq, name) for name in gptq.REFERENCE_ROUTE}
    if reference:
        for name, step in gptq.REFERENCE_ROUTE.items():
            setattr(gptq, name, step)
    try:
        stage_clock.reset()
        stats.derived.clear()  # each route makes its own factor
        method = gptq.GPTQ(MethodOptions(act_order=True))
        result = method.quantize(weight, stats, IntegerGrid(QuantScheme(4, 128, True), torch.bfloat16))
        return result, dict(stage_clock.seconds)
    finally:
        for name, step in saved.items():
            setattr(gptq, name, step)


def thread_table(sizes=(576, 1536, 4096, 8192)) -> None:
    """Seconds of llmq's factorization (one Cholesky) on one thread and on all of them."""
    import contextlib

    threads = torch.get_num_threads()
    gptq.small_linear_algebra = lambda device, rows: contextlib.nullcontext()  # the thread count set here holds
    print(f"| rows | 1 thread s | {threads} threads s | ratio |")
    print("|---|---|---|---|")
    for rows in sizes:
        H = hessian(rows, 2 * rows, rows).hessian()
        seconds = []
        for count in (1, threads):
            torch.set_num_threads(count)
            gptq.hessian_factor(H, 0.01)  # warm-up
            started = time.perf_counter()
            gptq.hessian_factor(H, 0.01)
            seconds.append(time.perf_counter() - started)
        torch.set_num_threads(threads)
        print(f"| {rows} | {seconds[0]:.3f} | {seconds[1]:.3f} | {seconds[0] / seconds[1]:.2f}x |", flush=True)


def gptq_loss(weight, quantized, stats) -> float:
    """GPTQ's own objective, tr((W - Q) H (W - Q)^T)."""
    error = weight - quantized.dequantize()
    return (error @ stats.hessian()).mul_(error).sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens behind each Hessian")
    parser.add_argument("--only", choices=LINEARS, action="append", help="only these Linears")
    parser.add_argument("--threads", action="store_true", help="only the factorization's 1-thread vs all table")
    args = parser.parse_args()
    if args.threads:
        thread_table()
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPTQ W4 g128 sym act-order, "
          f"Hessians of {args.tokens} random tokens")
    header = ("| Linear | shape | factorization ref s | llmq s | ratio | column sweep ref s | llmq s | ratio "
              "| integers equal | GPTQ loss llmq / ref |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    totals = {"ref": [0.0, 0.0], "llmq": [0.0, 0.0]}
    hessians: dict[int, HessianCollector] = {}
    for seed, (name, (rows, cols)) in enumerate(LINEARS.items()):
        if args.only and name not in args.only:
            continue
        if cols not in hessians:
            hessians = {cols: hessian(cols, args.tokens, seed)}  # one at a time: down_proj's is 822 MB
        weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
        ref_q, ref = solve(weight, hessians[cols], reference=True)
        ours_q, ours = solve(weight, hessians[cols], reference=False)
        equal = (ref_q.qweight == ours_q.qweight).float().mean().item()
        loss_ratio = gptq_loss(weight, ours_q, hessians[cols]) / gptq_loss(weight, ref_q, hessians[cols])
        f_ref, f_ours = ref.get("factorization", 0.0), ours.get("factorization", 0.0)
        s_ref, s_ours = ref.get("column sweep", 0.0), ours.get("column sweep", 0.0)
        totals["ref"][0] += f_ref
        totals["ref"][1] += s_ref
        totals["llmq"][0] += f_ours
        totals["llmq"][1] += s_ours
        print(f"| {name} | {rows}x{cols} | {f_ref:.2f} | {f_ours:.2f} | {f_ref / f_ours:.2f}x | {s_ref:.2f} | "
              f"{s_ours:.2f} | {s_ref / s_ours:.2f}x | {equal:.5f} | {loss_ratio:.4f} |", flush=True)
        del ref_q, ours_q, weight
    (fr, sr), (fo, so) = totals["ref"], totals["llmq"]
    if fo and so:
        print(f"| all | one layer | {fr:.1f} | {fo:.1f} | {fr / fo:.2f}x | {sr:.1f} | {so:.1f} | {sr / so:.2f}x | | |")


if __name__ == "__main__":
    main()
