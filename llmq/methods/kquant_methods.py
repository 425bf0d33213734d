"""Methods that round to GGUF block grids inside the shared calibration harness.

- `KQuantRound`: each Linear encoded with llmq's k-quant search (llmq/methods/kquants.py); with calibration
  data, the search is weighted by the input channels' mean x^2 (llama.cpp's "imatrix"), collected by the
  harness on the inputs the already-quantized earlier layers produce.
- `KQuantGPTQ`: GPTQ's error compensation on the k-quant grid. The block scales/mins are chosen up front
  (imatrix-weighted) from the original weights; then columns are rounded one at a time, in act-order, each
  to its own sub-block's grid, and the rounding error is pushed onto the columns not yet rounded through
  the inverse Hessian. The result is an ordinary k-quant tensor.

Each Linear gets its own GGML type (the mixture's plan), so a group such as q/k/v may mix types.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from llmq.formats.gguf_blocks import block_type
from llmq.methods.base import Method, MethodOptions, StatsCollector
from llmq.methods.gptq import HessianCollector, error_feedback_sweep, inverse_hessian_cholesky
from llmq.methods.grid import QuantScheme
from llmq.methods.kquants import encode, grid_of, round_to_grid


@dataclass
class EncodedWeight:
    """One Linear's weight in a GGML type: block bytes (or float16 values) [rows, ...]."""

    qtype: T
    data: np.ndarray
    values: torch.Tensor | None = None  # dequantized float32 [rows, cols], while the harness needs it


@dataclass
class EncodedGroup:
    """The Linears of one harness group, encoded; rows in the order the harness concatenated them."""

    parts: list[EncodedWeight]

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.values for p in self.parts])

    def rows(self, rows: slice) -> EncodedWeight:
        start = 0
        for part in self.parts:
            if start == rows.start:
                return EncodedWeight(part.qtype, part.data)
            start += part.data.shape[0]
        raise ValueError(f"no encoded part starts at row {rows.start}")


class ImportanceCollector(StatsCollector):
    """Mean of x^2 per input channel (llama.cpp's imatrix entry for a Linear)."""

    def __init__(self, in_features: int, device: torch.device):
        self.sum_x2 = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_x2 += x.pow(2).sum(0)
        self.tokens += x.shape[0]

    def importance(self) -> torch.Tensor:
        return self.sum_x2 / max(self.tokens, 1)


def _encode_float(weight: torch.Tensor, qtype: T) -> EncodedWeight:
    values = weight.to(torch.float16) if qtype == T.F16 else weight
    data = values.cpu().numpy()
    return EncodedWeight(qtype, data, values.float())


class KQuantRound(Method):
    """Round every Linear to its planned GGML type with llmq's block search (imatrix-weighted when calibrated)."""

    name = "kquant"

    def __init__(self, plan: dict[str, T], use_importance: bool, options: MethodOptions | None = None):
        super().__init__(QuantScheme(), options)
        self.plan = plan  # full HF module name -> GGML type
        self.needs_calibration = use_importance
        self.current_linears: list[str] = []

    def new_collector(self, in_features: int, device: torch.device) -> StatsCollector:
        return ImportanceCollector(in_features, device)

    def begin_group(self, names: list[str], rows: list[int]) -> None:
        self.current_linears, self.current_rows = names, rows

    def quantize(self, weight, stats, scale_dtype) -> EncodedGroup:
        importance = None if stats is None else self._importance(stats)
        parts, start = [], 0
        for name, rows in zip(self.current_linears, self.current_rows):
            qtype = self.plan[name]
            part = weight[start : start + rows]
            start += rows
            if qtype in (T.F32, T.F16):
                parts.append(_encode_float(part, qtype))
                continue
            parts.append(self._encode(part, qtype, importance, stats))
        return EncodedGroup(parts)

    def _importance(self, stats) -> torch.Tensor:
        return stats.importance()

    def _encode(self, weight, qtype, importance, stats) -> EncodedWeight:
        codes = encode(weight, qtype, importance)
        cls = block_type(qtype)
        values = cls.values(codes).reshape(weight.shape).to(weight.device)
        return EncodedWeight(qtype, cls.pack(codes).reshape(weight.shape[0], -1).numpy(), values)


