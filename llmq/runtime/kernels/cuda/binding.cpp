// torch binding of the W4A16 kernels in w4a16.cu and w4a16_tc.cu: argument checks, workspace, stream; no maths here.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

void llmq_w4_gemv(int dtype, int M, const void* x, const uint32_t* qw, const __half* s, const uint8_t* zeros,
                  const void* bias, void* y, float* workspace, int N, int K, int group, int splits, cudaStream_t stream);
void llmq_w4_mma(int dtype, int M, const void* x, const uint32_t* qw, const __half* s, const uint8_t* zeros,
                 const void* bias, void* y, float* workspace, int N, int K, int group, int splits, cudaStream_t stream);
void llmq_w4_tc(int dtype, int M, const void* x, const int32_t* tiles, const __half* s, const uint8_t* zeros,
                const void* bias, void* y, float* workspace, int N, int K, int group, int splits, cudaStream_t stream);
void llmq_w4_dequant(int dtype, const uint32_t* qw, const __half* s, const uint8_t* zeros, void* w, int N, int K, int group,
                     cudaStream_t stream);

namespace {

int dtype_code(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kHalf) return 0;
  if (t.scalar_type() == torch::kBFloat16) return 1;
  TORCH_CHECK(false, "llmq W4A16 kernel: activations must be float16 or bfloat16, got ", t.scalar_type());
}

void check_weights(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t K,
                   int64_t group) {
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == torch::kInt32 && qweight.is_contiguous() &&
                  qweight.dim() == 2 && qweight.size(1) * 8 == K,
              "qweight must be a contiguous CUDA int32 [N, K/8] tensor");
  TORCH_CHECK(K % 64 == 0 && group % 32 == 0 && K % group == 0, "K must be a multiple of 64 and of the group size, "
              "the group size a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && zeros.scalar_type() == torch::kByte,
              "scales must be float16 and zeros uint8");
  for (const auto* t : {&scales, &zeros})
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->size(0) == qweight.size(0) && t->size(1) == K / group,
                "scales / zeros must be contiguous CUDA [N, K/group] tensors");
}

void check_activations(const torch::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "x must be a contiguous, 16-byte aligned CUDA [M, K] tensor");
}

// The bias pointer (nullptr without one), checked against x's dtype and N.
const void* bias_pointer(const std::optional<torch::Tensor>& bias, const torch::Tensor& x, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N,
              "bias must be [N] in x's dtype");
  return bias->data_ptr();
}

// Split-K partial sums go into a zeroed float32 [M, N] workspace (undefined when splits == 1) ...
torch::Tensor split_workspace(int64_t splits, int64_t M, int64_t N, const torch::Tensor& x) {
  TORCH_CHECK(splits >= 1, "splits must be >= 1");
  return splits > 1 ? torch::zeros({M, N}, x.options().dtype(torch::kFloat)) : torch::Tensor();
}

// ... and reach `out` (with the bias) once every split has added its part.
void finish_splits(const torch::Tensor& workspace, const std::optional<torch::Tensor>& bias, torch::Tensor& out) {
  if (!workspace.defined()) return;
  if (bias.has_value() && bias->defined()) workspace.add_(bias->to(torch::kFloat));
  out.copy_(workspace);
}

}  // namespace

