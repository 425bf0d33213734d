"""GPTQ's solve at Llama-3-8B shapes: llmq's factorization and column sweep against the reference gptq.py's.

For each Linear of one Llama-3-8B decoder layer (random weights N(0, 0.02), a Hessian from random correlated
activations of `--tokens` tokens), GPTQ W4 g128 (symmetric, act-order: llmq's defaults) runs twice on the same
inputs: once as llmq does it (one reversed Cholesky of the Hessian, no inverse; the sweep in sub-blocks on
transposed blocks) and once with the reference's steps (Cholesky, cholesky_inverse, Cholesky; a rank-1 update of
the whole block per column). Prints seconds per stage for both, their ratio, and how many of the integers
agree (the two are the same sums in another order: equal up to a rounding decision that float rounding flips,
after which the two sweeps push different errors) and the ratio of GPTQ's own loss tr((W - Q) H (W - Q)^T). The
"floor" columns are the seconds the arithmetic alone takes at this machine's measured float32 rates (matrix
products and Cholesky): what is left above them is Python, memory traffic and the per-column rounding.

    python scripts/bench_gptq_sweep.py                 # the whole layer (about 4 minutes on 2 cores)
    python scripts/bench_gptq_sweep.py --only q_proj   # one Linear
    python scripts/bench_gptq_sweep.py --grid q4_k     # onto GGUF's Q4_K blocks (no inverse: Babai's form)
    python scripts/bench_gptq_sweep.py --no-act-order  # the integer grid's dynamic groups (no inverse either)
    python scripts/bench_gptq_sweep.py --floor         # one layer's FLOP-rate floor at this machine's rates
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


def make_grid(name: str):
    from gguf import GGMLQuantizationType as T

    from llmq.methods.grids.kquant import KQuantGrid

    return KQuantGrid(T.Q4_K) if name == "q4_k" else IntegerGrid(QuantScheme(4, 128, True), torch.bfloat16)


def solve(weight, stats, reference: bool, grid: str = "int", act_order: bool = True):
    """(integers, {stage: seconds}) of one GPTQ run, llmq's or the reference's steps."""
    saved = {name: getattr(gptq, name) for name in gptq.REFERENCE_ROUTE}
    if reference:
        for name, step in gptq.REFERENCE_ROUTE.items():
            setattr(gptq, name, step)
    try:
        stage_clock.reset()
        stats.derived.clear()  # each route makes its own factor
        method = gptq.GPTQ(MethodOptions(act_order=act_order))
        result = method.quantize(weight, stats, make_grid(grid))
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


def machine_rates() -> tuple[float, float]:
    """This machine's float32 rates, flop/s (best of 3): a 4096-square matrix product and an 8192-row Cholesky
    (LAPACK's rate still climbs with the size: 4096 rows understate it by a third here)."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    x = torch.randn(8192, 8192)
    spd = x @ x.T + 8192 * torch.eye(8192)
    del x
    rates = []
    for work, flops in ((lambda: torch.mm(a, b), 2 * 4096**3), (lambda: torch.linalg.cholesky(spd), 8192**3 / 3)):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - started)
        rates.append(flops / best)
    return rates[0], rates[1]


def floors(rows: int, cols: int, inverse: bool, gemm: float, cholesky: float) -> tuple[float, float]:
    """Seconds the arithmetic of one solve takes at this machine's rates: the factorization (a Cholesky, n^3/3
    flops, and, where the sweep needs the inverse's factor, a triangular inverse, n^3/3 flops more) and the
    sweep's updates (rows x cols^2 / 2 multiply-adds, all in matrix products), nothing else."""
    factorization = cols**3 / 3 / cholesky + (cols**3 / 3 / gemm if inverse else 0.0)  # n^3/3 flops each
    return factorization, rows * cols**2 / gemm


def layer_floor(gemm: float, cholesky: float) -> None:
    """The arithmetic of one Llama-3-8B layer's GPTQ solve at these rates, with and without the inverse's factor."""
    print(f"this machine: {gemm / 1e9:.0f} GFLOP/s in float32 matrix products, {cholesky / 1e9:.0f} in Cholesky")
    print("| route | factorization floor s/layer | sweep floor s/layer | solve floor s/layer |")
    print("|---|---|---|---|")
    for route, inverse in (("act-order, groups fitted in the sweep (needs U)", True), ("R only (Babai)", False)):
        factor = sweep = 0.0
        for name, (rows, cols) in LINEARS.items():
            f, w = floors(rows, cols, inverse, gemm, cholesky)
            factor += 0.0 if name in ("k_proj", "v_proj", "up_proj") else f  # they share q's and gate's factor
            sweep += w
        print(f"| {route} | {factor:.1f} | {sweep:.1f} | {factor + sweep:.1f} |")


