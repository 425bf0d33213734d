"""Kernels of packed 4-bit Linears: the CPU paths and their dispatch, the CUDA kernels' maths in plain torch,
the CUDA source compiling for sm_80/sm_90 (nvcc, no GPU needed), and, on a GPU, the kernels themselves."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from llmq.targets.packing import pack_int32
from llmq.runtime.kernels import cuda as cuda_kernels
from llmq.runtime.kernels.cpu import INT4_MAX_ROWS
from llmq.core.scheme import QuantScheme
from llmq.runtime.modeling import QuantLinear, kernel_path

CUDA_SOURCE = Path(__file__).resolve().parents[1] / "llmq" / "runtime" / "kernels" / "cuda" / "w4a16.cu"


def random_quant_linear(n: int, k: int, group: int, symmetric: bool, seed: int = 0, bias: bool = True) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else k // group
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    zero = None if symmetric else pack_int32(torch.randint(-8, 8, (n, groups), generator=g, dtype=torch.int8), 4, dim=0)
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear(k, n, QuantScheme(4, group, symmetric), pack_int32(q, 4), scale, zero, b)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ---- CPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_cpu_paths_agree_with_dense_reference(symmetric, group):
    layer = random_quant_linear(96, 256, group, symmetric, seed=group + symmetric)
    dense = layer.dequantized_weight()
    limit = INT4_MAX_ROWS[torch.bfloat16]
    for rows in (1, 2, 3, limit, limit + 1):  # int4 kernel up to the dtype's limit, dequantize + GEMM above
        x = torch.randn(rows, 256)
        expected = x @ dense.T + layer.bias
        assert _rel(layer(x), expected) < 2e-6, rows
        assert _rel(layer(x.to(torch.bfloat16)), expected) < 2e-2, rows  # bf16 activations and output
    assert set(layer._repacked) == {"int4-cpu"}


def test_int4_layout_is_made_once_and_dropped_when_moved():
    layer = random_quant_linear(64, 128, 32, False)
    layer(torch.randn(1, 128, dtype=torch.bfloat16))
    assert len(layer._repacked) == 1
    first = next(iter(layer._repacked.values()))
    layer(torch.randn(1, 128, dtype=torch.bfloat16))
    assert next(iter(layer._repacked.values())) is first
    layer.to(torch.device("cpu"))
    assert layer._repacked == {}
    assert set(layer.state_dict()) == {"weight_packed", "weight_scale", "weight_zero_point", "bias"}


def test_kernel_path_names_the_cpu_path():
    assert "int4" in kernel_path("cpu", 4) and "dequantize" in kernel_path("cpu", 3)


# ---- the CUDA kernels' maths, on the CPU -----------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_repacked_layout_reproduces_the_checkpoint_weights(symmetric, group):
    layer = random_quant_linear(80, 512, group, symmetric, seed=3)
    packed = cuda_kernels.repack(layer.weight_packed, layer.weight_scale, layer.weight_zero_point, 512, 4)
    assert packed is not None and packed.qweight.data_ptr() == layer.weight_packed.data_ptr()  # no copy of the words
    # u * s - zs is one rounding away from (q - z) * s: equal to float32 precision
    dense = layer.dequantized_weight()
    assert torch.allclose(cuda_kernels.dequantize_w4(packed), dense, rtol=0, atol=2e-7 * dense.abs().max().item())
    x = torch.randn(5, 512, dtype=torch.float16)
    expected = (x.float() @ dense.T + layer.bias).to(torch.float16)
    assert _rel(cuda_kernels.reference_w4(x, packed, layer.bias), expected) < 1e-3


def test_kernel_refuses_what_it_cannot_take():
    assert cuda_kernels.repack(*_parts(random_quant_linear(64, 96, 32, True)), 96, 4) is None  # K % 64
    assert cuda_kernels.repack(*_parts(random_quant_linear(64, 128, 32, True)), 128, 3) is None  # 3-bit


def _parts(layer):
    return layer.weight_packed, layer.weight_scale, layer.weight_zero_point


def test_path_and_split_choice():
    assert [cuda_kernels.choose_path(m) for m in (1, 8, 9, 128, 129, 512)] == ["gemv", "gemv", "mma", "mma", "cublas",
                                                                              "cublas"]
    # 70B gate+up: 57344 rows fill 132 SMs; a 1024-row k/v projection needs K split
    assert cuda_kernels.choose_splits("gemv", 57344, 8192, 132) == 1
    assert cuda_kernels.choose_splits("mma", 1024, 4096, 132) == 8
    assert cuda_kernels.choose_splits("mma", 1024, 1024, 132) == 2  # at least 512 columns per split


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CI has it)")
def test_cuda_source_compiles_for_sm80_and_sm90(tmp_path):
    done = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-c", str(CUDA_SOURCE), "-o", str(tmp_path / "w4a16.o"),
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v"],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "spill stores" in done.stderr and " 0 bytes spill stores" in done.stderr
    assert "error" not in done.stderr.lower()


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parents[1] / "include"] if nvcc else []
    candidates += sorted(Path("/usr/local").glob("cuda*/include"))
    return next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None, reason="needs g++ and CUDA headers")
def test_torch_binding_compiles_against_torch_headers(tmp_path):
    """binding.cpp against this torch's headers (syntax and types; no GPU, no link). A CPU torch wheel lacks one
    generated CUDA header, c10/cuda/impl/cuda_cmake_macros.h, which only says how c10_cuda was built: stub it."""
    from torch.utils import cpp_extension

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(tmp_path), *cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(_cuda_include())]
    done = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=llmq_w4a16",
                           *(f"-I{i}" for i in includes), str(CUDA_SOURCE.with_name("binding.cpp"))],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# ---- on a GPU ------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_cuda_kernels_match_reference(dtype, symmetric):
    from llmq.kernels.build import load_extension

    extension = load_extension()
    assert extension is not None, "the CUDA kernel did not build"
    # fp16: the dequantized tile and the output round to fp16 -> 1e-3; bf16 keeps 8 bits of mantissa -> 2e-2
    tolerance = 1e-3 if dtype == torch.float16 else 2e-2
    g = torch.Generator().manual_seed(0)
    for case, (n, k, group) in enumerate([(256, 512, 32), (1000, 1536, 64), (4096, 4096, 128), (192, 576, -1),
                                          (8192, 1024, 128), (130, 2048, 64)]):
        layer = random_quant_linear(n, k, group, symmetric, seed=case).to("cuda")
        packed = cuda_kernels.repack(layer.weight_packed, layer.weight_scale, layer.weight_zero_point, k, 4)
        for m in (1, 2, 5, 8, 9, 16, 33, 64, 65, 128, 129, 200):
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            expected = cuda_kernels.reference_w4(x, packed, layer.bias)
            for path in [p for p, top in (("gemv", 8), ("mma", 128)) if m <= top] or ["cublas"]:
                out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)  # poisoned: all must be written
                y = cuda_kernels.w4_linear_cuda(extension, x, packed, layer.bias, out=out, path=path)
                torch.cuda.synchronize()
                assert torch.isfinite(y).all(), (n, k, group, m, path)
                assert _rel(y, expected) < tolerance, (n, k, group, m, path, _rel(y, expected))


@gpu
def test_quant_linear_on_gpu_uses_the_kernel_and_matches_cpu():
    layer = random_quant_linear(512, 1024, 128, False)
    x = torch.randn(3, 7, 1024)
    expected = layer(x)
    layer = layer.to("cuda")
    y = layer(x.to("cuda", torch.float16))
    assert layer._repacked.get("w4a16") is not None
    assert _rel(y.cpu(), expected) < 2e-3
