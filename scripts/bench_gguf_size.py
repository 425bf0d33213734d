"""`--target-bpw` / `--target-size` on the reference model: is the sensitivity proxy right, and do sized files beat
llama.cpp's fixed mixtures at equal size?

    python scripts/bench_gguf_size.py --proxy            # predicted vs measured KL increase, tensor by tensor
    python scripts/bench_gguf_size.py --sweep            # sized files at the sizes of llama.cpp's mixtures

--proxy: the reference model in float32; the sensitivity pass (llmq/targets/gguf/sizing.py) on 8 x 512 tokens of
../shared/data/wikitext2_valid_calib.txt; then every quantizable tensor alone rounded to a probe type (Q4_0 for
all, and IQ2_XS where the row allows it), the KL divergence of the next-token distribution to the unquantized
model's measured on 2 x 512 tokens of wikitext2_test.txt, against the predicted cost. Prints Spearman's rank
correlation and the ratio predicted/measured.

--sweep: for each mixture, llama.cpp's file (llama-quantize with llama-imatrix's 128 x 512 matrix of the calibration
text, as scripts/bench_gguf.py makes it) and llmq's `--target-size` file of exactly that file's size (importance-
weighted rounding, calibrated on 64 x 512 tokens of the same text), both scored by llama.cpp's llama-perplexity
(-c 512 --chunks 50 -nr on wikitext2_test.txt, KL to the F32 file's logits). Prints the table and draws size
against KL (docs/assets/gguf-size-vs-kl.png). Needs llama.cpp's tools (scripts/build_llamacpp.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "scripts"))

from bench_gguf import LlamaCppTools
from bench_quality import reference_model

from llmq import QuantizeConfig, quantize
from llmq.calib.arch import decoder_layout, quantizable_linears
from llmq.core import log
from llmq.methods.grids.kquant import BlockTensor
from llmq.methods.grids.kquant_search import encode
from llmq.targets.gguf import sizing
from llmq.targets.gguf.mixtures import is_quantizable
from llmq.targets.gguf.sizing import measure_sensitivity, tensor_options
from llmq.targets.gguf.writer import RECIPE_KEY, gguf_names, stacked_shapes

CALIB = DATA / "wikitext2_valid_calib.txt"
TEST = DATA / "wikitext2_test.txt"
OUT = ROOT / "bench_out" / "size"


def windows(tokenizer, path: Path, count: int, length: int) -> torch.Tensor:
    ids = tokenizer(path.read_text()[: 20 * count * length], return_tensors="pt").input_ids[0]
    return ids[: count * length].reshape(count, length)


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def proxy() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = reference_model(ROOT / "bench_out")
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(reference, trust_remote_code=False)
    started = time.perf_counter()
    sensitivity = measure_sensitivity(model, windows(tokenizer, CALIB, 8, 512))
    names = gguf_names(model)
    shapes = {name: shape for name, shape in stacked_shapes(model, names).items() if is_quantizable(name, shape)}
    layout = decoder_layout(model, torch.device("cpu"), folds=False)
    weighted = set(quantizable_linears(model, layout))
    options = tensor_options(model, names, shapes, sensitivity, weighted)
    print(f"sensitivity + costs: {time.perf_counter() - started:.0f} s")
    test = windows(tokenizer, TEST, 2, 512)
    with torch.no_grad():
        base = torch.log_softmax(model(test).logits.float(), -1)
    params = dict(model.named_parameters())
    # a (tensor, type) pair's measured KL does not depend on the predictor: an earlier run's are reused (delete
    # proxy.json to measure them again)
    known = {(r[0], r[1]): r[3] for r in json.loads((OUT / "proxy.json").read_text())} if (OUT / "proxy.json").exists() else {}
    rows = []
    for hf_name, gguf_name in names.items():
        if gguf_name not in options:
            continue
        param = params[hf_name]
        original = param.data.clone()
        importance = next((sensitivity.input_squares[n] for n in weighted if f"{n}.weight" == hf_name), None)
        for option in options[gguf_name]:
            if option.qtype not in (T.Q4_0, T.IQ2_XS):
                continue
            if (gguf_name, option.qtype.name) in known:
                rows.append((gguf_name, option.qtype.name, option.cost, known[gguf_name, option.qtype.name]))
                continue
            param.data = BlockTensor(option.qtype, encode(original, option.qtype, importance),
                                     tuple(original.shape)).dequantize()
            with torch.no_grad():
                logp = torch.log_softmax(model(test).logits.float(), -1)
            kl = float((base.exp() * (base - logp)).sum(-1).mean())
            param.data = original
            rows.append((gguf_name, option.qtype.name, option.cost, kl))
            print(f"{gguf_name:28s} {option.qtype.name:7s} predicted {option.cost:.3e} measured {kl:.3e}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "proxy.json").write_text(json.dumps(rows))
    report_proxy(rows)


def report_proxy(rows) -> None:
    print("| probe | tensors | Spearman (predicted, measured) | median predicted/measured |")
    print("|---|---:|---:|---:|")
    for probe in ("Q4_0", "IQ2_XS", "all"):
        chosen = [r for r in rows if probe in ("all", r[1])]
        ratios = sorted(r[2] / max(r[3], 1e-12) for r in chosen)
        print(f"| {probe} | {len(chosen)} | {spearman([r[2] for r in chosen], [r[3] for r in chosen]):.3f} | "
              f"{ratios[len(ratios) // 2]:.2f} |")
    kinds: dict[str, list[float]] = {}
    for name, _, predicted, measured in rows:  # the embedding against the Linears: what the choice trades
        kinds.setdefault(name.split(".")[-2] if name.startswith("blk.") else name, []).append(predicted / max(measured, 1e-12))
    print("median predicted/measured by kind: " + ", ".join(
        f"{kind} {sorted(r)[len(r) // 2]:.2f}" for kind, r in kinds.items()))


SWEEP = ["IQ2_XS", "IQ3_XXS", "IQ3_M", "IQ4_XS", "Q4_K_M", "Q5_K_M"]


def _run_name(method: str, without: list[str]) -> str:
    return method + "".join(f"-no-{name}" for name in without)


def sweep(mixtures: list[str], chunks: int, method: str, without: list[str]) -> None:
    tools = LlamaCppTools(ROOT / "bench_out" / "llama.cpp" / "build" / "bin", torch.get_num_threads())
    reference = reference_model(ROOT / "bench_out")
    gguf_dir = ROOT / "bench_out" / "gguf"
    f32, imatrix, kl_base = gguf_dir / "F32.gguf", gguf_dir / "imatrix-llamacpp.gguf", gguf_dir / f"F32-{chunks}.kld"
    if not (f32.exists() and imatrix.exists() and kl_base.exists()):
        sys.exit("bench_gguf_size: run scripts/bench_gguf.py first (it makes the F32 file, llama.cpp's imatrix and "
                 "the KL base this compares against)")
    OUT.mkdir(parents=True, exist_ok=True)
    run = _run_name(method, without)
    # the reference model was made from a Q4_1 GGUF: Q4_1 and Q5_1 hold its weights almost exactly, which no
    # other model's weights do; --without Q4_1 Q5_1 takes them off the candidates for a comparison that says
    # something about other models
    sizing.CANDIDATES = tuple(t for t in sizing.CANDIDATES if t.name not in without)
    results_path = OUT / f"sweep-{run}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for mixture in mixtures:
        theirs = gguf_dir / f"{mixture}-llamacpp-imatrix.gguf"
        if not theirs.exists():
            tools.quantize(f32, theirs, mixture, imatrix)
        key = f"llama.cpp {mixture}"
        if key not in results:
            results[key] = {"mb": theirs.stat().st_size / 1e6, **tools.perplexity(theirs, chunks, kl_base, False)}
            results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps({key: results[key]}), flush=True)
        ours = OUT / f"sized-{mixture}-{run}.gguf"
        key = f"llmq {run} sized to {mixture}"
        if key not in results:
            started = time.perf_counter()
            quantize(str(reference), ours, QuantizeConfig.of(
                method=method, format="gguf", target_size=str(theirs.stat().st_size), calib=str(CALIB), samples=64,
                seqlen=512), overwrite=True)
            seconds = time.perf_counter() - started
            card = json.loads(bytes(GGUFReader(ours).get_field(RECIPE_KEY).parts[-1]))["sizing"]
            results[key] = {"mb": ours.stat().st_size / 1e6, "seconds": seconds, "predicted_kl": card["predicted_kl"],
                            **tools.perplexity(ours, chunks, kl_base, False)}
            results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps({key: results[key]}), flush=True)
    report_sweep(results, mixtures, run)


def report_sweep(results: dict, mixtures: list[str], run: str) -> None:
    print("\n| size of | llama.cpp imatrix MB | KL | llmq sized MB | KL | predicted KL | KL ratio | PPL llama.cpp | PPL llmq |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mixture in mixtures:
        theirs, ours = results.get(f"llama.cpp {mixture}"), results.get(f"llmq {run} sized to {mixture}")
        if theirs and ours:
            print(f"| {mixture} | {theirs['mb']:.2f} | {theirs['kl']:.4f} | {ours['mb']:.2f} | {ours['kl']:.4f} | "
                  f"{ours['predicted_kl']:.4f} | {ours['kl'] / theirs['kl']:.2f} | {theirs['ppl']:.3f} | {ours['ppl']:.3f} |")


def plot_sweep(runs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    theirs = {}
    for index, run in enumerate(runs):
        results = json.loads((OUT / f"sweep-{run}.json").read_text())
        theirs.update({k.split()[-1]: (v["mb"], v["kl"]) for k, v in results.items() if k.startswith("llama.cpp")})
        ours = sorted((v["mb"], v["kl"]) for k, v in results.items() if k.startswith("llmq"))
        label = "llmq --target-size" + (f" without {', '.join(run.split('-no-')[1:])}" if "-no-" in run else "")
        ax.plot([o[0] for o in ours], [o[1] for o in ours], "o-", color=["tab:blue", "tab:green"][index % 2],
                label=label)
    ax.scatter([v[0] for v in theirs.values()], [v[1] for v in theirs.values()], color="tab:red",
               label="llama.cpp mixtures (llama-imatrix)")
    for name, (mb, kl) in theirs.items():
        ax.annotate(name, (mb, kl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("KL divergence to F32 (llama-perplexity, 50 x 512)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M-Instruct: file size against KL")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = ROOT / "docs" / "assets" / "gguf-size-vs-kl.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--plot", nargs="*", metavar="RUN",
                        help="draw the PNG from saved sweeps (e.g. rtn rtn-no-Q4_1-no-Q5_1)")
    parser.add_argument("--without", nargs="*", default=[], metavar="TYPE",
                        help="take these types off the sized files' candidates (e.g. Q4_1 Q5_1, see --sweep)")
    parser.add_argument("--mixtures", nargs="+", default=SWEEP)
    parser.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    parser.add_argument("--chunks", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.proxy:
        proxy()
    if args.sweep:
        log.quiet = True
        sweep(args.mixtures, args.chunks, args.method, args.without)
    if args.plot is not None:
        plot_sweep(args.plot or [args.method])


if __name__ == "__main__":
    main()
