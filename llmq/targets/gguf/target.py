"""`--format gguf`: one llama.cpp file, each tensor in the type llama.cpp's mixture rules give it.

Plan: every tensor's GGML type (llmq/targets/gguf/mixtures.py); the decoder Linears become parts of the
harness on that type's grid (a k-quant grid, a float type kept as is, or for ternary methods the ternary grid
held exactly in TQ1_0 / TQ2_0 / the Q4_0 fallback). Write: those results, every other tensor encoded plainly
by its planned type, metadata and tokenizer (llmq/targets/gguf/writer.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

from llmq.calib.harness import Part
from llmq.calib.lazy import tensor_of
from llmq.core import log
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Grid, Quantized
from llmq.core.scheme import QuantScheme
from llmq.methods.grids.kquant import FLOAT_TYPES, BlockTensor, FloatGrid, FloatTensor, KQuantGrid
from llmq.methods.grids.kquant_search import QUANTIZED_TYPES, encode_bytes
from llmq.methods.grids.ternary import ProjectedGrid, TernaryGrid, ternary_scheme
from llmq.targets.atomic import OutputKind, atomic_output_file, check_output
from llmq.targets.base import RunReport, Stage, Target
from llmq.targets.gguf.imatrix import Imatrix, imatrix_entries, read_imatrix, write_imatrix
from llmq.targets.gguf.mixtures import (
    IMATRIX_MIXTURES,
    MIXTURES,
    NEEDS_IMATRIX,
    Mixture,
    get_mixture,
    is_quantizable,
    plan_types,
)
from llmq.targets.gguf.sizing import SizedTypes, SizeGoal, size_goal, size_types
from llmq.targets.gguf.writer import (
    EncodedTensor,
    SpilledTensors,
    assemble_tensors,
    encode_float,
    expert_count,
    expert_slot,
    exported_tensors,
    gguf_arch,
    gguf_names,
    language_config,
    prepare_float,
    row_permutation,
    stacked_shapes,
    write_gguf,
)

# the integer grid AWQ searches on, per mixture's main type: same bits (4 for the 5-bit types), 32-wide asymmetric
_SEARCH_BITS = {T.Q2_K: 2, T.Q3_K: 3, T.Q4_K: 4, T.Q5_K: 4, T.Q4_0: 4, T.Q6_K: 8, T.Q8_0: 8, T.Q4_1: 4, T.Q5_0: 4,
                T.Q5_1: 4, T.IQ4_NL: 4, T.IQ4_XS: 4, T.MXFP4: 4, T.IQ3_S: 3, T.IQ3_XXS: 3, T.IQ2_S: 2, T.IQ2_XS: 2,
                T.IQ2_XXS: 2, T.IQ1_M: 2, T.IQ1_S: 2}
TQ_BLOCK = 256  # weights per TQ1_0 / TQ2_0 block: one scale each


def _slot(linear: str) -> int | None:
    """An expert Linear's index among its layer's experts (its row of an imatrix's expert tensor), else None."""
    slot = expert_slot(f"{linear}.weight")
    return None if slot is None else slot[1]


def permute_rows(config, gguf_name: str, data):
    """Rows of an encoded tensor in the order llama.cpp's graph wants (rows are whole blocks, so this is exact)."""
    perm = row_permutation(config, gguf_name, data.shape[0])
    return data if perm is None else data[perm.numpy()]


class GGUFPlan:
    """Every parameter's GGUF name and type, and the grid of each decoder Linear (one part per Linear).
    `importance`: Linear name -> its input importance read from an imatrix file (--imatrix); `statistics`: a dict
    the harness fills with each Linear's calibration statistics when they are to be saved (--save-imatrix)."""

    def __init__(self, names: dict[str, str], types: dict[str, T], grid_for_type,
                 importance: dict[str, torch.Tensor] | None = None, save_statistics: bool = False):
        self.names, self.types, self._grid_for_type = names, types, grid_for_type
        self.importance = importance or {}
        self.statistics: dict[str, tuple[torch.Tensor, float]] | None = {} if save_statistics else None

    def type_of(self, module: str) -> T:
        return self.types[self.names[f"{module}.weight"]]

    def __call__(self, linears: list[str]) -> list[Part]:
        # each Linear its own part: q, k and v may get different types
        return [Part((name,), self._grid_for_type(self.type_of(name), self.importance.get(name))) for name in linears]


def tensor_plan(model, mixture, has_imatrix: bool) -> tuple[dict[str, str], dict[str, T]]:
    """(HF parameter name -> GGUF name, GGUF name -> type) for every parameter of the model."""
    config = language_config(model.config)
    names = gguf_names(model)
    shapes = stacked_shapes(model, names)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tied = "lm_head.weight" not in dict(model.named_parameters())
    types = plan_types(mixture, shapes, config.num_hidden_layers, config.num_attention_heads // kv_heads, tied,
                       has_imatrix, expert_count(shapes))
    return names, types


def _encode_one(model, hf_name: str, param, gguf_name: str, qtype: T, quantized: dict[str, Quantized]) -> EncodedTensor:
    """One parameter as GGUF data: the harness's result where given, else encoded plainly by the plan."""
    module = hf_name.removesuffix(".weight")
    if module in quantized and hf_name.endswith(".weight"):
        result = quantized[module]
        if isinstance(result, BlockTensor):
            encoded = EncodedTensor(result.qtype, result.to_bytes())
        elif isinstance(result, FloatTensor):
            encoded = encode_float(result.values, result.qtype)
        else:
            raise TypeError(f"GGUF cannot store {type(result).__name__} ({module})")
        return EncodedTensor(encoded.qtype, permute_rows(language_config(model.config), gguf_name, encoded.data))
    values = prepare_float(language_config(model.config), gguf_name, tensor_of(model, hf_name, param))
    return EncodedTensor(qtype, encode_bytes(values, qtype)) if qtype in QUANTIZED_TYPES else encode_float(values, qtype)


def encode_tensors(model, names: dict[str, str], types: dict[str, T], quantized: Mapping[str, Quantized],
                   spill: SpilledTensors | None = None) -> Mapping[str, EncodedTensor]:
    """Every exported tensor as a GGUF tensor; the experts of a layer stacked into one 3-D tensor per projection.

    Made a decoder layer at a time (`blk.<n>.` tensors in a run): with `spill`, each layer's tensors go to its
    scratch file before the next layer's are made, and `spill` is returned."""
    tensors = spill if spill is not None else {}
    in_order = log.progress(exported_tensors(model), desc="encode tensors", unit="tensor")
    for _, run in itertools.groupby(in_order, key=lambda item: _block_of(names[item[0]])):
        encoded = assemble_tensors(
            (hf_name, names[hf_name], _encode_one(model, hf_name, param, names[hf_name], types[names[hf_name]],
                                                  quantized))
            for hf_name, param in run)
        for name, tensor in encoded.items():
            if spill is not None:
                spill.add(name, tensor)
            else:
                tensors[name] = tensor
    return tensors


def _block_of(gguf_name: str) -> str | None:
    """The decoder layer a GGUF tensor belongs to (`blk.<n>.`), None outside the layers."""
    return gguf_name.split(".", 2)[1] if gguf_name.startswith("blk.") else None


class GGUFTarget(Target):
    name = "gguf"
    default_method = "rtn"  # plain k-quant search, as llama-quantize (imatrix-weighted with --calib)
    lazy_layers = True

    def __init__(self, config, method):
        super().__init__(config, method)
        self.goal: SizeGoal | None = size_goal(config.target.target_bpw, config.target.target_size)
        self.sized: SizedTypes | None = None  # the types size_tensors chose
        self.sizes_tensors = self.goal is not None
        self.mixture = get_mixture(config.target.gguf_type or ("TQ2_0" if method.ternary else "Q4_K_M"))
        # ternary weights are held exactly (no weighting to do); a k-quant search weighs by the imatrix
        self.weighted = not self.mixture.ternary
        self.imatrix: Imatrix | None = None  # --imatrix, read by check()
        self._imported: dict[str, torch.Tensor | None] = {}  # its importance per Linear, matched by check_model()

    def check(self) -> None:
        mixture, method, options = self.mixture, self.method, self.config.method
        self._check_size_flags()
        self._check_imatrix_flags()
        if mixture.name in IMATRIX_MIXTURES and not (self.config.run.calib or self.imatrix or method.needs_data):
            raise LlmqError(f"--type {mixture.name} puts tensors in {', '.join(t.name for t in NEEDS_IMATRIX)}, which "
                            "llama.cpp makes only with an importance matrix (so does llmq); add --calib FILE or "
                            "--imatrix FILE")
        if self.config.target.ignore:
            raise LlmqError("--ignore leaves Linears unquantized in compressed-tensors outputs; a GGUF file's tensor "
                            "types come from its --type mixture: drop --ignore or use --format compressed-tensors")
        if mixture.ternary and not method.ternary:
            raise LlmqError(f"--type {mixture.name} holds ternary weights; quantize with --method bitnet")
        if method.ternary and not mixture.ternary:
            raise LlmqError(f"--method {method.name} writes GGUF types TQ1_0 or TQ2_0, not {mixture.name}; "
                            "pass --type TQ2_0")
        if method.ternary and options.ternary_scale == "group" and self.config.scheme.group_size % TQ_BLOCK:
            raise LlmqError(f"GGUF TQ blocks hold one scale per {TQ_BLOCK} weights, so --group-size "
                            f"{self.config.scheme.group_size} would not survive the export; use --group-size "
                            f"{TQ_BLOCK} (or a multiple) or --ternary-scale channel")
        scheme = self.config.scheme
        if scheme.is_cast:
            raise LlmqError(f"GGUF's 16-bit files are --type {'F16' if scheme.weight_type == 'float16' else 'BF16'}; "
                            "drop --scheme")
        if scheme.microscaling:
            raise LlmqError(f"--scheme {scheme.name} is a compressed-tensors scheme; GGUF's own FP4 type is MXFP4 "
                            "(--type MXFP4_MOE, for a mixture-of-experts model's experts): drop --scheme, or use "
                            "--format compressed-tensors")
        if scheme.act_bits is not None or scheme.weight_type != "int":
            raise LlmqError(f"GGUF holds neither FP8 weights nor quantized activations ({scheme.name}); its 8-bit "
                            "type is weight-only --type Q8_0, or use --format compressed-tensors")
        unused = self.config.changed("scheme") + self.config.changed("method", "mse")
        if method.ternary and options.ternary_scale == "group":
            unused = [flag for flag in unused if flag != "--group-size"]  # the ternary group's width
        if unused:
            raise LlmqError(f"{', '.join(unused)} set compressed-tensors' integer grid and do not apply to GGUF, whose "
                            "types come from --type; drop them")
        if method.searches and self.search_scheme is None:
            raise LlmqError(f"--method {method.name} cannot write GGUF {mixture.name}: its search needs an integer grid "
                            "and that type has none; use a quantized --type such as Q4_K_M")

    def _check_imatrix_flags(self) -> None:
        read, save, method = self.config.target.imatrix, self.config.target.save_imatrix, self.method
        if read is not None:
            if method.name != "rtn":
                raise LlmqError(f"--imatrix weighs round-to-nearest by llama.cpp's statistics; --method {method.name} "
                                "needs the calibration inputs themselves: pass --calib FILE instead of --imatrix")
            if self.config.run.calib is not None:
                raise LlmqError("--imatrix and --calib both give the rounding its statistics; pass one of them")
            if save is not None:
                raise LlmqError("--save-imatrix writes the statistics this run collects, and with --imatrix it "
                                "collects none; drop --save-imatrix (the file you pass already is one)")
            self.imatrix = read_imatrix(read)
        if save is not None:
            if method.name not in ("rtn", "gptq"):
                raise LlmqError(f"--save-imatrix keeps the statistics of the model's own inputs; --method "
                                f"{method.name} transforms them first. Use --method rtn or gptq with --save-imatrix")
            if method.name == "rtn" and self.config.run.calib is None:
                raise LlmqError("--save-imatrix writes the statistics a calibrated run collects: add --calib FILE")

    def _check_size_flags(self) -> None:
        if self.goal is None:
            return
        flag = self.goal.flag
        if self.config.target.gguf_type is not None:
            raise LlmqError(f"{flag} chooses every tensor's type itself; drop --type {self.config.target.gguf_type} "
                            "(or drop the size target to use that mixture)")
        if self.method.ternary:
            raise LlmqError(f"{flag} chooses among llama.cpp's k-quant and i-quant types; --method "
                            f"{self.method.name} writes ternary types: drop {flag}")
        if self.config.target.imatrix is not None:
            raise LlmqError(f"{flag} measures each tensor's sensitivity with gradients on calibration text, which an "
                            "importance matrix does not hold; pass --calib FILE instead of --imatrix")

    @property
    def search_scheme(self) -> QuantScheme | None:
        bits = _SEARCH_BITS.get(self.mixture.default)
        return None if bits is None else QuantScheme(bits, 32, symmetric=False)

    def check_model(self, model, linears) -> None:
        gguf_arch(language_config(model.config))
        names = gguf_names(model)  # every tensor has a llama.cpp name, or a one-line error now
        if self.goal is not None:
            shapes = stacked_shapes(model, names)
            if expert_count(shapes):
                raise LlmqError(f"{self.goal.flag} sizes dense models' tensors; for this mixture-of-experts model use "
                                "a --type mixture (MXFP4_MOE, Q4_K_M, ...)")
            self.goal.check_range(shapes)  # reachable at all, before any data is read
        if self.imatrix is not None:  # every entry fits its Linear, or a one-line error now
            self._imported = {name: self.imatrix.importance(names[f"{name}.weight"], _slot(name), linear.in_features)
                              for name, linear in linears.items()}
            missing = [name for name, importance in self._imported.items() if importance is None]
            if missing:
                log.info(f"llmq: --imatrix has no entry for {len(missing)} of {len(linears)} Linears (first: "
                         f"{names[missing[0] + '.weight']}); they are rounded without importance, as llama-quantize does")
        if self.method.ternary:
            scheme = ternary_scheme(self.config)
            for name, linear in linears.items():
                scheme.check(name, linear.in_features)

    @property
    def output_kind(self) -> OutputKind:
        return OutputKind(directory=False, side_files=self.method.side_files)

    def check_output(self, out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
        if out.suffix != ".gguf":
            raise LlmqError(f"--format gguf writes one file; name it *.gguf (not --out {out})")
        super().check_output(out, overwrite, inputs)
        save = self.config.target.save_imatrix
        if save is not None:
            if Path(save).resolve() == out.resolve():
                raise LlmqError(f"--save-imatrix {save} is the --out file; give the importance matrix its own name "
                                "(model.imatrix.gguf)")
            check_output(Path(save), overwrite, OutputKind(directory=False), inputs)

    @contextlib.contextmanager
    def staging(self, out: Path, overwrite: bool):
        """A staged file beside `out`; side outputs (a loss curve) go beside it as `<stem>.<name>` when complete."""
        with atomic_output_file(out, overwrite, self.method.side_files) as (tmp, stage):
            yield Stage(tmp, lambda name: stage / name)

    def size_tensors(self, model, tokenizer, samples, device, linears) -> None:
        """--target-bpw / --target-size: each tensor's type from its measured sensitivity (llmq/targets/gguf/sizing.py);
        general.file_type names the mixture of the type most of its bytes are in."""
        self.sized = size_types(model, tokenizer, samples, set(linears), self.goal)
        main = self.sized.main_type()
        self.mixture = next((m for m in MIXTURES.values() if m.default == main), self.mixture)
        self.mixture = Mixture(self.goal.label, main, self.mixture.file_type)

    def _types(self, model, calibrated: bool) -> tuple[dict[str, str], dict[str, T]]:
        if self.sized is None:
            return tensor_plan(model, self.mixture, has_imatrix=calibrated or self.imatrix is not None)
        names, sized = gguf_names(model), self.sized.types
        # a tensor with no candidate (rows not a multiple of 32) stays F16, as llama.cpp's fallback leaves it
        types = {name: sized.get(name, T.F16 if is_quantizable(name, shape) else T.F32)
                 for name, shape in stacked_shapes(model, names).items()}
        return names, types

    def recipe_fields(self, report: RunReport) -> dict:
        fields = super().recipe_fields(report)
        if self.sized is not None:  # the model card of a sized file: what each tensor got, and why
            fields["sizing"] = self.sized.card()
        return fields

    def plan(self, model, linears, storage_dtype: torch.dtype, calibrated: bool) -> GGUFPlan:
        names, types = self._types(model, calibrated)
        lacking = [name for name, importance in self._imported.items()
                   if importance is None and types[names[f"{name}.weight"]] in NEEDS_IMATRIX]
        if lacking:  # llama-quantize refuses these too ("missing importance matrix ... very low-bit quantization")
            first = names[f"{lacking[0]}.weight"]
            raise LlmqError(f"--imatrix has no entry for {first} ({len(lacking)} tensors in all), which --type "
                            f"{self.mixture.name} makes {types[first].name}: a type llama.cpp makes only with "
                            "importance; pass an importance matrix made for this model, or --calib FILE")
        ternary = TernaryGrid(ternary_scheme(self.config), storage_dtype) if self.method.ternary else None

        def grid_for_type(qtype: T, importance: torch.Tensor | None = None) -> Grid:
            grid = FloatGrid(qtype) if qtype in FLOAT_TYPES else KQuantGrid(qtype, importance)
            return grid if ternary is None else ProjectedGrid(ternary, grid)

        imported = {name: importance for name, importance in self._imported.items() if importance is not None}
        return GGUFPlan(names, types, grid_for_type, imported, self.config.target.save_imatrix is not None)

    def write(self, path, model, tokenizer, plan: GGUFPlan, quantized, report: RunReport) -> int:
        left_out = [name for name, _ in model.named_parameters() if name not in plan.names]
        if left_out:  # an image-text model's vision tower and projector
            log.info(f"llmq: the GGUF file holds the language model; {len(left_out)} tensors of the vision tower and "
                     "projector are not written (llama.cpp reads them from a separate mmproj file, which llmq does "
                     "not write)")
        spill = SpilledTensors(Path(f"{path}.tensors"))  # beside the staged file, removed either way
        try:
            tensors = encode_tensors(model, plan.names, plan.types, quantized, spill)
            # general.name is the model's own name: llama.cpp switches tokenizer rules on names (one containing
            # "phi3" expects Phi-3's special tokens), so an output file's name must not leak into it
            size = write_gguf(path, model, tokenizer, tensors, self.mixture.file_type,
                              name=report.base_model.rstrip("/").rpartition("/")[2],
                              recipe=json.dumps(self.recipe_fields(report)))
        finally:
            spill.remove()
        if plan.statistics is not None:
            self._save_imatrix(plan, report)
        return size

    def _save_imatrix(self, plan: GGUFPlan, report: RunReport) -> None:
        """--save-imatrix: the statistics the harness collected, in llama.cpp's layout (written complete, then renamed)."""
        save = Path(self.config.target.save_imatrix)
        entries = imatrix_entries(plan.statistics, plan.names, expert_slot)
        if not entries:
            raise LlmqError(f"--save-imatrix: this run collected no input statistics to write ({report.calibration})")
        windows, tokens = report.windows or (0, 0)
        write_imatrix(save, entries, report.calibration, windows, tokens)
        log.info(f"llmq: wrote {save}: llama.cpp importance matrix of {len(entries)} tensors "
                 f"({'legacy .dat' if save.suffix == '.dat' else 'GGUF'}), for llama-quantize --imatrix")

    def describe(self) -> str:
        return f"GGUF {self.mixture.name}" if self.goal is None else f"GGUF sized to {self.goal.label}"

    def default_out(self, base: str) -> str:
        name = self.mixture.name if self.goal is None else self.goal.label
        return f"{base}-{name}{'-gptq' if self.method.name == 'gptq' else ''}.gguf"
