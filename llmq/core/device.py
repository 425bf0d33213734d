"""Where work runs and how big things are: the compute device, the bytes a model holds, sizes for people."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def small_linear_algebra(device: torch.device):
    """Run small dense factorizations (a layer's Hessian: a few hundred to a few thousand rows) on one CPU thread.

    On some machines torch's MKL runs a 576x576 Cholesky + inverse 100x slower with two threads than with one
    (0.69 s vs 0.0066 s, issue 14), and the cost of one thread where threading helps is small at these sizes
    (1536x1536: 0.21 s vs 0.16 s on a machine without the cliff). GPUs are left alone.
    """
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
