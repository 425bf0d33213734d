"""AWQ (Lin et al., 2023): activation-aware weight scaling, then clipping, then rounding.

Salient input channels (large mean |x|) lose less to rounding when their weights are scaled up by s and the
input scaled down by 1/s. For each group of Linears sharing an input, on the unquantized layer:

1. statistics: mean |x| per input channel, over the first 16384 calibration tokens;
2. scale search: s = mean|x|^a / mean|w~|^(1-a) (w~: |w| normalised by its group's max, averaged over
   rows), a on a grid of 20, normalised so max(s) * min(s) = 1, plus s = 1; the candidate whose
   round-to-nearest weights give the smallest error of the whole sub-block's output (attention, MLP, or the
   Linear alone) on the first calibration tokens wins; a lone Linear's candidates run as one stacked matmul;
3. folding: 1/s goes into the operation that produces the input (a norm's weight, or the rows of the Linear
   before), s into the group's weights, so the float model computes exactly what it did before; discovery
   (llmq/calib/discover.py) found that operation and checked the fold is exact; a group without one is
   clipped only;
4. clip search: per output row and group, shrink the range to [-m, m] for m = max|w| * (1 - i/20),
   i < 10, keeping the m with the smallest error of that group's partial outputs over the search tokens
   (q/k are skipped: the attention scores amplify their clipping).

AWQ is a layer transform: it changes the float weights (and the norms or Linears they are folded into) and
leaves the rounding to the method it is composed with: round-to-nearest for `awq`, GPTQ for `awq+gptq`
(llmq/methods/__init__.py). Its searches fake-quantize on the integer grid closest to the target's (the
target's own for compressed-tensors; for GGUF a 32-wide asymmetric grid with the mixture's bits).
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.calib.capture import first_tensor, layer_output
from llmq.calib.discover import apply_fold
from llmq.core.interfaces import Method
from llmq.core.layers import LayerMap
from llmq.core.scheme import QuantScheme, dequantize
from llmq.methods.grids.integer import round_to_nearest
from llmq.methods.grids.microscaling import MicroscalingGrid

SCALE_GRID = 20
CLIP_GRID, CLIP_STEPS = 20, 10  # shrink factors 1.0, 0.95, ..., 0.55
SEARCH_TOKENS = 2048  # calibration tokens the scale search evaluates each candidate on (the first batches)
KEEP_TOKENS = 4096  # calibration tokens whose inputs are kept per sub-block (the clip search uses them all)
STACKED_WEIGHTS = 1 << 27  # weights per stacked candidate matmul (256 MB in bf16)
RECORD_TOKENS = 16384  # calibration tokens mean |x| is measured on: channel means settle long before 65k tokens
NO_CLIP_SUFFIXES = ("q_proj", "k_proj", "qkv_proj")


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest on the grid, back in float32 (scales kept in float32: only the error matters here). A
    microscaling scheme is searched on its own grid, group scales chosen as the run will choose them."""
    if scheme.microscaling:
        fit = MicroscalingGrid(scheme).fit(weight)
        return fit.value(fit.nearest(), torch.arange(weight.shape[1], device=weight.device))
    q, scale, zero = round_to_nearest(weight, scheme, torch.float32)
    return dequantize(q, scale, zero, scheme.group_size_for(weight.shape[1]))


def _call_block(block: nn.Module, args: tuple, kwargs: dict, x: torch.Tensor) -> torch.Tensor:
    """Run a sub-block on input x with the rest of its recorded call."""
    if args:
        return layer_output(block(x, *args[1:], **kwargs))
    return layer_output(block(**{**kwargs, "hidden_states": x}))


