"""What a quantization method is, as the calibration harness sees it.

A method quantizes one weight matrix at a time, given the statistics the harness collected on that
matrix's input. Linears that share an input (q/k/v, gate/up) arrive concatenated along the output rows,
so they share one set of statistics and one pass of the method; every method here treats rows
independently, which makes that concatenation exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.methods.grid import QuantizedTensor, QuantScheme


@dataclass
class MethodOptions:
    """Knobs shared by the methods; each method reads the ones it understands."""

    mse: bool = False  # search the clipping range per group
    act_order: bool = False  # GPTQ: quantize columns in order of decreasing Hessian diagonal
    damp: float = 0.01  # GPTQ: damping as a fraction of the mean Hessian diagonal
    block_size: int = 128  # GPTQ: columns per lazy-update block
    sink_weight: float = 1.0  # GPTQ: weight of each calibration sequence's first token in the Hessian


class StatsCollector:
    """Accumulates statistics of one Linear group's input over all calibration samples."""

    def add(self, x: torch.Tensor) -> None:  # x: [..., in_features]
        raise NotImplementedError


class Method:
    """Base class: subclasses set `name`, `needs_calibration`, and implement `quantize`."""

    name: str = ""
    needs_calibration: bool = False
    orders_columns: bool = False  # honours MethodOptions.act_order

    def __init__(self, scheme: QuantScheme, options: MethodOptions | None = None):
        self.scheme = scheme
        self.options = options or MethodOptions()

    def new_collector(self, in_features: int, device: torch.device) -> StatsCollector | None:
        return None

    def begin_group(self, names: list[str], rows: list[int]) -> None:
        """Told before `quantize` which Linears (full names, output rows each) the concatenated weight holds."""

    def prepare_layer(self, layer, layer_map, inputs) -> None:
        """Transform an unquantized decoder layer before its groups are quantized (AWQ's scaling); default none."""

    def quantize(self, weight: torch.Tensor, stats: StatsCollector | None, scale_dtype: torch.dtype) -> QuantizedTensor:
        """weight: float32 [out, in] on the compute device."""
        raise NotImplementedError
