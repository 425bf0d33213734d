"""GGUF files from llmq against llama.cpp's own quantizer, evaluated by llama.cpp itself.

Protocol: the reference model (SmolLM2-135M-Instruct bf16, as in bench_quality.py) written by llmq as an
F32 GGUF; llama.cpp's files are made from that F32 file with llama_model_quantize (llama-quantize). Perplexity
is llama.cpp's own `perplexity` protocol through llama-cpp-python: ../shared/data/wikitext2_test.txt, 512-token
chunks each scored on its second half, first --chunks chunks. Calibration (imatrix / GPTQ): 128 x 512 tokens of
../shared/data/wikitext2_valid_calib.txt.

Rows per mixture:
  llama.cpp            llama_model_quantize on the F32 file (plain)
  llama.cpp imatrix    llama.cpp's quantizer (ggml_quantize_chunk) with an imatrix of mean x^2 per input channel
                       measured on the unquantized model over the same calibration tokens, same tensor types as
                       llama-quantize --imatrix picks (llama-cpp-python ships no imatrix tool, so the matrix is
                       collected by PyTorch hooks: the same statistic llama-imatrix accumulates)
  llmq                 llmq's plain k-quant search
  llmq imatrix         llmq, importance-weighted, imatrix collected through the harness
  llmq GPTQ            GPTQ on the k-quant grid

    python scripts/bench_gguf.py                       # Q6_K Q4_K_M Q3_K_M Q4_0, 50 chunks
    python scripts/bench_gguf.py --types Q4_K_M --chunks 150
    python scripts/bench_gguf.py --speed               # seconds per billion weights of the Q4_K_M encoder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "scripts"))

from bench_quality import reference_model

from llmq import QuantizeConfig, quantize
from llmq.core import log
from llmq.eval.llamacpp import llamacpp_perplexity, llamacpp_quantize_file, llamacpp_quantize_tensor
from llmq.methods.grids.kquant_search import QUANTIZED_TYPES, encode_bytes
from llmq.targets.atomic import atomic_output_file
from llmq.targets.gguf.mixtures import get_mixture
from llmq.targets.gguf.target import tensor_plan
from llmq.targets.gguf.writer import EncodedTensor, encode_float, prepare_float, write_gguf

CALIB = DATA / "wikitext2_valid_calib.txt"


def llmq_file(reference: Path, out: Path, mixture: str, method: str, calib: Path | None) -> float:
    started = time.perf_counter()
    config = QuantizeConfig.of(method=method, format="gguf", gguf_type=mixture,
                               calib=None if calib is None else str(calib), samples=128, seqlen=512)
    quantize(str(reference), out, config, overwrite=True)
    return time.perf_counter() - started


def unquantized_imatrix(model, tokenizer) -> dict[str, torch.Tensor]:
    """Mean x^2 per input channel of every decoder Linear, on the unquantized model (what llama-imatrix measures)."""
    from llmq.calib.text import calibration_samples

    samples, _ = calibration_samples(model, tokenizer, str(CALIB), 128, 512, torch.device("cpu"))
    sums, counts, hooks = {}, {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            def hook(mod, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in samples.split(8):
            model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    return {name: sums[name] / counts[name] for name in sums}


def llamacpp_imatrix_file(model, tokenizer, imatrix, out: Path, mixture_name: str) -> float:
    started = time.perf_counter()
    mixture = get_mixture(mixture_name)
    names, plan = tensor_plan(model, mixture, has_imatrix=True)
    tensors = {}
    for hf_name, param in model.named_parameters():
        gguf_name, qtype = names[hf_name], plan[names[hf_name]]
        values = prepare_float(model.config, gguf_name, param)
        if qtype not in QUANTIZED_TYPES:
            tensors[gguf_name] = encode_float(values, qtype)
            continue
        importance = imatrix.get(hf_name.removesuffix(".weight"))
        data = llamacpp_quantize_tensor(values.numpy(), qtype, None if importance is None else importance.numpy())
        tensors[gguf_name] = EncodedTensor(qtype, data)
    with atomic_output_file(out, overwrite=True) as tmp:
        write_gguf(tmp, model, tokenizer, tensors, mixture.file_type, name=out.stem)
    return time.perf_counter() - started


def speed(reference: Path) -> None:
    """Seconds per billion weights: llmq's encoder (torch, all threads) vs llama.cpp's (ggml_quantize_chunk, 1 thread)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    names, plan = tensor_plan(model, get_mixture("Q4_K_M"), has_imatrix=False)
    jobs = [(param.detach(), plan[names[n]]) for n, param in model.named_parameters() if plan[names[n]] in QUANTIZED_TYPES]
    square = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    cases = {"reference model, Q4_K_M plan": jobs, "4096 x 4096, Q4_K": [(square, T.Q4_K)],
             "4096 x 4096, Q6_K": [(square, T.Q6_K)]}
    print(f"| tensors | weights | llmq s per 1e9 weights ({torch.get_num_threads()} threads) | llama.cpp s per 1e9 (1 thread) |")
    print("|---|---:|---:|---:|")
    for name, work in cases.items():
        weights = sum(w.numel() for w, _ in work)
        started = time.perf_counter()
        for w, qtype in work:
            encode_bytes(w, qtype)
        ours = time.perf_counter() - started
        started = time.perf_counter()
        for w, qtype in work:
            llamacpp_quantize_tensor(w.numpy(), qtype)
        theirs = time.perf_counter() - started
        print(f"| {name} | {weights / 1e6:.1f} M | {ours / weights * 1e9:.0f} | {theirs / weights * 1e9:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q6_K", "Q4_K_M", "Q3_K_M", "Q4_0"])
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--f32-chunks", type=int, default=150, help="chunks for the F32 row (protocol check)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench_out")
    parser.add_argument("--encoders", nargs="+", default=["llama.cpp", "llama.cpp imatrix", "llmq", "llmq imatrix",
                                                          "llmq GPTQ"])
    parser.add_argument("--speed", action="store_true")
    args = parser.parse_args()
    log.quiet = True
    reference = reference_model(args.work)
    if args.speed:
        speed(reference)
        return
    out_dir = args.work / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = (DATA / "wikitext2_test.txt").read_text(encoding="utf-8")
    results = []

    def evaluate(name, mixture, path, seconds, chunks):
        ppl, used = llamacpp_perplexity(path, text, 512, chunks)
        row = {"row": name, "mixture": mixture, "ppl": ppl, "chunks": used, "mb": path.stat().st_size / 1e6,
               "seconds": seconds}
        results.append(row)
        print(json.dumps(row), flush=True)

    f32 = out_dir / "F32.gguf"
    seconds = llmq_file(reference, f32, "F32", "rtn", None)
    evaluate("F32 (llmq writer)", "F32", f32, seconds, args.f32_chunks)
    if args.f32_chunks != args.chunks:
        evaluate("F32 (llmq writer)", "F32", f32, seconds, args.chunks)

    model = tokenizer = imatrix = None
    for mixture in args.types:
        file_type = get_mixture(mixture).file_type
        for encoder in args.encoders:
            path = out_dir / f"{mixture}-{encoder.replace(' ', '-').replace('.', '')}.gguf"
            if encoder == "llama.cpp":
                started = time.perf_counter()
                llamacpp_quantize_file(f32, path, file_type)
                seconds = time.perf_counter() - started
            elif encoder == "llama.cpp imatrix":
                if imatrix is None:
                    from transformers import AutoModelForCausalLM, AutoTokenizer

                    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.bfloat16)
                    tokenizer = AutoTokenizer.from_pretrained(reference)
                    imatrix = unquantized_imatrix(model, tokenizer)
                seconds = llamacpp_imatrix_file(model, tokenizer, imatrix, path, mixture)
            elif encoder == "llmq":
                seconds = llmq_file(reference, path, mixture, "rtn", None)
            elif encoder == "llmq imatrix":
                seconds = llmq_file(reference, path, mixture, "rtn", CALIB)
            else:
                seconds = llmq_file(reference, path, mixture, "gptq", CALIB)
            evaluate(encoder, mixture, path, seconds, args.chunks)

    base = {r["chunks"]: r["ppl"] for r in results if r["mixture"] == "F32"}
    print(f"\n| mixture | encoder | size MB | perplexity ({args.chunks} chunks x 512) | vs F32 | make s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        if r["chunks"] != args.chunks:
            continue
        print(f"| {r['mixture']} | {r['row']} | {r['mb']:.1f} | {r['ppl']:.4f} | {r['ppl'] / base[r['chunks']]:.3f} | "
              f"{r['seconds']:.0f} |")
    for r in results:
        if r["chunks"] != args.chunks:
            print(f"\nprotocol check: {r['row']} over {r['chunks']} chunks: {r['ppl']:.4f}")


if __name__ == "__main__":
    main()
