"""Ternary-aware fine-tuning: recover what post-training ternary loses, by distillation from the original model.

The student is the model with its decoder Linears replaced by latent `TernaryLinear` modules (ternary
weights and int8 activations in the forward pass, straight-through gradients to the float weights,
llmq/methods/bitnet.py, which also says which parameters train). The teacher is the original model. The loss is KL(teacher || student) of the next-token distributions on
calibration text, so the student learns to behave like the model it came from rather than to fit the text
anew. Only the latent Linear weights and the norms train; embeddings and lm_head stay as they were.

Matmuls run under bf16 autocast when the device supports it (about 2x faster on a CPU with AMX/AVX512-BF16),
with float32 master weights and AdamW. Gradient checkpointing bounds activation memory for large models.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmq.core import log
from llmq.core.errors import LlmqError


@dataclass
class QATConfig:
    steps: int = 2000
    lr: float = 5e-4
    batch_size: int = 4
    seqlen: int = 256
    warmup: float = 0.05  # fraction of steps with a linear learning-rate ramp, then cosine decay to 10%
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    autocast: bool = True  # bf16 autocast for matmuls
    gradient_checkpointing: bool | None = None  # None: on for models over 1e9 parameters
    seed: int = 0


@dataclass
class QATResult:
    losses: list[float] = field(default_factory=list)  # KL per step (nats per token)
    seconds: float = 0.0
    tokens: int = 0


def training_windows(token_ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Every non-overlapping window of `seqlen` tokens: [n, seqlen]."""
    count = token_ids.numel() // seqlen
    if count < 1:
        raise LlmqError(f"calibration text has {token_ids.numel()} tokens, fewer than one --qat-seqlen window of "
                        f"{seqlen}; give a longer --calib file")
    return token_ids[: count * seqlen].reshape(count, seqlen)


def _learning_rate(config: QATConfig, step: int) -> float:
    warmup = max(1, int(config.warmup * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def distill(student, teacher, windows: torch.Tensor, config: QATConfig, device: torch.device,
            params: list[torch.nn.Parameter], desc: str = "ternary fine-tuning") -> QATResult:
    """Train `params` of `student` (float32 from here on) to match `teacher` on token windows [n, seqlen]."""
    if config.steps < 1 or config.batch_size < 1 or config.lr <= 0:
        raise LlmqError("--qat-steps, --qat-batch and --qat-lr must be positive")
    student.to(device).float().train()
    teacher.to(device).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in student.parameters())
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = n_params > 1e9
    if checkpointing:  # transformers >= 5.x renamed gradient_checkpointing_* to activation_checkpointing_*
        enable = getattr(student, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(windows.shape[0], generator=generator)
    autocast = config.autocast and (device.type == "cuda" or torch.backends.mkldnn.is_available())
    result, started, cursor = QATResult(), time.perf_counter(), 0
    bar = log.progress(range(config.steps), desc=desc, unit="step")
    for step in bar:
        if cursor + config.batch_size > order.numel():  # next epoch, reshuffled
            order, cursor = torch.randperm(windows.shape[0], generator=generator), 0
        batch = windows[order[cursor : cursor + config.batch_size]].to(device)
        cursor += config.batch_size
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                target = F.log_softmax(teacher(batch, use_cache=False).logits.float(), dim=-1)
            logits = student(batch, use_cache=False).logits.float()
        loss = F.kl_div(F.log_softmax(logits, dim=-1).flatten(0, 1), target.flatten(0, 1), log_target=True,
                        reduction="batchmean")
        if not torch.isfinite(loss):
            raise LlmqError(f"fine-tuning diverged at step {step} (loss {loss.item()}); lower --qat-lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        result.losses.append(loss.item())
        result.tokens += batch.numel()
        bar.set_postfix(kl=f"{loss.item():.3f}", lr=f"{_learning_rate(config, step):.1e}")
    if checkpointing:
        getattr(student, "activation_checkpointing_disable", student.gradient_checkpointing_disable)()
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    result.seconds = time.perf_counter() - started
    return result


def save_loss_curve(result: QATResult, path: Path, title: str) -> Path:
    """The loss per step (and a moving average) as a PNG, plus the raw numbers as JSON beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = result.losses
    window = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, alpha=0.35, label="KL per step")
    ax.plot(smooth, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student), nats/token")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps({"kl_per_step": losses, "seconds": result.seconds,
                                                     "tokens": result.tokens}))
    return path
