"""`QuantizeConfig`: everything `llmq quantize` takes besides the model and the output path, in four groups.

- scheme: the integer grid (bits, group size, symmetric), llmq/core/scheme.py;
- method: which method and the knobs methods read;
- target: which output format (and GGUF mixture);
- run: calibration data, device, dtype.

These dataclasses are the one source of defaults: the CLI builds its flags from them (llmq/cli.py), and
`QuantizeConfig.of(bits=3, method="awq")` takes the same names flat.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from llmq.core.errors import LlmqError
from llmq.core.scheme import QuantScheme, scheme_with_preset

# Calibration windows x tokens when --samples / --seqlen are not given: from text, GPTQ's usual 128 x 512; data-free
# (text the model writes itself, when no --calib is given and no dataset can be had), fewer and shorter, since
# generating them dominates a small model's run (scripts/first_run_options.py measured it: docs/guide/first-run.md).
TEXT_WINDOWS = (128, 512)
DATA_FREE_WINDOWS = (32, 256)

GROUP_FITS = ("sweep", "upfront")  # when GPTQ fits a group's scale: as its sweep reaches it, or before the sweep


@dataclass
class MethodOptions:
    """The method (a registry name of llmq/methods, `a+b` composes) and the knobs each method reads."""

    name: str | None = None  # None: the target's default (gptq; rtn for gguf, as llama-quantize; bitnet for bitnet)
    act_order: bool = True  # GPTQ: static-group act-order; free for loaders, much better on outlier channels
    group_fit: str = "sweep"  # GPTQ: each group's scale fitted when the sweep reaches it | "upfront" (original weights)
    mse: bool = False  # search each group's clipping range (integer grid)
    damp: float = 0.01  # GPTQ: damping as a fraction of the mean Hessian diagonal
    sink_weight: float = 16.0  # GPTQ: weight of each calibration window's first token (llmq/calib/statistics.py)
    block_size: int = 128  # GPTQ: columns per lazy-update block
    tune_steps: int = 0  # after rounding: steps of end-to-end scale tuning (llmq/methods/tune.py); 0: none
    tune_lr: float = 1e-4
    tune_batch: int = 2  # calibration windows per tuning step
    smoothquant: float | None = None  # SmoothQuant's migration strength alpha; set: smoothquant before the method
    ternary_scale: str = "tensor"  # bitnet: absmean scale per tensor | channel | group
    qat_steps: int = 0  # bitnet: steps of ternary-aware fine-tuning (0: none)
    qat_lr: float = 5e-4
    qat_batch: int = 4
    qat_seqlen: int = 256


@dataclass
class TargetOptions:
    """The output: compressed-tensors (packed safetensors), gguf (one llama.cpp file) or bitnet (transformers'
    ternary layout); `auto` picks bitnet for ternary methods, compressed-tensors otherwise."""

    format: str = "auto"
    gguf_type: str | None = None  # the GGUF mixture; None: Q4_K_M, or TQ2_0 for ternary methods
    strict_groups: bool = False  # refuse a Linear the group size does not divide (default: a smaller group for it)
    ignore: tuple[str, ...] = ()  # Linears left unquantized (compressed-tensors): names, or "re:" expressions
    imatrix: str | None = None  # GGUF: llama.cpp's importance matrix file, read instead of calibrating
    save_imatrix: str | None = None  # GGUF: write the run's activation statistics as llama.cpp's imatrix file
    target_bpw: float | None = None  # GGUF: a type per tensor, chosen so the file has this many bits per weight
    target_size: str | None = None  # GGUF: ... so the file has this size ("4.2GB", "800MB", "3.5GiB")
    kv_cache: str | None = None  # "fp8": per-layer FP8 scales of the keys and values (compressed-tensors)

    def __post_init__(self):
        self.ignore = tuple(self.ignore or ())  # from a recipe's JSON list, or an unset CLI flag


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether --ignore names this module: a pattern is a module name (`lm_head`, or a trailing part of one:
    `mlp.down_proj` names every layer's), or `re:` and a regular expression matched from the start of the full
    name (llm-compressor's convention: `re:.*self_attn.*`)."""
    return any(re.match(pattern[3:], name) if pattern.startswith("re:")
               else (name == pattern or name.endswith("." + pattern)) for pattern in patterns)


@dataclass
class RunOptions:
    """Calibration data and where the work runs."""

    calib: str | None = None  # .txt/.jsonl path or a dataset name; None: wikitext2, else data-free
    samples: int | None = None  # calibration windows; None: TEXT_WINDOWS[0] from text, DATA_FREE_WINDOWS[0] data-free
    seqlen: int | None = None  # tokens per window; None: TEXT_WINDOWS[1] / DATA_FREE_WINDOWS[1]
    calib_batch_tokens: int = 4096  # tokens per forward pass during calibration
    device: str = "auto"  # cuda when available, else cpu
    dtype: str = "auto"  # compute/storage dtype of the unquantized parts; auto: the checkpoint's
    route_all_experts: bool = False  # MoE: every expert's statistics from every calibration token
    expert_min_tokens: int = 64  # MoE: an expert routed fewer tokens is calibrated on every token instead
    model_free: bool = False  # round each weight from the safetensors, no model built (data-free schemes only)

    def windows(self) -> int:
        """The calibration windows a run asks for: --samples, else the fewest of the defaults it may take (without
        --calib the run calibrates on wikitext2 when reachable, else on data-free windows)."""
        return self.samples or (TEXT_WINDOWS[0] if self.calib else min(TEXT_WINDOWS[0], DATA_FREE_WINDOWS[0]))