def integers_of(quantized) -> torch.Tensor:
    return quantized.qweight if hasattr(quantized, "qweight") else quantized.codes.L


def gptq_loss(weight, quantized, stats) -> float:
    """GPTQ's own objective, tr((W - Q) H (W - Q)^T)."""
    error = weight - quantized.dequantize()
    return (error @ stats.hessian()).mul_(error).sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens behind each Hessian")
    parser.add_argument("--only", choices=LINEARS, action="append", help="only these Linears")
    parser.add_argument("--threads", action="store_true", help="only the factorization's 1-thread vs all table")
    parser.add_argument("--grid", choices=("int", "q4_k"), default="int",
                        help="int: W4 g128 sym (compressed-tensors); q4_k: GGUF's Q4_K blocks")
    parser.add_argument("--no-act-order", dest="act_order", action="store_false",
                        help="visit the columns in order (with the integer grid: the reference's dynamic groups)")
    parser.add_argument("--floor", action="store_true",
                        help="only the FLOP-rate floor of one decoder layer's solve (as a run makes it: q/k/v and "
                             "gate/up share one factorization), from this machine's measured rates; seconds")
    args = parser.parse_args()
    if args.threads:
        thread_table()
        return
    gemm, cholesky = machine_rates()
    if args.floor:
        layer_floor(gemm, cholesky)
        return
    inverse = args.grid == "int" and args.act_order  # groups re-fitted mid-sweep: the sweep needs U = R^-1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPTQ onto {args.grid} "
          f"{'with' if args.act_order else 'without'} act-order, Hessians of {args.tokens} random tokens; this "
          f"machine: {gemm / 1e9:.0f} GFLOP/s in matrix products, {cholesky / 1e9:.0f} in Cholesky (float32)")
    header = ("| Linear | shape | factorization ref s | llmq s | floor s | column sweep ref s | llmq s | floor s "
              "| integers equal | GPTQ loss llmq / ref |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    totals: dict[str, list[float]] = {}
    hessians: dict[int, HessianCollector] = {}
    for seed, (name, (rows, cols)) in enumerate(LINEARS.items()):
        if args.only and name not in args.only:
            continue
        if cols not in hessians:
            hessians = {cols: hessian(cols, args.tokens, seed)}  # one at a time: down_proj's is 822 MB
        weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
        ref_q, ref = solve(weight, hessians[cols], True, args.grid, args.act_order)
        ours_q, ours = solve(weight, hessians[cols], False, args.grid, args.act_order)
        floor_f, floor_s = floors(rows, cols, inverse, gemm, cholesky)
        equal = (integers_of(ref_q) == integers_of(ours_q)).float().mean().item()
        loss_ratio = gptq_loss(weight, ours_q, hessians[cols]) / gptq_loss(weight, ref_q, hessians[cols])
        f_ref, f_ours = ref.get("factorization", 0.0), ours.get("factorization", 0.0)
        s_ref, s_ours = ref.get("column sweep", 0.0), ours.get("column sweep", 0.0)
        for key, values in (("ref", (f_ref, s_ref)), ("llmq", (f_ours, s_ours)), ("floor", (floor_f, floor_s))):
            totals[key] = [a + b for a, b in zip(totals.get(key, [0.0, 0.0]), values)]
        print(f"| {name} | {rows}x{cols} | {f_ref:.2f} | {f_ours:.2f} | {floor_f:.2f} | {s_ref:.2f} | "
              f"{s_ours:.2f} | {floor_s:.2f} | {equal:.5f} | {loss_ratio:.4f} |", flush=True)
        del ref_q, ours_q, weight
    (fr, sr), (fo, so), (ff, sf) = totals["ref"], totals["llmq"], totals["floor"]
    print(f"| all | one layer | {fr:.1f} | {fo:.1f} | {ff:.1f} | {sr:.1f} | {so:.1f} | {sf:.1f} | | |")
    print("(each Linear factorizes here; in a run q/k/v and gate/up share one factorization)")


if __name__ == "__main__":
    main()
