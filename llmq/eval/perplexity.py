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
from transformers import AutoConfig

from llmq.calib.models import EMBEDDED_DEFAULT, check_model_files, load_model, model_tokenizer, unreadable_config
from llmq.calib.text import evaluation_text, tokenize_text
from llmq.core import log
from llmq.core.errors import LlmqError
from llmq.runtime.modeling import load


def is_quantized_dir(name: str) -> bool:
    path = Path(name)
    if not (path / "config.json").exists():
        return False
    check_model_files(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as error:  # bad JSON, no model_type, an unknown architecture
        raise unreadable_config(path, error) from None
    return getattr(config, "quantization_config", None) is not None


def load_for_eval(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer): llmq-packed when `name` is a quantized directory, else a plain float model."""
    if is_quantized_dir(name):
        return load(name, device=device, dtype=dtype), model_tokenizer(name)
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
    window_nll: list[float] | None = None  # each window's summed negative log-likelihood
    kl_windows: int | None = None  # the first windows the KL divergence is over
    base_perplexity: float | None = None  # the base model's, over the KL windows (the baseline of the same run)

    def perplexity_of_first(self, windows: int) -> float:
        """Perplexity over the first `windows` windows alone (to set beside a client that scored only those)."""
        assert self.window_nll is not None and windows <= len(self.window_nll)
        return math.exp(sum(self.window_nll[:windows]) / (windows * (self.tokens // self.windows - 1)))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, base=None, device: str = "cpu", kl_windows: int | None = None) -> EvalResult:
    """Perplexity of `model` over `windows` [n, seqlen]; with `base`, also mean KL(base || model) per token, over
    the first `kl_windows` windows (default: all; the base model's forward pass costs as much as the model's)."""
    window_nll, kl, kl_predicted, base_nll = [], 0.0, 0, 0.0
    kl_windows = windows.shape[0] if kl_windows is None else min(kl_windows, windows.shape[0])
    for index, window in enumerate(log.progress(windows, desc="eval windows", unit="window")):
        x = window.unsqueeze(0).to(device)
        logits = model(x).logits[0, :-1].float()
        window_nll.append(F.cross_entropy(logits, x[0, 1:], reduction="sum").item())
        if base is not None and index < kl_windows:
            base_logp = F.log_softmax(base(x).logits[0, :-1].float(), dim=-1)
            base_nll -= base_logp.gather(1, x[0, 1:, None]).sum().item()
            kl += F.kl_div(F.log_softmax(logits, dim=-1), base_logp, log_target=True, reduction="sum").item()
            kl_predicted += x.shape[1] - 1
    nll, predicted = sum(window_nll), windows.shape[0] * (windows.shape[1] - 1)
    if not math.isfinite(nll) or (base is not None and not math.isfinite(kl)):
        raise LlmqError("the model's outputs are not finite numbers (NaN or Inf), so there is no perplexity to report; "
                        "the checkpoint is damaged")
    return EvalResult(
        perplexity=math.exp(nll / predicted),
        kl_divergence=None if base is None else kl / kl_predicted,
        windows=windows.shape[0],
        tokens=windows.numel(),
        window_nll=window_nll,
        kl_windows=None if base is None else kl_windows,
        base_perplexity=None if base is None else math.exp(base_nll / kl_predicted),
    )
