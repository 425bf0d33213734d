"""Run GGUF files in llama.cpp itself (llama-cpp-python, an optional dependency): load, generate, perplexity."""

from __future__ import annotations

import contextlib
import math

import numpy as np

from llmq.calib.models import check_gguf
from llmq.core.errors import LlmqError, reason


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LlmqError("llama-cpp-python is not installed; pip install llama-cpp-python") from None
    return llama_cpp


@contextlib.contextmanager
def open_llama(path, n_ctx: int = 512, logits_all: bool = False, n_threads: int | None = None):
    """A llama_cpp.Llama for `path`, closed on exit.

    Weight repacking ("extra buffer types") is turned off: llama.cpp 0.3.x's AMX matmul crashes on some
    Sapphire Rapids CPUs (this project's CI machine among them); the plain CPU kernels compute the same thing.
    Threads: torch's count unless given, for single tokens and batches alike (llama-cpp-python's own default
    takes every CPU for batches, and ggml's threads spin: beside other work that slows both).
    """
    n_threads = n_threads or _threads()
    llama_cpp = _llama_cpp()
    module = llama_cpp.llama  # the high-level module reads the C defaults through its own reference
    original = module.llama_cpp.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    check_gguf(path)
    module.llama_cpp.llama_model_default_params = defaults
    try:
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, n_threads=n_threads,
                              n_threads_batch=n_threads)
    except ValueError as error:  # llama.cpp refused the file ("Failed to load model from file")
        raise LlmqError(f"llama.cpp cannot load {path} ({reason(error)}); re-create it") from None
    finally:
        module.llama_cpp.llama_model_default_params = original
    try:
        yield llm
    finally:
        llm.close()


def llamacpp_perplexity(path, text: str, n_ctx: int = 512, max_chunks: int = 150) -> tuple[float, int]:
    """llama.cpp's `perplexity` protocol: chunks of n_ctx tokens, each scored on its second half.

    Returns (perplexity, chunks). The first token of a chunk becomes BOS when the model adds one.
    """
    with open_llama(path, n_ctx=n_ctx, logits_all=True) as llm:
        add_bos = llm._model.add_bos_token()
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
        chunks = min(max_chunks, len(tokens) // n_ctx)
        first = n_ctx // 2
        nll, count = 0.0, 0
        for i in range(chunks):
            chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
            if add_bos:
                chunk = [llm.token_bos(), *chunk[1:]]
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[: n_ctx - 1], dtype=np.float64)[first:]
            targets = np.asarray(chunk[first + 1 :])
            logits -= logits.max(-1, keepdims=True)
            logprobs = logits[np.arange(len(targets)), targets] - np.log(np.exp(logits).sum(-1))
            nll -= logprobs.sum()
            count += len(targets)
    return math.exp(nll / count), chunks


# ---- llama.cpp's own quantizer, for side-by-side comparisons -----------------------------------------------


def _ggml_base():
    import ctypes
    import os

    llama_cpp = _llama_cpp()
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def llamacpp_quantize_tensor(weight: np.ndarray, qtype, importance: np.ndarray | None = None) -> np.ndarray:
    """The bytes llama.cpp's quantizer (ggml_quantize_chunk) writes for weight [rows, cols], imatrix optional."""
    from gguf import GGML_QUANT_SIZES

    x = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = x.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, cols // block * size), dtype=np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    _ggml_base().ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                     None if imp is None else imp.ctypes.data)
    return out


def llamacpp_quantize_file(source, target, file_type: int, threads: int | None = None,
                           imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama-quantize: re-encode a GGUF file into a mixture (file_type: gguf.LlamaFileType); `imatrix`: GGUF
    tensor name -> importance (mean x², every expert's row in one vector), as llama-quantize --imatrix passes it."""
    import ctypes

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = threads or _threads()
    if imatrix:
        arrays = {name: np.ascontiguousarray(values, dtype=np.float32).reshape(-1) for name, values in imatrix.items()}
        entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()  # terminated by an empty entry
        for entry, (name, values) in zip(entries, arrays.items()):
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise LlmqError(f"llama.cpp could not quantize {source}")
