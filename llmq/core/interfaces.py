"""The three seams of a quantization run: what a method is, what a grid is, and what a quantized weight is.

    run skeleton (llmq/run.py)
      loads the model, asks the target (llmq/targets) for a Grid per Linear, and runs
    the harness (llmq/calib/harness.py)
      which, layer by layer, calls the Method's hooks: prepare_layer (AWQ's scaling), then quantize(weight,
      statistics, grid) per group of Linears sharing an input, and gets back
    a Quantized weight
      which the harness writes back (dequantized) for the next groups and the target writes to disk.

A Method never knows which format it writes: it rounds onto whatever Grid the target hands it, through the
GridFit interface (a grid with its parameters fixed for one weight matrix). A Grid never knows which method
rounds onto it. This is what lets a new method work on every target, and a new target take every method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from llmq.core.config import MethodOptions, QuantizeConfig
from llmq.core.layers import LayerMap
from llmq.core.scheme import QuantScheme


class Quantized(Protocol):
    """A quantized weight matrix, in whatever form its grid stores it."""

    def dequantize(self) -> torch.Tensor:
        """The float32 [rows, cols] values it decodes to."""

    def rows(self, rows: slice) -> Quantized:
        """Some rows, as an independent copy on the CPU (a group's result split back into its Linears)."""


class Statistics(Protocol):
    """What the harness collected on one group's input (llmq/calib/statistics.py)."""

    def importance(self) -> torch.Tensor:
        """Mean x^2 per input channel [in_features] (llama.cpp's imatrix)."""

    def hessian(self) -> torch.Tensor:
        """2 E[x x^T] [in, in] (only where the method asked for "hessian")."""


class GridFit(ABC):
    """A grid whose parameters (scales, zero points, block codes) are fixed for one weight matrix [rows, cols].

    Integers are held as float tensors; `columns` is a LongTensor of column indices of the fitted matrix, and
    `w` the matching weight columns [rows, len(columns)].
    """

    refit_group_size: int | None = None  # groups whose parameters may be fitted again as a method goes (GPTQ)

    @abstractmethod
    def nearest(self) -> torch.Tensor:
        """Integers [rows, cols] of the weight this grid was fitted on, rounded as the fit itself rounds."""

    @abstractmethod
    def position(self, w: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Where w lies on the integer axis, before any rounding (its nearest integer is round-to-nearest's)."""

    @abstractmethod
    def round(self, w: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The nearest integers of w, clamped to the grid (this grid's own arithmetic, bit for bit)."""

    @abstractmethod
    def clamp(self, q: torch.Tensor) -> torch.Tensor:
        """Integers limited to the grid's range."""

    @abstractmethod
    def value(self, q: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The float32 values integers q of those columns decode to."""

    def round_column(self, w: torch.Tensor, column: int, integers: torch.Tensor) -> torch.Tensor:
        """Round one column w [rows] of the fitted matrix (column `column`): its integers into `integers` [rows],
        its decoded values returned; the same numbers as round() and value(). GPTQ's sweep calls this once per
        column, so grids override it with a path that neither gathers parameters nor allocates what it need not."""
        columns = torch.tensor([column], device=w.device)
        q = self.round(w[:, None], columns)
        integers.copy_(q[:, 0])
        return self.value(q, columns)[:, 0]

    def refit(self, column: int, w: torch.Tensor) -> None:
        """Fit again the parameters of the group starting at `column`, from its current weights w [rows, group]."""
        raise NotImplementedError(f"{type(self).__name__} has fixed parameters")

    @abstractmethod
    def result(self, integers: torch.Tensor) -> Quantized:
        """The quantized weight these integers [rows, cols] and the fitted parameters make."""


class Grid(ABC):
    """What a target stores a weight as; `fit` fixes its parameters for one weight matrix."""

    rounds: bool = True  # False: values are stored as floats (F16 parts of a GGUF file); `keep` does it
    weighted: bool = False  # its fit takes an importance per input channel (then the harness collects one)
    static_inputs: bool = False  # its weights' inputs get one scale fixed from calibration (the harness measures them)
    input_histogram: bool = False  # that scale is chosen from a histogram of every calibration |x| (--act-range mse)

    @abstractmethod
    def fit(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> GridFit:
        """weight: float32 [rows, cols]; importance: [cols] or None."""

    def keep(self, weight: torch.Tensor) -> Quantized:
        raise NotImplementedError(f"{type(self).__name__} rounds; use fit()")

    def mismatch(self, quantized: Quantized) -> str | None:
        """Why `quantized` (read back from a run's checkpoint) is not what this grid makes, or None."""
        return None

    def with_input_range(self, quantized: Quantized, absmax: torch.Tensor, histogram=None) -> Quantized:
        """`quantized` with the static input scale that the calibration inputs give: their largest |x| per input
        channel, and (when `input_histogram`) the AbsHistogram of every |x| (llmq/core/ranges.py)."""
        raise NotImplementedError(f"{type(self).__name__} quantizes no inputs")


@dataclass
class ModelContext:
    """What a method's whole-model step (ternary-aware fine-tuning) may use."""

    tokenizer: object
    device: torch.device
    config: QuantizeConfig  # the whole run's settings (its calibration text, scheme)
    linears: list[str]  # the Linears this run quantizes (full module names)
    artifact: Callable[[str], Path]  # a file name -> where to write a side output (a loss curve) for this run


class Method:
    """One quantization method as the run sees it; subclasses override the hooks they need.

    A rounding method (RTN, GPTQ) implements `quantize`; a layer transform (AWQ) implements `prepare_layer` and
    sets `rounds = False`, and the registry composes it with a rounding (`awq+gptq`). Methods declare what
    they need instead of being recognised by name.
    """

    name: str = ""
    rounds: bool = True  # implements quantize(); False for a pure layer transform
    needs_data: bool = False  # calibrate even when no text was given (GPTQ's Hessian, AWQ's layer inputs)
    statistic: str | None = None  # what quantize() reads beside an importance: "hessian" or None
    orders_columns: bool = False  # honours MethodOptions.act_order
    ternary: bool = False  # rounds onto ternary values only: picks the ternary targets and mixtures
    searches: bool = False  # fake-quantizes candidates on the target's nearest integer grid (its search_scheme)
    folds: bool = False  # scales inputs by folding into the norm / Linear before (discovery finds the exact folds)
    side_files: tuple[str, ...] = ()  # files prepare_model writes beside the output (ModelContext.artifact names)
    whole_model: bool = False  # has a whole-model step (prepare_model): the model is loaded whole, not a layer at a time
    repeatable_model_step: bool = False  # prepare_model is data-free and seeded: a resumed run redoes it, keeps layers

    def __init__(self, options: MethodOptions | None = None):
        self.options = options or MethodOptions()

    def check(self, config: QuantizeConfig) -> None:
        """Refuse, before anything is loaded, settings this method cannot run with."""

    def prepare_model(self, model: nn.Module, context: ModelContext) -> str | None:
        """A whole-model step before the layer-by-layer work; returns a description of it for the card."""
        return None

    def prepare_layer(self, layer: nn.Module, layer_map: LayerMap, inputs: list, search_scheme: QuantScheme | None) -> None:
        """Transform an unquantized decoder layer before its groups are quantized (AWQ's scaling).

        search_scheme: the integer grid closest to the target's, for searches that fake-quantize many candidates.
        """

    def quantize(self, weight: torch.Tensor, stats: Statistics | None, grid: Grid) -> Quantized:
        """weight: float32 [out, in] on the compute device (Linears sharing an input stacked along the rows)."""
        raise NotImplementedError(f"{type(self).__name__} does not round; compose it with a rounding method")
