"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8 quantization.

A few input channels of an LLM's Linears carry values 10-100x larger than the rest, in every token. With one
scale per token (or per tensor, static), those channels set the scale and the others keep few levels. Dividing
channel j of the input by s_j and multiplying column j of the weights by s_j leaves the product unchanged and
balances the two ranges:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        max|W_j| over the rows of every Linear sharing the input

with alpha (`--smoothquant ALPHA`, 0.5 as in the paper) splitting the difficulty between inputs and weights;
max|X_j| over every calibration token, on the unquantized layer. 1/s is folded into the norm or Linear that
produces the input, exactly as AWQ's scales are (llmq/calib/discover.py checked each fold). Every group with a
fold is smoothed: q/k/v and gate/up through their norms (the paper's and llm-compressor's choice), and also
down_proj through up_proj's rows (and o_proj through v_proj's where the widths match). down_proj's input, the
gated product, carries by far the largest outliers (SmolLM2: max|x| up to 17-43 against 1-5 for q/k/v's): with
static per-tensor int8 inputs it alone took perplexity from 24 to 51 (4 windows), and the per-row weight scales
absorb the fold into up_proj's rows at no cost.

A layer transform like AWQ: the rounding that follows is the composed method's (`smoothquant+gptq`), RTN alone.
With several ranks (torch.distributed) each rank records its own windows and the maxima are taken across ranks,
so every rank folds the same scales.
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.calib.capture import first_tensor
from llmq.calib.discover import apply_fold
from llmq.core.errors import LlmqError
from llmq.core.interfaces import Method
from llmq.core.layers import LayerMap
from llmq.core.ranks import max_across
from llmq.core.scheme import QuantScheme

DEFAULT_ALPHA = 0.5
MIN_SCALE = 1e-5  # a channel no token ever used (max|X_j| = 0) is left alone instead of scaled to nothing


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in_features] from the largest |x| and |w| of each input channel; 1 where either is 0."""
    scales = x_absmax.float().pow(alpha) / w_absmax.float().pow(1 - alpha)
    usable = (x_absmax > 0) & (w_absmax > 0)
    return torch.where(usable, scales.clamp(min=MIN_SCALE), torch.ones_like(scales))


class SmoothQuant(Method):
    name = "smoothquant"
    rounds = False
    needs_data = True
    folds = True

    def check(self, config) -> None:
        alpha = config.method.smoothquant
        if alpha is not None and not 0 < alpha < 1:
            raise LlmqError(f"--smoothquant {alpha:g} is out of range; use a migration strength between 0 and 1, e.g. 0.5")
        if config.scheme.act_bits is None:
            raise LlmqError("SmoothQuant moves activation outliers into the weights, for schemes that quantize inputs: "
                            "add --scheme w8a8 (or fp8)")

    @property
    def alpha(self) -> float:
        return DEFAULT_ALPHA if self.options.smoothquant is None else self.options.smoothquant

    @torch.no_grad()
    def prepare_layer(self, layer: nn.Module, layer_map: LayerMap, inputs, search_scheme: QuantScheme | None) -> None:
        groups = [group for group in layer_map.groups if group.prev is not None]
        maxima = {group: None for group in groups}

        def recorder(group):
            def record(module, args, kwargs):
                x = first_tensor(args, kwargs)
                seen = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
                maxima[group] = seen if maxima[group] is None else torch.maximum(maxima[group], seen)
            return record

        handles = [layer.get_submodule(group.linears[0]).register_forward_pre_hook(recorder(group), with_kwargs=True)
                   for group in groups]
        try:
            for item in inputs:
                layer(item.hidden, **item.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for group in groups:
            linears = [layer.get_submodule(name) for name in group.linears]
            x_absmax = maxima[group]
            if x_absmax is None:  # an expert no calibration token reached: nothing to balance
                x_absmax = torch.zeros(linears[0].in_features, device=linears[0].weight.device)
            max_across([x_absmax])
            w_absmax = torch.stack([linear.weight.abs().amax(0).float() for linear in linears]).amax(0)
            apply_fold(layer.get_submodule(group.prev), linears, smoothing_scales(x_absmax, w_absmax, self.alpha),
                       group.prev_rows, group.norm_offset)
