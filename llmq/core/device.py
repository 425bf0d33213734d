"""Where work runs and how big things are: the compute device, the bytes a model holds, sizes for people."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math

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
        key = id(tensor) if tensor.is_meta else tensor.data_ptr()  # tensors left on disk (a lazy model) have none
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """No NaN or Inf in a floating-point `tensor`: the least and largest value of each chunk (one pass, NaN
    propagating, no temporary of the tensor's size) are finite. 25x faster than torch.isfinite(...).all() on this
    project's 2-core CPU (0.37 ms against 9.4 ms per 4M bf16 or float32 values). FP8 chunks are widened first
    (aminmax has no FP8 kernel)."""
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        least, largest = torch.aminmax(part.float() if part.element_size() == 1 else part)
        if not (math.isfinite(float(least)) and math.isfinite(float(largest))):
            return False
    return True


def human_size(n_bytes: float) -> str:
    """Decimal units, as file browsers and the hub show sizes."""
    for unit in ("B", "KB", "MB"):
        if n_bytes < 1000:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} GB"


SMALL_MATRIX = 4096  # rows below which factorizations run on one thread


@contextlib.contextmanager
def small_linear_algebra(device: torch.device, rows: int = 0):
    """Run small dense factorizations (a layer's Hessian below SMALL_MATRIX rows) on one CPU thread.

    On some machines torch's MKL runs a 576x576 Cholesky + inverse 100x slower with two threads than with one
    (0.69 s vs 0.0066 s, issue 14), and the cost of one thread where threading helps is small at these sizes
    (1536x1536: 0.21 s vs 0.16 s on a machine without the cliff). Large ones keep every thread: there the work
    dominates (the reference GPTQ's Cholesky, inverse, Cholesky on a 2-core machine without the cliff: 4096 rows
    3.6 s on one thread vs 2.1 s on two, 8192 rows 22.3 s vs 11.7 s; Llama-3-8B's down_proj has 14336).
    `python scripts/bench_gptq_sweep.py --threads` measures llmq's own factorization both ways. GPUs are left
    alone.
    """
    if device.type != "cpu" or torch.get_num_threads() == 1 or rows >= SMALL_MATRIX:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def return_freed_memory() -> None:
    """Give the memory freed since the last call back to the system (glibc's malloc_trim). Tensors freed in a
    layer leave holes in the C heap that later, differently sized tensors do not fill: without this a lazy run's
    resident memory grew ~14 MB a layer on a 1024-wide model (scripts/memory_by_depth.py); with it, it stays flat.
    Costs about a millisecond; called once per decoder layer."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
