"""What an output format is, as the run skeleton (llmq/run.py) sees it: one object per run with check / plan / write.

    target.check()                      refuse what it cannot do with this method and these flags (nothing loaded)
    target.quantizable(model, linears)  the Linears it can hold quantized
    target.check_model(model, linears)  refuse what it cannot hold in this model (before any heavy work)
    with target.staging(out, overwrite) as stage:      a temporary directory or file, renamed when complete
        plan = target.plan(...)         the Grid of every Linear, grouped into parts (llmq/calib/harness.py)
        ... the harness quantizes ...
        target.write(stage.path, ...)   the weights (and model card) from the quantized results
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmq.calib.harness import Plan
from llmq.core import __version__
from llmq.core.config import QuantizeConfig, recipe_config
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Method, Quantized
from llmq.core.scheme import QuantScheme
from llmq.targets.atomic import OutputKind, atomic_output_dir, check_output, write_marker


@dataclass
class RunReport:
    """What a finished quantization tells the target that writes it (and its model card)."""

    out: Path
    base_model: str  # a hub id, or a local checkpoint's directory name (never a path of this machine)
    method: str
    calibration: str  # where the calibration data came from, or what was done without it
    size_before: int
    seconds: float
    device: str
    dtype: str  # the model's dtype: what the unquantized tensors are kept in
    relative_weight_error: float
    calibration_sha256: str | None = None  # of the calibration windows' token ids; None when no data was used
    model: str | None = None  # the MODEL argument a recipe repeats: a hub id; None for the embedded default or a path
    license: str | None = None  # the base model's license (its card's), inherited by the output's card when known
    windows: tuple[int, int] | None = None  # calibration windows x tokens per window; None when no data was used


@dataclass
class Stage:
    path: Path  # the temporary directory or file the target writes
    artifact: Callable[[str], Path]  # a side output's name -> where it goes (a loss curve)


class Target(ABC):
    name: str = ""
    default_method: str = "gptq"  # what --method means when it is not given
    weighted: bool = False  # its grids weigh their fit by an input importance: --calib then helps round-to-nearest
    lazy_layers: bool = False  # writes from a lazy model (llmq/calib/lazy.py): it reads tensors left on disk itself
    sizes_tensors: bool = False  # chooses each tensor's type from calibration windows first (size_tensors)

    def __init__(self, config: QuantizeConfig, method: Method):
        self.config, self.method = config, method
        self.report: RunReport | None = None  # the finished run's (llmq/run.py sets it): what the recipe records

    def recipe_fields(self, report: RunReport) -> dict:
        """What llmq.json (or a GGUF's llmq.recipe) records: the whole QuantizeConfig, llmq's version, the base model
        and the calibration windows' hash, so that `llmq quantize --recipe` can repeat the run and a reader can
        tell two runs' data apart."""
        return {"written_by": "llmq", "version": __version__, "format": self.name, "method": self.method.name,
                "model": report.model, "base_model": report.base_model,
                "calibration": report.calibration, "calibration_sha256": report.calibration_sha256,
                "config": recipe_config(self.config)}

    def check(self) -> None:
        """Refuse, before anything is loaded, what this target cannot do with the run's method and flags."""

    @property
    def search_scheme(self) -> QuantScheme | None:
        """The integer grid closest to this target's, for methods that fake-quantize many candidates (AWQ)."""
        return None

    def quantizable(self, model: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
        """The Linears this format can hold quantized (the rest stay in the model's dtype)."""
        return linears

    def check_model(self, model: nn.Module, linears: dict[str, nn.Linear]) -> None:
        """Refuse, before any heavy work, a model this target cannot hold."""

    def size_tensors(self, model: nn.Module, tokenizer, samples: torch.Tensor, device: torch.device,
                     linears: dict[str, nn.Linear]) -> None:
        """Before the plan, when `sizes_tensors`: measure what choosing each tensor's type needs (GGUF size targets)."""

    @property
    def output_kind(self) -> OutputKind:
        return OutputKind(directory=True)

    def check_output(self, out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
        """Refuse, before any work, an output that cannot or must not be written (llmq/targets/atomic.py)."""
        if self.output_kind.directory and out.suffix == ".gguf":
            raise LlmqError(f"--out {out} names a GGUF file, but --format {self.name} writes a directory; pass "
                            "--format gguf or choose another --out")
        check_output(out, overwrite, self.output_kind, inputs)

    @contextlib.contextmanager
    def staging(self, out: Path, overwrite: bool):
        """A private directory beside `out`, renamed to it when the block completes (removed if it fails), with
        llmq's marker in it (what a later --overwrite recognises)."""
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            yield Stage(tmp, lambda name: tmp / name)
            write_marker(tmp, **(self.recipe_fields(self.report) if self.report else
                                 {"format": self.name, "method": self.method.name}))

    @abstractmethod
    def plan(self, model: nn.Module, linears: dict[str, nn.Linear], storage_dtype: torch.dtype,
             calibrated: bool) -> Plan:
        """The grid of every Linear, as the parts the harness quantizes together."""

    @abstractmethod
    def write(self, path: Path, model: nn.Module, tokenizer, plan: Plan, quantized: dict[str, Quantized],
              report: RunReport) -> int:
        """Write the output into the staged `path`; returns the size of the weights written, in bytes."""

    def describe(self) -> str:
        """A few words for the summary line: the format and what it holds."""
        return self.name

    @abstractmethod
    def default_out(self, base: str) -> str:
        """The output name when none is given, from the model's name."""
