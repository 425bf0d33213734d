"""Where work runs and how big things are: the compute device, the bytes a model holds, sizes for people."""

from __future__ import annotations

import torch
from torch import nn

from llmq.core.errors import LlmqError


def resolve_device(name: str) -> torch.device:
    """`auto`: cuda when torch sees a GPU, else cpu; a named device is checked before any work starts."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LlmqError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LlmqError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, tied tensors counted once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def human_size(n_bytes: float) -> str:
    """Decimal units, as file browsers and the hub show sizes."""
    for unit in ("B", "KB", "MB"):
        if n_bytes < 1000:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} GB"
