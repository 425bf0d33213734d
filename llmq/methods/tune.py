"""Tuning the quantized model's scales end to end (as EfficientQAT's E2E-QP and PEQA do), integer codes fixed.

GPTQ (and RTN, AWQ) choose each weight's integer by a layer-local criterion and each group's scale from those
layer-local weights. What the rounding loses compounds over the layers, and at 2-3 bits a group's scale fitted
to its own weights is rarely the scale that best serves the model's output. So, after every Linear is rounded,
the whole quantized model is run and its group scales (float, one per row and group: a few percent of the
weights' count) are trained to match the unquantized model's next-token distributions on the calibration windows
(KL(teacher || student), AdamW, the distillation loop of llmq/methods/qat.py). The integers, zero points and
everything else stay as rounded, so the checkpoint is the same format with other scales: any loader runs it.

On the reference model, GPTQ W3 g64 asymmetric: 50 steps (2 windows of 512 tokens each, ~9 s a step on 2 CPU
cores) took perplexity from 31.70 to 27.16 (first 10 windows of wikitext2 test; 28.22 over 40), and after a
rotation of the residual stream (llmq/methods/rotate.py) to 25.58 (26.97 over 40): README, Benchmark.
Integer grids only (compressed-tensors' int2-int8 weights, no input quantization).

Costs: the model is loaded whole and a float32 copy of it is the teacher (peak RSS 5.6 GB for the 135M
reference model, mostly the two models' logits over a 49152-token vocabulary); models that do not fit in memory
twice are not served yet.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmq.core import log
from llmq.core.errors import LlmqError
from llmq.core.scheme import QuantizedTensor
from llmq.methods.qat import QATConfig, distill


class ScaledCodes(nn.Module):
    """A quantized Linear during tuning: weight = codes * scale per (row, group), the scale trainable."""

    def __init__(self, result: QuantizedTensor, bias: torch.Tensor | None, device: torch.device):
        super().__init__()
        out_features, in_features = result.qweight.shape
        groups = result.scale.shape[1]
        codes = result.qweight.to(device, torch.float32).reshape(out_features, groups, -1)
        if result.zero_point is not None:
            codes = codes - result.zero_point.to(device, torch.float32).unsqueeze(-1)
        self.register_buffer("codes", codes, persistent=False)
        self.scale = nn.Parameter(result.scale.to(device, torch.float32).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device, torch.float32), requires_grad=False)
        self.shape = (out_features, in_features)

    def weight(self) -> torch.Tensor:
        return (self.codes * self.scale.unsqueeze(-1)).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@dataclass
class TuneSettings:
    steps: int
    lr: float
    batch: int  # calibration windows per step


def check_tunable(quantized) -> None:
    """Scale tuning trains integer-grid scales; anything else is refused by name."""
    for name, result in quantized.items():
        if not isinstance(result, QuantizedTensor) or result.qweight.dtype != torch.int8:
            raise LlmqError(f"--tune-steps trains the scales of integer-grid weights, but {name} is "
                            f"{type(result).__name__}; drop --tune-steps for this scheme or format")


def frozen_teacher(model: nn.Module) -> nn.Module:
    """The unquantized model as it is now (after any whole-model transform such as a rotation), float32, frozen:
    what the quantized model is tuned to imitate."""
    teacher = copy.deepcopy(model).float().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def tune_scales(model: nn.Module, teacher: nn.Module, quantized: dict, windows: torch.Tensor,
                settings: TuneSettings, device: torch.device) -> str:
    """Train every quantized Linear's scales in `model` (whose Linears hold the dequantized weights) against
    `teacher` on token `windows` [n, seqlen]; the trained scales replace those in `quantized` (in their dtype) and
    the Linears' weights are set to the new dequantized values. Returns a description for the model card."""
    check_tunable(quantized)
    dtype = model.dtype
    originals, tuned = {}, {}
    for name, rounded in quantized.items():
        linear = model.get_submodule(name)
        originals[name] = linear
        tuned[name] = ScaledCodes(rounded, linear.bias, device)
        model.set_submodule(name, tuned[name])
    config = QATConfig(steps=settings.steps, lr=settings.lr, batch_size=settings.batch, seqlen=windows.shape[1],
                       autocast=device.type == "cuda")  # a CPU without AMX runs bf16 matmuls 4x slower
    try:
        result = distill(model, teacher, windows, config, device, [m.scale for m in tuned.values()],
                         desc="scale tuning")
    finally:
        with torch.no_grad():
            for name, linear in originals.items():
                module = tuned[name]
                quantized[name].scale = module.scale.detach().to("cpu", quantized[name].scale.dtype)
                linear.weight.data = quantized[name].dequantize().to(linear.weight.device, linear.weight.dtype)
                model.set_submodule(name, linear)
        model.to("cpu", dtype).eval()
    ends = min(5, len(result.losses))  # the mean of the first and of the last few steps' KL
    start, end = sum(result.losses[:ends]) / ends, sum(result.losses[-ends:]) / ends
    log.info(f"scale tuning: KL {start:.4f} -> {end:.4f} per token over {settings.steps} steps "
             f"({result.seconds:.0f} s)")
    return (f"scales tuned end to end for {settings.steps} steps ({settings.batch} windows each, lr {settings.lr:g}, "
            f"KL to the unquantized model {start:.3g} -> {end:.3g} per token)")