def _linear_block_errors(w: torch.Tensor, weights: list[torch.Tensor], calls) -> list[float]:
    """Output errors of every candidate of a lone Linear at once: one matmul against all candidates stacked."""
    dtype = calls[0][2].dtype  # compute as the layer does (bf16 stays bf16: fast, and what inference sees)
    reference_weight = w.to(dtype)
    per_matmul = max(1, STACKED_WEIGHTS // w.numel())  # bounds memory on large layers
    errors = []
    for start in range(0, len(weights), per_matmul):
        chunk = weights[start : start + per_matmul]
        stacked = torch.cat(chunk).to(dtype)  # [candidates * out, in]
        chunk_errors = torch.zeros(len(chunk))
        for _, _, x in calls:
            flat = x.reshape(-1, x.shape[-1])
            outputs = (flat @ stacked.T).float().reshape(flat.shape[0], len(chunk), -1)
            chunk_errors += (outputs - (flat @ reference_weight.T).float().unsqueeze(1)).pow(2).sum(dim=(0, 2)).cpu()
        errors.extend(chunk_errors.tolist())
    return errors


def _block_errors(block: nn.Module, linears: list[nn.Linear], weights: list[torch.Tensor], calls) -> list[float]:
    """Output error of the sub-block with each candidate weight set in place of the group's Linears."""
    originals = [linear.weight.data for linear in linears]
    references = [_call_block(block, args, kwargs, x).float() for args, kwargs, x in calls]
    errors = []
    try:
        for candidate in weights:
            row = 0
            for linear in linears:
                linear.weight.data = candidate[row : row + linear.out_features].to(linear.weight.dtype)
                row += linear.out_features
            errors.append(sum((_call_block(block, args, kwargs, x).float() - reference).pow(2).sum().item()
                              for (args, kwargs, x), reference in zip(calls, references)))
    finally:
        for linear, original in zip(linears, originals):
            linear.weight.data = original
    return errors


def _first_samples(value, batch: int, keep: int):
    """The first `keep` samples of a recorded argument: tensors (and tuples of them) whose first dim is the batch."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return value[:keep]
    if isinstance(value, tuple):
        return tuple(_first_samples(item, batch, keep) for item in value)
    return value


class _BlockRecorder:
    """A sub-block's calls over the calibration set: mean |x| over every token, the first calls kept whole."""

    def __init__(self):
        self.abs_sum, self.tokens, self.kept_tokens = None, 0, 0
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []

    def record(self, module, args, kwargs) -> None:
        x = first_tensor(args, kwargs)
        flat = x.reshape(-1, x.shape[-1])
        total = flat.float().abs().sum(0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.tokens += flat.shape[0]
        if self.kept_tokens < KEEP_TOKENS:
            self.calls.append((args, kwargs, x))
            self.kept_tokens += flat.shape[0]

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / self.tokens

    def calls_for(self, tokens: int) -> list:
        """The kept calls cut to their first `tokens` tokens (whole samples: tensors are cut on the batch dim)."""
        chosen, covered = [], 0
        for args, kwargs, x in self.calls:
            if covered >= tokens:
                break
            batch, per_sample = x.shape[0], x.numel() // (x.shape[0] * x.shape[-1])
            keep = min(batch, -(-(tokens - covered) // per_sample))
            cut = lambda value: _first_samples(value, batch, keep)
            chosen.append((cut(args), {key: cut(value) for key, value in kwargs.items()}, x[:keep]))
            covered += keep * per_sample
        return chosen

    def kept_inputs(self) -> torch.Tensor:
        """Every kept token's input, [tokens, features] in float32."""
        return torch.cat([x.reshape(-1, x.shape[-1]) for _, _, x in self.calls]).float()


class AWQ(Method):
    name = "awq"
    rounds = False
    needs_data = True
    searches = True
    folds = True

    @torch.no_grad()
    def prepare_layer(self, layer: nn.Module, layer_map: LayerMap, inputs, search_scheme: QuantScheme | None) -> None:
        """Search and fold every group's scales, then clip, on the unquantized layer (the AWQ reference order).

        One forward pass (over the first RECORD_TOKENS tokens) records every sub-block's input: folding leaves the
        float model unchanged, so the only input a fold changes is its own group's, by exactly 1/s.
        """
        if search_scheme is None:
            raise ValueError("AWQ needs an integer grid to search on; the target must refuse AWQ before the run")
        recorders = {group: _BlockRecorder() for group in layer_map.groups}
        handles = [layer.get_submodule(group.block or group.linears[0]).register_forward_pre_hook(
            recorder.record, with_kwargs=True) for group, recorder in recorders.items()]
        try:
            recorded = 0
            for item in inputs:
                if recorded >= RECORD_TOKENS:
                    break
                layer(item.hidden, **item.kwargs)
                recorded += item.hidden.numel() // item.hidden.shape[-1]
        finally:
            for handle in handles:
                handle.remove()
        clip_inputs = {}
        for group, recorder in recorders.items():
            if recorder.tokens == 0:  # an expert no calibration token was routed to: nothing to weigh by
                continue
            linears = [layer.get_submodule(name) for name in group.linears]
            x_clip = recorder.kept_inputs()
            if group.prev is not None:  # discovery checked that this fold is exact
                block = layer.get_submodule(group.block) if group.block else None
                scales = self._search_scales(block, linears, recorder, search_scheme)
                apply_fold(layer.get_submodule(group.prev), linears, scales, group.prev_rows, group.norm_offset)
                x_clip = x_clip / scales
            clip_inputs[group] = x_clip
        for group, x_clip in clip_inputs.items():
            for name in group.linears:
                if not name.endswith(NO_CLIP_SUFFIXES):
                    self._clip(layer.get_submodule(name), x_clip, search_scheme)

    def _search_scales(self, block: nn.Module | None, linears: list[nn.Linear], recorder: _BlockRecorder,
                       scheme: QuantScheme) -> torch.Tensor:
        """The candidate scales with the least sub-block output error; returns s [in_features]."""
        w = torch.cat([linear.weight.data for linear in linears]).float()
        grouped = w.abs().reshape(w.shape[0], -1, scheme.group_size_for(w.shape[1]))
        w_abs_mean = (grouped / grouped.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(w.shape).mean(0)
        candidates = list(self._candidate_scales(recorder.abs_mean(), w_abs_mean))
        weights = [fake_quantize(w * s[None, :], scheme) / s[None, :] for s in candidates]
        calls = recorder.calls_for(SEARCH_TOKENS)
        if block is None or (block is linears[0] and len(linears) == 1):  # the Linears themselves, stacked
            errors = _linear_block_errors(w, weights, calls)
        else:
            errors = _block_errors(block, linears, weights, calls)
        return candidates[int(torch.tensor(errors).argmin())]

    @staticmethod
    def _candidate_scales(x_abs_mean: torch.Tensor, w_abs_mean: torch.Tensor):
        """No scaling first (so AWQ never does worse than plain rounding on the search tokens), then the grid."""
        yield torch.ones_like(x_abs_mean)
        for step in range(SCALE_GRID):
            ratio = step / SCALE_GRID
            s = (x_abs_mean.pow(ratio) / (w_abs_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            yield s / (s.max() * s.min()).sqrt()

    @staticmethod
    def _clip(linear: nn.Linear, x: torch.Tensor, scheme: QuantScheme) -> None:
        """Shrink each (row, group) range to the one whose quantized partial outputs err least.

        The error of a group's partial output over tokens X_g is d^T (X_g^T X_g) d for the rounding error d
        of that row's group, so one small Gram matrix per group replaces a pass over every token.
        """
        w = linear.weight.data.float()
        rows, cols = w.shape
        group = scheme.group_size_for(cols)
        xg = x.reshape(-1, cols // group, group).transpose(0, 1)  # [groups, tokens, group]
        gram = xg.transpose(1, 2) @ xg  # [groups, group, group]
        wg = w.reshape(rows, -1, group)
        max_abs = wg.abs().amax(-1, keepdim=True)
        best_error = torch.full(max_abs.shape, float("inf"), device=w.device)
        best_max = max_abs.clone()
        for step in range(CLIP_STEPS):
            limit = max_abs * (1 - step / CLIP_GRID)
            delta = (fake_quantize(wg.clamp(-limit, limit).reshape(w.shape), scheme) - w).reshape(wg.shape)
            d = delta.transpose(0, 1)  # [groups, rows, group]
            error = ((d @ gram) * d).sum(-1).T.unsqueeze(-1)  # [rows, groups, 1]
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_max = torch.where(better, limit, best_max)
        linear.weight.data = wg.clamp(-best_max, best_max).reshape(w.shape).to(linear.weight.dtype)