class _HessianWithImportance(HessianCollector):
    def importance(self) -> torch.Tensor:
        return self.sum_xxt.diagonal() / max(self.tokens, 1)


class KQuantGPTQ(KQuantRound):
    """GPTQ on the k-quant grid (see the module docstring)."""

    name = "kquant-gptq"
    orders_columns = True

    def __init__(self, plan: dict[str, T], options: MethodOptions | None = None):
        super().__init__(plan, True, options)

    def new_collector(self, in_features: int, device: torch.device) -> StatsCollector:
        return _HessianWithImportance(in_features, device, self.options.sink_weight)

    def _encode(self, weight, qtype, importance, stats) -> EncodedWeight:
        codes = gptq_on_grid(weight, stats.hessian(), qtype, importance, self.options)
        cls = block_type(qtype)
        values = cls.values(codes).reshape(weight.shape).to(weight.device)
        return EncodedWeight(qtype, cls.pack(codes).reshape(weight.shape[0], -1).numpy(), values)


def gptq_on_grid(weight: torch.Tensor, hessian: torch.Tensor, qtype: T, importance: torch.Tensor,
                 options: MethodOptions):
    """GPTQ with the grid of every sub-block fixed by llmq's k-quant search; returns the block Codes."""
    cls = block_type(qtype)
    W = weight.detach().float().cpu().clone()
    H = hessian.detach().float().cpu().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    codes = encode(W, qtype, importance.cpu())  # static grid: block parameters from the original weights
    scale, minimum = grid_of(codes, qtype, rows)
    sub_of_column = torch.arange(cols) // cls.sub_size

    perm = torch.argsort(H.diagonal(), descending=True) if options.act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_cholesky(H, options.damp)
    L = torch.zeros(rows, cols, dtype=torch.int32)

    def round_column(position: int, block: torch.Tensor, i: int) -> torch.Tensor:
        column = perm[position]
        g = sub_of_column[column]
        s = scale[:, g]
        m = None if minimum is None else minimum[:, g]
        q = round_to_grid(block[:, i : i + 1], s, m, cls.zero, cls.qmax)[:, 0]
        L[:, column] = q.to(torch.int32)
        return s * (q - cls.zero) if m is None else s * q - m

    error_feedback_sweep(W, Hinv, options.block_size, round_column)
    codes.L = L.reshape(-1, cls.block_size)
    return codes


class _AWQScaling:
    """AWQ's scale search, folding and clipping before the k-quant rounding (llmq/methods/awq.py).

    AWQ searches on llmq's integer grid; `proxy` is the grid closest to the mixture's main type (same bits,
    32-wide asymmetric groups like the 32-wide sub-blocks of the k-quants).
    """

    def __init__(self, proxy: QuantScheme, options: MethodOptions | None):
        from llmq.methods.awq import AWQ

        self._awq = AWQ(proxy, options)

    def prepare_layer(self, layer, layer_map, inputs) -> None:
        self._awq.prepare_layer(layer, layer_map, inputs)


class KQuantAWQ(KQuantRound):
    """AWQ scaling and clipping, then imatrix-weighted k-quant rounding."""

    name = "kquant-awq"

    def __init__(self, plan: dict[str, T], proxy: QuantScheme, options: MethodOptions | None = None):
        super().__init__(plan, True, options)
        self._scaling = _AWQScaling(proxy, options)

    def prepare_layer(self, layer, layer_map, inputs) -> None:
        self._scaling.prepare_layer(layer, layer_map, inputs)


class KQuantAWQGPTQ(KQuantGPTQ):
    """AWQ scaling and clipping, then GPTQ on the k-quant grid."""

    name = "kquant-awq-gptq"

    def __init__(self, plan: dict[str, T], proxy: QuantScheme, options: MethodOptions | None = None):
        super().__init__(plan, options)
        self._scaling = _AWQScaling(proxy, options)

    def prepare_layer(self, layer, layer_map, inputs) -> None:
        self._scaling.prepare_layer(layer, layer_map, inputs)
