"""Kernels of packed 4-bit Linears: the CPU paths and their dispatch, the CUDA kernels' maths in plain torch,
the CUDA source compiling for sm_80/sm_90 (nvcc, no GPU needed), and, on a GPU, the kernels themselves."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from llmq.core.scheme import QuantScheme
from llmq.runtime.kernels import cuda as cuda_kernels
from llmq.runtime.kernels import fragments
from llmq.runtime.kernels.cpu import INT4_MAX_ROWS
from llmq.runtime.modeling import QuantLinear, kernel_path
from llmq.targets.packing import pack_int32

CUDA_DIR = Path(__file__).resolve().parents[1] / "llmq" / "runtime" / "kernels" / "cuda"


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
    # tc: one block (128 columns) per SM; 8B o (N 4096: 32 blocks) splits 5 ways, 8B down (K 14336) too
    assert cuda_kernels.choose_splits("tc", 4096, 4096, 132) == 5
    assert cuda_kernels.choose_splits("tc", 57344, 8192, 132) == 1
    assert cuda_kernels.choose_splits("tc", 1024, 512, 132) == 2  # at least one 256-k stage per split


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CI has it)")
@pytest.mark.parametrize("source", ["w4a16.cu", "w4a16_tc.cu"])
def test_cuda_source_compiles_for_sm80_and_sm90(source, tmp_path):
    done = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-c", str(CUDA_DIR / source), "-o", str(tmp_path / "kernel.o"),
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v"],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    spills = [line for line in done.stderr.splitlines() if "spill" in line]
    assert spills and all(" 0 bytes spill stores, 0 bytes spill loads" in line for line in spills), spills
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
                           *(f"-I{i}" for i in includes), str(CUDA_DIR / "binding.cpp")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# ---- on a GPU ------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_cuda_kernels_match_reference(dtype, symmetric):
    from llmq.runtime.kernels.build import load_extension

    extension = load_extension()
    assert extension is not None, "the CUDA kernel did not build"
    # fp16: the dequantized tile and the output round to fp16 -> 1e-3; bf16 keeps 8 bits of mantissa -> 2e-2
    tolerance = 1e-3 if dtype == torch.float16 else 2e-2
    g = torch.Generator().manual_seed(0)
    for case, (n, k, group) in enumerate([(256, 512, 32), (1000, 1536, 64), (4096, 4096, 128), (192, 576, -1),
                                          (8192, 1024, 128), (130, 2048, 64)]):
        layer = random_quant_linear(n, k, group, symmetric, seed=case).to("cuda")
        packed = cuda_kernels.repack(layer.weight_packed, layer.weight_scale, layer.weight_zero_point, k, 4)
        fragment = fragments.from_packed(packed)  # made on the GPU, as QuantLinear makes it
        for m in (1, 2, 5, 8, 9, 16, 33, 64, 65, 128, 129, 200):
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            expected = cuda_kernels.reference_w4(x, packed, layer.bias)
            for path in ([p for p, top in (("gemv", 8), ("mma", 128)) if m <= top] or ["cublas"]) + ["tc"]:
                out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)  # poisoned: all must be written
                y = cuda_kernels.w4_linear_cuda(extension, x, packed, layer.bias, out=out, path=path, fragment=fragment)
                torch.cuda.synchronize()
                assert torch.isfinite(y).all(), (n, k, group, m, path)
                assert _rel(y, expected) < tolerance, (n, k, group, m, path, _rel(y, expected))


@gpu
def test_fragment_layout_made_on_the_gpu_equals_the_cpu_one():
    layer, packed = _packed_w4(200, 512, 64, False)
    on_cpu = fragments.from_packed(packed)
    on_gpu = fragments.from_packed(cuda_kernels.repack(*_parts(layer.to("cuda")), 512, 4))
    for name in ("tiles", "scales", "zeros"):
        assert torch.equal(getattr(on_gpu, name).cpu(), getattr(on_cpu, name)), name


@gpu
@pytest.mark.parametrize("kernel", ["by M", "tc"])
def test_quant_linear_on_gpu_uses_the_kernel_and_matches_cpu(kernel, monkeypatch):
    if kernel == "tc":
        monkeypatch.setenv("LLMQ_W4_KERNEL", "tc")
    layer = random_quant_linear(512, 1024, 128, False)
    x = torch.randn(3, 7, 1024)
    expected = layer(x)
    layer = layer.to("cuda")
    y = layer(x.to("cuda", torch.float16))
    assert layer._repacked.get("w4a16") is not None
    assert (layer._repacked.get("w4a16-tc") is not None) == (kernel == "tc")
    assert _rel(y.cpu(), expected) < 2e-3


# ---- the fragment-ordered tensor-core kernel (cuda/w4a16_tc.cu): its layout and index maths, on the CPU ------------


def _packed_w4(n: int, k: int, group: int, symmetric: bool, seed: int = 0):
    layer = random_quant_linear(n, k, group, symmetric, seed=seed)
    return layer, cuda_kernels.repack(layer.weight_packed, layer.weight_scale, layer.weight_zero_point, k, 4)


@pytest.mark.parametrize("n", [64, 130, 200])
def test_fragment_layout_round_trips_the_checkpoint_integers(n):
    """Each lane's registers, read at the PTX ISA's B-fragment positions, give back every checkpoint integer."""
    layer, packed = _packed_w4(n, 256, 64, False, seed=n)
    frag = fragments.from_packed(packed)
    assert frag.tiles.shape == (-(-n // 64), 256 // 16, 32, 4) and frag.tiles.dtype == torch.int32
    u = ((packed.qweight.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF).reshape(n, 256)
    assert torch.equal(fragments.unpack_fragments(frag), u.to(torch.uint8))
    # scales and zeros: lane group g, slot j is column 64c + 8j + g
    q, c, g, j = 2, frag.scales.shape[1] - 1, 5, 3
    column = 64 * c + 8 * j + g
    if column < n:
        assert frag.scales[q, c, g, j] == packed.scales[column, q] and frag.zeros[q, c, g, j] == packed.zeros[column, q]


def test_fragment_word_bits_match_the_drawing():
    """Lane 5 (g 1, t 1), word 1: nibble 0 is B[k 2, n 16+1], nibble 4 is k 3, nibble 1 k 10, nibble 3 n 24+1, k 10."""
    position = lambda i: tuple(int(v) for v in fragments.nibble_position(torch.tensor(5), torch.tensor(1), torch.tensor(i)))
    assert [position(i) for i in (0, 4, 1, 5, 2, 3, 7)] == [(2, 17), (3, 17), (10, 17), (11, 17), (2, 25), (10, 25), (11, 25)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n, k, group, symmetric, m, splits", [
    (128, 256, 64, False, 1, 1),
    (130, 576, 576, True, 5, 1),    # ragged N (a block's second warp past N), per channel, K not a stage multiple
    (128, 512, 32, False, 17, 3),   # two 16-row tiles, groups of 32 (two per chunk), K split 3 ways (3, 3, 2 chunks)
    (64, 512, 128, True, 70, 2),    # two row passes (64 + 6 rows), one warp column of two
])
def test_emulated_tensor_core_kernel_matches_the_reference(dtype, n, k, group, symmetric, m, splits):
    """The kernel's partition, fragment loads, register dequantization, mma maps and reductions, emulated lane by
    lane, against float32 maths on the dequantized weights; the tolerance is the one rounding of each weight to the
    activation dtype (as the kernel's half2 multiply does) and of the output."""
    layer, packed = _packed_w4(n, k, group, symmetric, seed=k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = fragments.emulate(x, fragments.from_packed(packed), layer.bias, splits=splits, dtype=dtype)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel(y, cuda_kernels.reference_w4(x, packed, layer.bias)) < (2e-3 if dtype == torch.float16 else 2e-2)
    # and exactly what it should be with each weight rounded to the activation dtype first
    rounded = cuda_kernels.dequantize_w4(packed).to(dtype).float()
    assert _rel(y, (x.float() @ rounded.T + layer.bias).to(dtype)) < (1e-3 if dtype == torch.float16 else 8e-3)
