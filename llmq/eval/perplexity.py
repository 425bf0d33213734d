"""Perplexity and KL divergence, in the GPTQ paper's protocol.

The evaluation text is tokenized once as a whole, cut into non-overlapping windows of `seqlen` tokens, and
perplexity is exp(mean negative log-likelihood) over every predicted token of the first `windows` windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer

from llmq.calib.models import EMBEDDED_DEFAULT, load_model
from llmq.calib.text import evaluation_text, tokenize_text
from llmq.core import log
from llmq.core.errors import LlmqError, reason
from llmq.runtime.modeling import load


def is_quantized_dir(name: str) -> bool:
    path = Path(name)
    if not (path / "config.json").exists():
        return False
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as error:  # bad JSON, no model_type, an unknown architecture
        raise LlmqError(f"cannot read {path / 'config.json'} ({reason(error)}); fix or re-create it") from None
    return getattr(config, "quantization_config", None) is not None


def load_for_eval(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer): llmq-packed when `name` is a quantized directory, else a plain float model."""
    if is_quantized_dir(name):
        return load(name, device=device, dtype=dtype), AutoTokenizer.from_pretrained(name)
    model, tokenizer, _ = load_model(None if name in ("embedded", EMBEDDED_DEFAULT) else name, dtype)
    return model.to(device), tokenizer


def evaluation_windows(tokenizer, source: str, seqlen: int, windows: int | None) -> torch.Tensor:
    ids = tokenize_text(tokenizer, evaluation_text(source))
    available = ids.numel() // seqlen
    if available == 0:
        raise LlmqError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    count = available if windows is None else min(windows, available)
    return ids[: count * seqlen].reshape(count, seqlen)


@dataclass
class EvalResult:
    perplexity: float | None
    kl_divergence: float | None
    windows: int
    tokens: int


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, base=None, device: str = "cpu") -> EvalResult:
    """Perplexity of `model` over `windows` [n, seqlen]; with `base`, also mean KL(base || model) per token."""
    nll, kl, predicted = 0.0, 0.0, 0
    for window in log.progress(windows, desc="eval windows", unit="window"):
        x = window.unsqueeze(0).to(device)
        logits = model(x).logits[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        if base is not None:
            base_logp = F.log_softmax(base(x).logits[0, :-1].float(), dim=-1)
            kl += F.kl_div(F.log_softmax(logits, dim=-1), base_logp, log_target=True, reduction="sum").item()
        predicted += x.shape[1] - 1
    if not math.isfinite(nll) or (base is not None and not math.isfinite(kl)):
        raise LlmqError("the model's outputs are not finite numbers (NaN or Inf), so there is no perplexity to report; "
                        "the checkpoint is damaged")
    return EvalResult(
        perplexity=math.exp(nll / predicted),
        kl_divergence=None if base is None else kl / predicted,
        windows=windows.shape[0],
        tokens=windows.numel(),
    )