@dataclass
class QuantizeConfig:
    scheme: QuantScheme = field(default_factory=QuantScheme)
    method: MethodOptions = field(default_factory=MethodOptions)
    target: TargetOptions = field(default_factory=TargetOptions)
    run: RunOptions = field(default_factory=RunOptions)

    # flat names that differ from their field's name
    _ALIASES = {"method": ("method", "name"), "format": ("target", "format"), "gguf_type": ("target", "gguf_type")}

    @classmethod
    def of(cls, **options) -> QuantizeConfig:
        """A config from flat names (`bits`, `method`, `calib`, ...), each going to the group that has it."""
        preset = options.pop("scheme", None)  # a named scheme (llmq/core/scheme.py PRESETS)
        groups = {"scheme": {}, "method": {}, "target": {}, "run": {}}
        fields = {group: {f.name for f in dataclasses.fields(kind)}
                  for group, kind in (("scheme", QuantScheme), ("method", MethodOptions), ("target", TargetOptions),
                                      ("run", RunOptions))}
        for key, value in options.items():
            group, name = cls._ALIASES.get(key, (next((g for g, names in fields.items() if key in names), None), key))
            if group is None:
                raise LlmqError(f"unknown option {key!r}; see `llmq quantize --help` for the options")
            groups[group][name] = value
        scheme = scheme_with_preset(preset, {**dataclasses.asdict(QuantScheme()), **groups["scheme"]})
        return cls(scheme, MethodOptions(**groups["method"]),
                   TargetOptions(**groups["target"]), RunOptions(**groups["run"]))

    @classmethod
    def from_recipe(cls, fields: dict) -> QuantizeConfig:
        """The config a recipe (recipe_config's dict, as llmq.json records it) describes; one line if it is not one."""
        if not isinstance(fields, dict):
            raise LlmqError("the recipe holds no config; pass an llmq.json that llmq 0.2 or later wrote")
        kinds = {"scheme": QuantScheme, "method": MethodOptions, "target": TargetOptions, "run": RunOptions}
        groups = {}
        for group, kind in kinds.items():
            values = fields.get(group, {})
            known = {f.name for f in dataclasses.fields(kind)}
            if not isinstance(values, dict) or set(values) - known:
                unknown = sorted(set(values) - known) if isinstance(values, dict) else [group]
                raise LlmqError(f"the recipe's {group} has fields this llmq does not know ({', '.join(unknown)}); "
                                "use the llmq version that wrote it")
            groups[group] = kind(**values)
        return cls(**groups)

    _FLAGS = {"symmetric": "--sym", "name": "--method", "gguf_type": "--type", "weight_type": "--scheme"}

    def changed(self, group: str, *names: str) -> list[str]:
        """The flags of a group (or of those fields of it) set away from their defaults, as the CLI spells them."""
        values, defaults = getattr(self, group), type(getattr(self, group))()
        fields = names or [f.name for f in dataclasses.fields(values)]
        return [self._FLAGS.get(name, "--" + name.replace("_", "-")) for name in fields
                if getattr(values, name) != getattr(defaults, name)]

    def check(self) -> None:
        """Refuse values that make no sense, before anything is loaded."""
        run, method = self.run, self.method
        if (run.samples is not None and run.samples < 1) or (run.seqlen is not None and run.seqlen < 2):
            raise LlmqError("--samples must be at least 1 and --seqlen at least 2")
        if run.expert_min_tokens < 0:
            raise LlmqError("--expert-min-tokens must be 0 or more")
        cast = {"float16": ("float16", "fp16"), "bfloat16": ("bfloat16", "bf16")}.get(self.scheme.weight_type)
        if cast and run.dtype not in ("auto", *cast):
            raise LlmqError(f"--scheme {cast[1]} casts the model to {cast[0]}; drop --dtype {run.dtype}")
        if not 0 < method.damp < 1:
            raise LlmqError(f"--damp {method.damp} is out of range; use a fraction such as 0.01")
        if method.tune_steps < 0 or method.tune_batch < 1 or not 0 < method.tune_lr < 1:
            raise LlmqError("--tune-steps must be 0 or more, --tune-batch at least 1 and --tune-lr a positive rate "
                            "below 1 (e.g. 1e-4)")
        if method.group_fit not in GROUP_FITS:
            raise LlmqError(f"--group-fit {method.group_fit} is unknown; use one of {', '.join(GROUP_FITS)}")
        for pattern in (p for p in self.target.ignore if p.startswith("re:")):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise LlmqError(f"--ignore {pattern!r} is not a regular expression ({error}); write re:EXPRESSION "
                                "or a module name such as mlp.down_proj") from None
        if not 1 <= method.sink_weight <= 1e4:
            raise LlmqError(f"--sink-weight {method.sink_weight} is out of range; use 1 (off) to a few hundred, e.g. 16")


def recipe_config(config: QuantizeConfig) -> dict:
    """The whole config as plain JSON values, by group: what llmq.json records and QuantizeConfig.from_recipe reads."""
    return {group: dataclasses.asdict(getattr(config, group)) for group in ("scheme", "method", "target", "run")}