// out = x @ W^T (+ bias) into the preallocated `out` [M, N]; path 0: gemv (M <= 8), 1: tensor cores (M <= 128).
torch::Tensor w4_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                        std::optional<torch::Tensor> bias, int64_t group, int64_t path, int64_t splits,
                        torch::Tensor out) {
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  check_activations(x);
  check_weights(qweight, scales, zeros, K, group);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == x.scalar_type() && out.size(0) == M && out.size(1) == N,
              "out must be a contiguous [M, N] tensor of x's dtype");
  TORCH_CHECK((path == 0 && M <= 8) || (path == 1 && M <= 128), "path 0 takes M <= 8, path 1 M <= 128");
  const c10::cuda::CUDAGuard guard(x.device());
  const int code = dtype_code(x);
  const void* bias_ptr = bias_pointer(bias, x, N);
  torch::Tensor workspace = split_workspace(splits, M, N, x);
  float* ws = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto qw = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  if (path == 0)
    llmq_w4_gemv(code, (int)M, x.data_ptr(), qw, reinterpret_cast<const __half*>(scales.data_ptr<at::Half>()), zeros.data_ptr<uint8_t>(), bias_ptr,
                 out.data_ptr(), ws, (int)N, (int)K, (int)group, (int)splits, stream);
  else
    llmq_w4_mma(code, (int)M, x.data_ptr(), qw, reinterpret_cast<const __half*>(scales.data_ptr<at::Half>()), zeros.data_ptr<uint8_t>(), bias_ptr,
                out.data_ptr(), ws, (int)N, (int)K, (int)group, (int)splits, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_splits(workspace, bias, out);
  return out;
}

// out = x @ W^T (+ bias) by the fragment-ordered tensor-core kernel (w4a16_tc.cu; layout: fragments.py), any M.
torch::Tensor w4_linear_tc(torch::Tensor x, torch::Tensor tiles, torch::Tensor scales, torch::Tensor zeros,
                           std::optional<torch::Tensor> bias, int64_t group, int64_t splits, torch::Tensor out) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), column_blocks = (N + 63) / 64;
  check_activations(x);
  TORCH_CHECK(K % 64 == 0 && group % 16 == 0 && K % group == 0,
              "K must be a multiple of 64 and of the group size, the group size a multiple of 16");
  TORCH_CHECK(tiles.is_cuda() && tiles.scalar_type() == torch::kInt32 && tiles.is_contiguous() && tiles.dim() == 4 &&
                  tiles.size(0) == column_blocks && tiles.size(1) == K / 16 && tiles.size(2) == 32 && tiles.size(3) == 4,
              "tiles must be a contiguous CUDA int32 [ceil(N/64), K/16, 32, 4] tensor");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && zeros.scalar_type() == torch::kByte,
              "scales must be float16 and zeros uint8");
  for (const auto* t : {&scales, &zeros})
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->dim() == 4 && t->size(0) == K / group &&
                    t->size(1) == column_blocks && t->size(2) == 8 && t->size(3) == 8,
                "scales / zeros must be contiguous CUDA [K/group, ceil(N/64), 8, 8] tensors");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == x.scalar_type() && out.size(0) == M,
              "out must be a contiguous [M, N] tensor of x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const void* bias_ptr = bias_pointer(bias, x, N);
  torch::Tensor workspace = split_workspace(splits, M, N, x);
  llmq_w4_tc(dtype_code(x), (int)M, x.data_ptr(), tiles.data_ptr<int32_t>(),
             reinterpret_cast<const __half*>(scales.data_ptr<at::Half>()), zeros.data_ptr<uint8_t>(), bias_ptr,
             out.data_ptr(), workspace.defined() ? workspace.data_ptr<float>() : nullptr, (int)N, (int)K,
             (int)group, (int)splits, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_splits(workspace, bias, out);
  return out;
}

// The dense [N, K] weight in `dtype` (float16 / bfloat16), for cuBLAS at large M.
torch::Tensor w4_dequant(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t group,
                         torch::Tensor like) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 8;
  check_weights(qweight, scales, zeros, K, group);
  const c10::cuda::CUDAGuard guard(qweight.device());
  auto w = torch::empty({N, K}, like.options());
  llmq_w4_dequant(dtype_code(like), reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>()),
                  reinterpret_cast<const __half*>(scales.data_ptr<at::Half>()), zeros.data_ptr<uint8_t>(), w.data_ptr(), (int)N, (int)K, (int)group,
                  c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w4_linear", &w4_linear, "llmq W4A16 linear (gemv or tensor-core path)");
  m.def("w4_linear_tc", &w4_linear_tc, "llmq W4A16 linear, fragment-ordered tensor-core kernel");
  m.def("w4_dequant", &w4_dequant, "llmq W4 dequantize to float16/bfloat16");
}
