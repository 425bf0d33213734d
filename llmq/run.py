"""`llmq.quantize(model, out, config)`: the one run skeleton every method and every target goes through.

    check      the config, the method (llmq/methods) and the target (llmq/targets) against each other
    load       the model, refusing an unmapped architecture before any weight is read
    check      what the target cannot hold in this model, and non-finite weights
    stage      a temporary output beside `out`, renamed only when complete
    prepare    the method's whole-model step, if it has one (ternary-aware fine-tuning)
    calibrate  when the method needs data, or text was given and the target's grids can use it
    quantize   layer by layer on the target's grids (llmq/calib/harness.py), each finished layer checkpointed
               beside the output so that an interrupted run resumes where it stopped (llmq/calib/resume.py)
    write      the target writes the results; one summary line
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from llmq.calib.arch import check_config, decoder_layout, quantizable_linears
from llmq.calib.coverage import decoder_coverage
from llmq.calib.harness import ExpertPolicy, capture_layer_inputs, quantize_layers
from llmq.calib.kv_cache import add_kv_scales
from llmq.calib.lazy import lazy_weights
from llmq.calib.models import EMBEDDED_BASE_ID, EMBEDDED_DEFAULT, base_license, load_model, resolve_dtype
from llmq.calib.resume import LayerCheckpoints, run_fingerprint
from llmq.calib.text import calibration_samples, check_calib_source
from llmq.core import log, ranks
from llmq.core.config import QuantizeConfig, is_ignored
from llmq.core.device import human_size, resolve_device, tensor_bytes
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Method, ModelContext
from llmq.core.scheme import CAST_TYPES
from llmq.core.timing import stage_clock
from llmq.methods import build_method
from llmq.methods.tune import TuneSettings, frozen_teacher, tune_scales
from llmq.model_free import check_model_free, has_no_model_class, quantize_model_free
from llmq.targets import RunReport, Target, build_target, default_method


@dataclass
class QuantizeResult:
    """What `llmq.quantize` returns: where the output is, its size against the model's (bytes of weights), the
    wall time, the mean relative error of the quantized weights, where the calibration data came from, and the
    seconds of each stage (load, calibration inputs, statistics, column sweep, write, ...)."""

    out: Path
    size_before: int
    size_after: int
    seconds: float
    relative_weight_error: float
    calibration: str
    stage_seconds: dict[str, float]  # where the time went (llmq/core/timing.py): load, statistics, column sweep, ...
    quantized_fraction: float = 1.0  # of the decoder's matrix weights, the share stored quantized (calib/coverage.py)


def _calibrate(model, tokenizer, layout, method: Method, config: QuantizeConfig, device,
               checkpoints: LayerCheckpoints | None):
    """What enters the first decoder layer for every calibration window, a description of the data, and the
    windows' token ids.

    An interrupted run's windows are used again (data-free ones are sampled, so they could not be made again).
    """
    run = config.run
    previous = checkpoints.samples() if checkpoints is not None else None
    weights = lazy_weights(model)
    if previous is not None:
        samples, source = previous
    else:
        if weights is not None and run.calib is None:  # text may have to be sampled from the whole model
            log.info("llmq: no --calib text: reading the whole model, in case calibration text must be sampled from it")
            weights.load_all()
        made = None
        if ranks.is_main():  # data-free windows are sampled: made once, so that every rank has the same
            made = calibration_samples(model, tokenizer, run.calib, run.samples, run.seqlen, device)
        samples, source = ranks.share(made, 0)
        if weights is not None and run.calib is None:
            weights.release_layers()
        if checkpoints is not None:
            checkpoints.save_samples(samples, source)
    description = f"{source}, {samples.shape[0]} x {samples.shape[1]} tokens"
    if method.statistic == "hessian" and config.method.sink_weight != 1:
        description += f", first token of each window x{config.method.sink_weight:g} in GPTQ's Hessian"
    batch = max(1, run.calib_batch_tokens // samples.shape[1])
    layers = model.get_submodule(layout.layers)
    return capture_layer_inputs(model, layers, ranks.shard(samples), device, batch), description, samples


def check_ranks(method: Method, size: int) -> None:
    """What cannot be spread across several processes (torchrun) is refused before anything is read."""
    if size > 1 and (method.searches or method.whole_model or method.options.tune_steps):
        raise LlmqError(f"--method {method.name}{' --tune-steps' * bool(method.options.tune_steps)} searches or trains on "
                        "the calibration windows as a whole, which is not shared across processes yet; run it in one "
                        "process (without --nproc or torchrun)")


def method_and_target(config: QuantizeConfig) -> tuple[Method, Target]:
    """The run's method and target, checked against each other and the flags (nothing is loaded)."""
    config.check()
    name = config.method.name or default_method(config)
    if config.method.smoothquant is not None and "smoothquant" not in name.split("+"):
        name = f"smoothquant+{name}"  # --smoothquant ALPHA: the transform, then the run's method
    method = build_method(name, config.method)
    method.check(config)
    if not method.ternary:
        unused = config.changed("method", "ternary_scale", "qat_steps", "qat_lr", "qat_batch", "qat_seqlen")
        if unused:
            raise LlmqError(f"{', '.join(unused)} apply to --method bitnet only; drop them")
    target = build_target(config, method)
    imatrix_flags = config.changed("target", "imatrix", "save_imatrix")
    if imatrix_flags and target.name != "gguf":
        raise LlmqError(f"{', '.join(imatrix_flags)} read or write llama.cpp's importance matrix: they apply to "
                        "--format gguf only")
    if config.target.kv_cache and (target.name != "compressed-tensors" or config.scheme.is_cast):
        raise LlmqError("--kv-cache fp8 writes compressed-tensors' kv_cache_scheme beside quantized weights; for GGUF, "
                        "llama.cpp quantizes its cache at run time (llama-cli -ctk q8_0 -ctv q8_0): drop --kv-cache")
    size_flags = config.changed("target", "target_bpw", "target_size")
    if size_flags and target.name != "gguf":
        raise LlmqError(f"{', '.join(size_flags)} choose a GGUF type per tensor: add --format gguf (compressed-tensors "
                        "outputs take one --bits for every Linear)")
    scheme = config.scheme
    if config.method.tune_steps and (target.name != "compressed-tensors" or scheme.weight_type != "int"
                                     or scheme.act_bits is not None):
        what = f"{scheme.weight_type} weights" + (f" with {scheme.act_bits}-bit inputs" if scheme.act_bits else "")
        raise LlmqError(f"--tune-steps trains the scales of weight-only integer grids (compressed-tensors --bits 2-8), "
                        f"not {target.name} {what}; drop --tune-steps")
    return method, target


