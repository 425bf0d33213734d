"""The integer group grid of compressed-tensors, as a Grid: choosing scales and zero points (formulas and the
stored tensor in llmq/core/scheme.py).

Symmetric grids have z = 0 and s = max|w| / ((qmax - qmin) / 2), the GPTQ convention (the grid reaches
-max|w| exactly and stops one step short on the positive side). Asymmetric grids cover [min(w, 0), max(w, 0)].

Scales are rounded to their storage dtype (the model's dtype) *before* the integers are chosen, so the
integers are the best ones for the scale that will actually be stored.
"""

from __future__ import annotations

import torch

from llmq.core.interfaces import Grid, GridFit
from llmq.core.scheme import QuantizedTensor, QuantScheme, dequantize_values, quantize_values
from llmq.methods.grids.inputs import StaticInputScale


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size]."""
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size)


def qparams_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32 holding storage-dtype values) and zero point (float32 integers) for a range per group."""
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    span = scheme.qmax - scheme.qmin
    if scheme.symmetric:
        scale = torch.maximum(-wmin, wmax) / (span / 2)
    else:
        scale = (wmax - wmin) / span
    # An all-zero group: any positive scale reconstructs it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).float()
    if scheme.symmetric:
        return scale, None
    zero = (scheme.qmin - torch.round(wmin / scale)).clamp(scheme.qmin, scheme.qmax)
    return scale, zero


def group_qparams(
    w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-(row, group) scale and zero point of a float32 [out, in] weight; [out, n_groups] each.

    With mse=True, shrink each group's range towards zero (grid of 100 steps, down to 20% of it) and keep the
    range whose rounding error sum |w - w_hat|^2.4 is smallest: the clipping search of the GPTQ reference.
    """
    g = _grouped(w, scheme.group_size_for(w.shape[1]))
    wmin, wmax = g.amin(dim=-1), g.amax(dim=-1)
    scale, zero = qparams_from_range(wmin, wmax, scheme, scale_dtype)
    if not mse:
        return scale, zero
    best_err = torch.full_like(wmin, float("inf"))
    for step in range(80):
        shrink = 1 - step / 100
        s, z = qparams_from_range(wmin * shrink, wmax * shrink, scheme, scale_dtype)
        zq = None if z is None else z.unsqueeze(-1)
        q = quantize_values(g, s.unsqueeze(-1), zq, scheme)
        err = (dequantize_values(q, s.unsqueeze(-1), zq) - g).abs_().pow_(2.4).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        if zero is not None:
            zero = torch.where(better, z, zero)
    return scale, zero


def round_to_nearest(
    weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Plain rounding of a float32 [out, in] weight: integers (held as float), scale and zero point per group."""
    group_size = scheme.group_size_for(weight.shape[1])
    scale, zero = group_qparams(weight, scheme, scale_dtype, mse=mse)
    expand = lambda t: None if t is None else t.repeat_interleave(group_size, dim=1)
    return quantize_values(weight, expand(scale), expand(zero), scheme), scale, zero


def to_quantized_tensor(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme, scale_dtype: torch.dtype
) -> QuantizedTensor:
    """Pack the float-held integers and parameters into their storage dtypes."""
    return QuantizedTensor(
        qweight=q.to(torch.int8),
        scale=scale.to(scale_dtype),
        zero_point=None if zero is None else zero.to(torch.int8),
        scheme=scheme,
    )


class IntegerGrid(StaticInputScale, Grid):
    """compressed-tensors' integer group grid; scales stored in `scale_dtype` (the model's dtype)."""

    def __init__(self, scheme: QuantScheme, scale_dtype: torch.dtype, mse: bool = False):
        self.scheme, self.scale_dtype, self.mse = scheme, scale_dtype, mse

    def fit(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> IntegerFit:
        return IntegerFit(self, weight)


class IntegerFit(GridFit):
    """Scale and zero point per (row, group), from the weights it was fitted on (min/max, or the mse search)."""

    def __init__(self, grid: IntegerGrid, weight: torch.Tensor):
        self.grid, self.weight = grid, weight
        self.group_size = grid.scheme.group_size_for(weight.shape[1])
        self.scale, self.zero = group_qparams(weight, grid.scheme, grid.scale_dtype, mse=grid.mse)
        self.refit_group_size = None if grid.scheme.group_size == -1 else self.group_size
        # (scale, zero) as [groups, rows]: a group's parameters contiguous, for round_column
        self._by_group = (self.scale.T.contiguous(), None if self.zero is None else self.zero.T.contiguous())

    def _parameters(self, columns: torch.Tensor):
        groups = columns // self.group_size
        return self.scale[:, groups], None if self.zero is None else self.zero[:, groups]

    def nearest(self) -> torch.Tensor:
        expand = lambda t: None if t is None else t.repeat_interleave(self.group_size, dim=1)
        return quantize_values(self.weight, expand(self.scale), expand(self.zero), self.grid.scheme)

    def position(self, w, columns):
        scale, zero = self._parameters(columns)
        return w / scale + (0 if zero is None else zero)

    def round(self, w, columns):
        scale, zero = self._parameters(columns)
        return quantize_values(w, scale, zero, self.grid.scheme)

    def clamp(self, q):
        return q.clamp(self.grid.scheme.qmin, self.grid.scheme.qmax)

    def value(self, q, columns):
        return dequantize_values(q, *self._parameters(columns))

    def round_column(self, w, column, integers):
        group = column // self.group_size
        scale, zero = self._by_group[0][group], None if self.zero is None else self._by_group[1][group]
        q = torch.div(w, scale, out=integers).round_()  # quantize_values' operations, in place
        if zero is not None:
            q.add_(zero)
        q.clamp_(self.grid.scheme.qmin, self.grid.scheme.qmax)
        return (q if zero is None else q - zero) * scale

    def refit(self, column: int, w: torch.Tensor) -> None:
        """Dynamic groups (GPTQ without act-order): parameters from the weights as updated so far."""
        s, z = group_qparams(w, self.grid.scheme, self.grid.scale_dtype, mse=self.grid.mse)
        group = column // self.group_size
        self.scale[:, group] = self._by_group[0][group] = s[:, 0]
        if self.zero is not None:
            self.zero[:, group] = self._by_group[1][group] = z[:, 0]

    def result(self, integers: torch.Tensor) -> QuantizedTensor:
        return to_quantized_tensor(integers, self.scale, self.zero, self.grid.scheme, self.grid.scale_dtype)
