"""Just-in-time build of llmq's CUDA kernels (torch's C++ extension tooling, ninja), cached per machine.

The first CUDA forward of a packed model builds llmq/runtime/kernels/cuda/{w4a16.cu, w4a16_tc.cu, binding.cpp} for the GPU in use
(about a minute) into ~/.cache/llmq/runtime/kernels/<source hash>; later runs load the cached library. If anything is
missing (no CUDA torch, no nvcc, no ninja) or the build fails, one line says why and the portable path
(dequantize + dense GEMM) is used instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from llmq.core import log

SOURCES = [Path(__file__).parent / "cuda" / name for name in ("w4a16.cu", "w4a16_tc.cu", "binding.cpp")]
HEADERS = [Path(__file__).parent / "cuda" / "w4_numbers.cuh"]
_extension = None
_failure: str | None = None


def cache_directory() -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:16]
    root = Path(os.environ.get("LLMQ_CACHE", Path.home() / ".cache" / "llmq"))
    return root / "kernels" / digest


def load_extension():
    """The compiled module (w4_linear, w4_linear_tc, w4_dequant), or None with the reason logged once."""
    global _extension, _failure
    if _extension is not None or _failure is not None:
        return _extension
    try:
        import torch
        from torch.utils import cpp_extension

        if not torch.cuda.is_available() or torch.version.cuda is None:
            raise RuntimeError("torch has no CUDA device")
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("no CUDA compiler (nvcc) found; set CUDA_HOME")
        directory = cache_directory()
        directory.mkdir(parents=True, exist_ok=True)
        _extension = cpp_extension.load(
            name="llmq_w4a16", sources=[str(p) for p in SOURCES], build_directory=str(directory),
            extra_cuda_cflags=["-O3"], extra_cflags=["-O3"],  # the C++ standard: torch's own choice for its headers
            verbose=bool(os.environ.get("LLMQ_BUILD_VERBOSE")))  # the compiler's own output, to debug a failing build
    except Exception as error:  # any build problem means: use the portable path, and say so once
        _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        log.info(f"llmq: CUDA kernel unavailable ({_failure}); packed Linears dequantize and use cuBLAS instead")
    return _extension