def recipe_model(model: str | None) -> str | None:
    """The model a recipe names, so that `llmq quantize --recipe` can repeat the run without one: a hub id as given;
    None for the embedded default and for a local directory (a path of this machine is never recorded)."""
    if model is None or model == EMBEDDED_DEFAULT or Path(model).expanduser().exists():
        return None
    return model


def default_out(model: str | None, config: QuantizeConfig) -> str:
    """The output name `llmq quantize` uses when no --out is given."""
    base = Path(model.rstrip("/")).name if model else EMBEDDED_BASE_ID.rpartition("/")[2]
    return method_and_target(config)[1].default_out(base)


def without_ignored(linears: dict, patterns: tuple[str, ...]) -> dict:
    """The Linears --ignore does not name; says how many it leaves unquantized, and which pattern names none."""
    if not patterns or not linears:
        return linears
    ignored = [name for name in linears if is_ignored(name, patterns)]
    for pattern in patterns:
        if not any(is_ignored(name, (pattern,)) for name in linears):
            log.info(f"llmq: --ignore {pattern} names no Linear of this model (they are named like {next(iter(linears))})")
    if ignored:
        log.info(f"llmq: --ignore leaves {len(ignored)} Linears unquantized (first: {ignored[0]})")
    kept = set(linears) - set(ignored)
    return {name: linear for name, linear in linears.items() if name in kept}


def quantize(model: str | None, out: str | Path, config: QuantizeConfig | None = None,
             overwrite: bool = False, trust_remote_code: bool = False) -> QuantizeResult:
    """Quantize `model` (hub id, local directory, or None for the embedded default) into `out` (a directory, or a
    .gguf file with `format="gguf"`), as `config` says (default: GPTQ, 4-bit groups, compressed-tensors).

    Refuses bad input in one line (LlmqError) before any heavy work; writes under a temporary name renamed when
    complete; an interrupted run resumes from its last finished layer when called again with the same settings.
    `overwrite` replaces an earlier llmq output at `out`; `trust_remote_code` lets a model's own code run."""
    if not str(out).strip():  # Path("") is "." (the current directory): refused, never written into
        raise LlmqError("--out is empty; name the output, or leave --out out for a name made from the model's")
    config = config or QuantizeConfig()
    local = Path(model).expanduser() if model else None
    unknown = has_no_model_class(local) if local is not None and local.is_dir() else None
    if config.run.model_free and (local is None or not local.is_dir()):
        raise LlmqError("--model-free reads a local checkpoint directory's safetensors; name the directory")
    if config.run.model_free or unknown:
        why = "--model-free" if config.run.model_free else f"transformers has no class for model_type {unknown!r}"
        check_model_free(config, why)
        if unknown:
            log.info(f"llmq: {why}: quantizing it model-free (each weight rounded from the safetensors)")
        done = quantize_model_free(str(local) if local is not None else "", out, config, overwrite)
        return QuantizeResult(Path(out), done.size_before, done.size_after, done.seconds, 0.0,
                              "none (model-free round-to-nearest)", {"model-free": done.seconds},
                              done.quantized_fraction)
    method, target = method_and_target(config)
    if config.run.calib is not None:
        check_calib_source(config.run.calib)
    device = ranks.join(resolve_device(config.run.device))
    check_ranks(method, ranks.world()[1])
    if not ranks.is_main():
        log.quiet = True  # rank 0 reports for all
    ranks.check_threads()
    out = Path(out)
    target.check_output(out, overwrite, inputs=(local,) if local is not None and local.exists() else ())
    started = time.perf_counter()
    stage_clock.reset()

    with stage_clock("load"):
        dtype = CAST_TYPES[config.scheme.weight_type] if config.scheme.is_cast else resolve_dtype(config.run.dtype)
        hf_model, tokenizer, model_id = load_model(model, dtype, trust_remote_code,
                                                   check_config=check_config,
                                                   lazy=target.lazy_layers and not method.whole_model
                                                   and not config.method.tune_steps)
        weights = lazy_weights(hf_model)
        if weights is not None:
            weights.load_globals()
    with stage_clock("discovery"):
        layout = decoder_layout(hf_model, device, folds=method.folds)
    discovered = without_ignored(quantizable_linears(hf_model, layout), config.target.ignore)
    linears = target.quantizable(hf_model, discovered)
    layout = layout.only(linears)
    target.check_model(hf_model, linears)
    if config.target.kv_cache:  # each layer's k_scale / v_scale, observed on the calibration windows
        add_kv_scales(hf_model, hf_model.get_submodule(layout.layers))
    size_before = tensor_bytes(hf_model)
    storage_dtype = hf_model.dtype  # scales are stored in it, whatever a whole-model step computes in
    calibrated = (method.needs_data or config.scheme.static_inputs or config.method.tune_steps > 0
                  or (config.run.calib is not None and target.weighted) or target.sizes_tensors
                  or config.target.kv_cache is not None)

    # with several ranks, rank 0 alone stages and writes the output; every rank checkpoints its own layers' inputs
    with target.staging(out, overwrite) if ranks.is_main() else contextlib.nullcontext() as stage:
        with stage_clock("whole-model step"):
            notes = method.prepare_model(hf_model, ModelContext(tokenizer, device, config, list(linears),
                                                                stage.artifact if stage else None))
        checkpoints = None
        # a whole-model step that trains (ternary-aware fine-tuning) is not checkpointed: such runs start over
        if notes is None or method.repeatable_model_step:
            settings = dataclasses.asdict(config)
            if ranks.world()[1] > 1:  # each rank's checkpointed inputs are its share of the windows
                settings["ranks"] = ranks.world()[1]
            fingerprint = run_fingerprint(model, settings, config.run.calib, device)
            checkpoints = LayerCheckpoints.open(out, fingerprint, len(hf_model.get_submodule(layout.layers)))
        with checkpoints.guard() if checkpoints is not None else contextlib.nullcontext():
            inputs, calibration = None, notes or "none (round-to-nearest needs no data)"
            if config.target.imatrix is not None:
                calibration = f"importance matrix {Path(config.target.imatrix).name} (read, not collected)"
            samples = None
            if calibrated:
                with stage_clock("calibration inputs"):
                    inputs, calibration, samples = _calibrate(hf_model, tokenizer, layout, method, config, device,
                                                              checkpoints)
                calibration = f"{notes}; {calibration}" if notes else calibration
            if target.sizes_tensors:  # --target-bpw / --target-size: each tensor's type from its sensitivity
                with stage_clock("sizing"):
                    target.size_tensors(hf_model, tokenizer, samples, device, linears)
            if weights is not None:  # the layers need none of them; the writer reads them from disk
                weights.release_globals()
            plan = target.plan(hf_model, linears, storage_dtype, calibrated)
            coverage = decoder_coverage(hf_model, layout, set(discovered), set(linears), plan)
            if (note := coverage.note()) is not None:
                log.info(note)
            errors = []
            experts = ExpertPolicy(config.run.route_all_experts, config.run.expert_min_tokens)
            teacher = frozen_teacher(hf_model) if config.method.tune_steps else None
            quantized = quantize_layers(hf_model, layout, method, plan, inputs, device, target.search_scheme,
                                        on_layer=lambda report: errors.append(report.relative_weight_error),
                                        experts=experts, checkpoints=checkpoints,
                                        statistics=getattr(plan, "statistics", None))
            if experts.fell_back:
                calibration += (f"; {experts.fell_back} of {experts.experts} expert Linear groups were routed fewer than "
                                f"{experts.min_tokens} calibration tokens and were calibrated on every token instead")
            if teacher is not None:
                inputs = None  # the layers' calibration activations: not needed any more
                with stage_clock("scale tuning"):
                    tuned = tune_scales(hf_model, teacher, quantized, samples, TuneSettings(
                        config.method.tune_steps, config.method.tune_lr, config.method.tune_batch), device)
                calibration += f"; {tuned}"
                del teacher
            error = sum(errors) / max(len(errors), 1)
            report = RunReport(out, model_id, method.name, calibration, size_before, time.perf_counter() - started,
                               device.type, str(storage_dtype).removeprefix("torch."), error,
                               None if samples is None else hashlib.sha256(samples.numpy().tobytes()).hexdigest(),
                               recipe_model(model), base_license(model),
                               None if samples is None else tuple(samples.shape))
            target.report = report  # what the output's recipe (llmq.json) records
            if config.target.kv_cache:  # the scales are observed: the model's own attention again
                hf_model.set_attn_implementation("sdpa")
            size_after = 0
            if ranks.is_main():
                log.info(f"llmq: writing {out} ({target.describe()})")
                with stage_clock("write"):
                    size_after = target.write(stage.path, hf_model, tokenizer, plan, quantized, report)
    ranks.barrier()  # every rank keeps its checkpoints until rank 0's output is in place
    if checkpoints is not None:  # the output is in place: nothing left to resume
        checkpoints.remove()

    seconds = time.perf_counter() - started
    log.info(f"llmq: wrote {out} ({target.describe()}, {method.name}; calibration: {calibration}): "
             f"{human_size(size_before)} -> {human_size(size_after)} ({size_before / max(size_after, 1):.2f}x smaller), "
             f"{seconds:.0f} s, mean relative weight error {error:.2e}, {coverage.fraction:.1%} of the decoder's matrix "
             "weights stored quantized")
    log.info(f"llmq: time by stage: {stage_clock.summary()}")
    return QuantizeResult(out, size_before, size_after, seconds, error, calibration, dict(stage_clock.seconds),
                          coverage.fraction)
