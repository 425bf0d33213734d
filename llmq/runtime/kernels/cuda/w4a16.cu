// llmq W4A16 kernels: y[M, N] = x[M, K] @ W^T, W 4-bit with group-wise scales (fp16 or bf16 activations).
//
// Weight layout (the checkpoint's own, reinterpreted; nothing reordered):
//   qweight  uint32 [N, K / 8]   word j of row n holds W[n, 8j .. 8j+7], value i in bits 4i..4i+3, unsigned u in 0..15
//   scales   half   [N, K / g]   s
//   zeros    uint8  [N, K / g]   u_zero (symmetric: 8);  W[n, k] = u * s - u_zero * s
// 3 bytes per group beside the 4-bit weights. Nibbles become numbers by the exact 'magic number' trick below
// (no int->float conversion instructions); the reference (llmq/runtime/kernels/cuda.py: reference_w4) computes the same
// values in float32, and the kernels agree with it to float32 (gemv) or to one rounding of each weight to the
// activation dtype (tensor cores).
// g (group size) is a multiple of 32, or K (per channel). Act-order checkpoints of llmq use static groups, so
// no permutation is needed at run time.
//
// Three paths, chosen by the host (llmq/runtime/kernels/cuda.py) from M:
//   gemv  M <= 8: memory-bound. A warp owns four (M <= 2) or two output rows and streams them once with 16-byte loads
//         (32 weights per lane per load, the next chunk requested before this one's arithmetic), dequantizes in
//         registers and keeps M float accumulators per row; the scale multiplies once per 32-weight chunk.
//         Split-K over gridDim.y (float atomics into a zeroed workspace) when N alone gives too few blocks.
//   mma   8 < M <= 128: tensor cores (WMMA 16x16x16), compiled for 1, 2, 4 or 8 tiles of 16 rows so that small
//         M keeps registers and shared memory small. A block owns 64 output columns; per 64-wide K step it
//         dequantizes its 64x64 weight tile into shared memory once and multiplies every 16-row M tile by it;
//         the next step's weight words are loaded into registers while the tensor cores work (a register
//         double buffer). Split-K as above.
//   dequant  M > 128: W dequantized once into a dense fp16/bf16 buffer; the host then calls cuBLAS.
//
// This translation unit includes no torch header, so CI compiles it with nvcc alone for sm_80 and sm_90.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include "w4_numbers.cuh"

namespace llmq {

// ---- 4-bit fields to numbers without int->float conversions ----------------------------------------------------
// An int->float conversion is a quarter-rate instruction; with one per weight the first version of these kernels
// was compute-bound. Instead a nibble is OR-ed into the low mantissa bits of a float whose last mantissa bit is
// worth 1, and the float's own value is subtracted: exact, one integer and one float instruction.

// The eight values u_b - z of one word as floats. Nibble b sits at bits 4b..4b+3; OR-ed, in place, into the float
// 2^(23-4b), whose mantissa bit 4b is worth exactly 1, it reads as 2^(23-4b) + u_b (one LOP3, no shift). That
// holds while the nibble stays inside the 23 mantissa bits (b <= 4); nibbles 5..7 are taken from word >> 16 at
// positions 1..3. magic_plus_zero[j] = 2^(23-4j) + z.
__device__ __forceinline__ void nibbles_minus_zero(uint32_t word, const float* magic_plus_zero, float* out) {
  const uint32_t high = word >> 16;
#pragma unroll
  for (int b = 0; b < 8; ++b) {
    const int j = b < 5 ? b : b - 4;
    const uint32_t bits = ((b < 5 ? word : high) & (0xFu << (4 * j))) | ((150u - 4 * j) << 23);
    out[b] = __uint_as_float(bits) - magic_plus_zero[j];
  }
}

// The same two at a time for 16-bit types: Pair<T> (w4_numbers.cuh).
// The eight weights of one word, in column order: out[b] = (u_b - z) * s.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t word, typename Pair<T>::type base_plus_zero,
                                             typename Pair<T>::type scale, T* out) {
  using P = Pair<T>;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t bits = ((word >> (4 * i)) & 0x000F000Fu) | P::magic;
    typename P::type v;
    memcpy(&v, &bits, sizeof(bits));
    v = __hmul2(__hsub2(v, base_plus_zero), scale);
    out[i] = low_of(v);
    out[i + 4] = high_of(v);
  }
}


// ---- gemv: M <= 8 ------------------------------------------------------------------------------------------

constexpr int GEMV_WARPS = 4;
// Rows per warp: 4 for M <= 2 (each activation converted to float once serves four rows), 2 above (registers).
__host__ __device__ constexpr int gemv_rows_per_warp(int M) { return M <= 2 ? 4 : 2; }

// Eight activations x[m, k .. k+7] as floats (one 16-byte load).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* out) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float<T>(v[i]);
}

// One lane's 32-weight chunk of each of the warp's R rows (one group), held in registers.
template <int R>
struct GemvChunk {
  uint32_t words[R][4];
  float scale[R];
  float zero[R];
};

template <int R>
__device__ __forceinline__ GemvChunk<R> fetch_chunk(const uint32_t* __restrict__ qweight, const __half* __restrict__ scales,
                                                    const uint8_t* __restrict__ zeros, int row0, int N, int K, int group,
                                                    int c) {
  GemvChunk<R> chunk;
  const int groups = K / group, gi = c * 32 / group;  // the 32 weights of a chunk share one group
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = min(row0 + r, N - 1);  // a row past N computes a copy of the last one and is not written
    const uint4 words = reinterpret_cast<const uint4*>(qweight + (size_t)n * (K / 8))[c];
    chunk.words[r][0] = words.x; chunk.words[r][1] = words.y; chunk.words[r][2] = words.z; chunk.words[r][3] = words.w;
    chunk.scale[r] = __half2float(scales[(size_t)n * groups + gi]);
    chunk.zero[r] = float(zeros[(size_t)n * groups + gi]);
  }
  return chunk;
}

template <typename T, int M>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_w4_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight, const __half* __restrict__ scales,
               const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
               float* __restrict__ workspace, int N, int K, int group, int chunks_per_split) {
  constexpr int R = gemv_rows_per_warp(M);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * GEMV_WARPS + warp) * R;
  const int chunks = K / 32;  // 16-byte chunks of 32 weights per row
  const int chunk_begin = blockIdx.y * chunks_per_split;
  const int chunk_end = min(chunks, chunk_begin + chunks_per_split);

  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  // Register double buffer: the next chunk's weights are requested before this chunk's arithmetic.
  int c = chunk_begin + lane;
  GemvChunk<R> current;
  if (c < chunk_end) current = fetch_chunk<R>(qweight, scales, zeros, row0, N, K, group, c);
  for (; c < chunk_end; c += 32) {
    GemvChunk<R> next;
    if (c + 32 < chunk_end) next = fetch_chunk<R>(qweight, scales, zeros, row0, N, K, group, c + 32);
    float magic_plus_zero[R][5];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < 5; ++j) magic_plus_zero[r][j] = float(1 << (23 - 4 * j)) + current.zero[r];
    // sum over the chunk of (u - z) * x, then one multiply by the group's scale
    float partial[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) partial[r][m] = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // 8 weights per word; the activations of those 8 columns once per word
      float xs[M][8];
#pragma unroll
      for (int m = 0; m < M; ++m) load8<T>(x + (size_t)m * K + c * 32 + 8 * q, xs[m]);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float w[8];
        nibbles_minus_zero(current.words[r][q], magic_plus_zero[r], w);
#pragma unroll
        for (int b = 0; b < 8; ++b)
#pragma unroll
          for (int m = 0; m < M; ++m) partial[r][m] = fmaf(w[b], xs[m][b], partial[r][m]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = fmaf(partial[r][m], current.scale[r], acc[r][m]);
    current = next;
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      const int n = row0 + r;
      if (lane == 0 && n < N) {
        if (gridDim.y == 1) {
          if (bias != nullptr) v += to_float<T>(bias[n]);
          y[(size_t)m * N + n] = from_float<T>(v);
        } else {
          atomicAdd(workspace + (size_t)m * N + n, v);
        }
      }
    }
  }
}

// ---- mma: 8 < M <= 128, tensor cores -------------------------------------------------------------------------

constexpr int MMA_N_TILE = 64;   // output columns per block: 4 warps x 16
constexpr int MMA_K_TILE = 64;
constexpr int MMA_PAD = 8;       // shared-memory row padding (halves) against bank conflicts
constexpr int MMA_THREADS = 128;

// Shared memory of one block with MT tiles of 16 rows: the x and W tiles during the K loop, then (reusing the
// same bytes) the float output tile. At most 34 KB (MT = 8), under the 48 KB of static shared memory.
template <typename T, int MT>
union MmaShared {
  struct {
    T a[MT * 16][MMA_K_TILE + MMA_PAD];     // x[m, k .. k+63]
    T b[MMA_N_TILE][MMA_K_TILE + MMA_PAD];  // W[n, k .. k+63], read as a col-major B operand
  } in;
  float c[MT * 16][MMA_N_TILE + 4];
};

// What one thread loads per K step, held in registers one step ahead: 32 weights of one row (one group) and
// MT 16-byte pieces of the x tile.
template <int MT>
struct MmaStage {
  uint4 words;
  float scale, zero;
  uint4 a[MT];
};

template <typename T, int MT>
__device__ __forceinline__ MmaStage<MT> fetch_stage(const T* __restrict__ x, const uint32_t* __restrict__ qweight,
                                                    const __half* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                                    int M, int N, int K, int group, int n, int k, int b_col) {
  MmaStage<MT> stage;
  stage.words = make_uint4(0, 0, 0, 0);  // rows past N dequantize to (0 - 0) * 0 = 0
  stage.scale = 0.f;
  stage.zero = 0.f;
  if (n < N && k < K) {
    const int groups = K / group, gi = (k + b_col) / group;
    stage.words = *reinterpret_cast<const uint4*>(qweight + (size_t)n * (K / 8) + (k + b_col) / 8);
    stage.scale = __half2float(scales[(size_t)n * groups + gi]);
    stage.zero = float(zeros[(size_t)n * groups + gi]);
  }
#pragma unroll
  for (int j = 0; j < MT; ++j) {  // piece i of the tile: row i / 8, columns (i % 8) * 8 .. +7; rows >= M are zero
    const int i = threadIdx.x + j * MMA_THREADS, m = i / (MMA_K_TILE / 8), col = (i % (MMA_K_TILE / 8)) * 8;
    stage.a[j] = make_uint4(0, 0, 0, 0);
    if (m < M && k < K) stage.a[j] = *reinterpret_cast<const uint4*>(x + (size_t)m * K + k + col);
  }
  return stage;
}

template <typename T, int MT>
__global__ void __launch_bounds__(MMA_THREADS)
mma_w4_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight, const __half* __restrict__ scales,
              const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
              float* __restrict__ workspace, int M, int N, int K, int group, int k_per_split) {
  using namespace nvcuda;
  using P = Pair<T>;
  __shared__ __align__(32) MmaShared<T, MT> smem;

  const int warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * MMA_N_TILE;
  const int k_begin = blockIdx.y * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
  // this thread's slice of the W tile: row b_row, columns b_col .. b_col+31
  const int b_row = threadIdx.x >> 1, b_col = (threadIdx.x & 1) * 32;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) wmma::fill_fragment(acc[t], 0.f);

  // Software pipeline: step k+64's weights and activations are requested into registers before the
  // tensor-core work of step k, so their memory latency hides behind it.
  MmaStage<MT> next = fetch_stage<T, MT>(x, qweight, scales, zeros, M, N, K, group, n0 + b_row, k_begin, b_col);
  for (int k = k_begin; k < k_end; k += MMA_K_TILE) {
    const MmaStage<MT> stage = next;
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int i = threadIdx.x + j * MMA_THREADS;
      *reinterpret_cast<uint4*>(&smem.in.a[i / (MMA_K_TILE / 8)][(i % (MMA_K_TILE / 8)) * 8]) = stage.a[j];
    }
    {  // dequantize this thread's 32 weights, 8 per 16-byte shared-memory store
      const uint32_t w4[4] = {stage.words.x, stage.words.y, stage.words.z, stage.words.w};
      const typename P::type base_plus_zero = P::splat(P::base + stage.zero), scale = P::splat(stage.scale);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        alignas(16) T v[8];
        dequant_word<T>(w4[q], base_plus_zero, scale, v);
        *reinterpret_cast<uint4*>(&smem.in.b[b_row][b_col + 8 * q]) = *reinterpret_cast<const uint4*>(v);
      }
    }
    __syncthreads();
    if (k + MMA_K_TILE < k_end)
      next = fetch_stage<T, MT>(x, qweight, scales, zeros, M, N, K, group, n0 + b_row, k + MMA_K_TILE, b_col);
#pragma unroll
    for (int kk = 0; kk < MMA_K_TILE; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag;
      wmma::load_matrix_sync(b_frag, &smem.in.b[warp * 16][kk], MMA_K_TILE + MMA_PAD);
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
        wmma::load_matrix_sync(a_frag, &smem.in.a[t * 16][kk], MMA_K_TILE + MMA_PAD);
        wmma::mma_sync(acc[t], a_frag, b_frag, acc[t]);
      }
    }
    __syncthreads();  // the tiles are rewritten next step, and reused as the output tile after the loop
  }

#pragma unroll
  for (int t = 0; t < MT; ++t)
    wmma::store_matrix_sync(&smem.c[t * 16][warp * 16], acc[t], MMA_N_TILE + 4, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < M * MMA_N_TILE; i += MMA_THREADS) {
    const int m = i / MMA_N_TILE, n = n0 + i % MMA_N_TILE;
    if (n >= N) continue;
    float v = smem.c[m][i % MMA_N_TILE];
    if (gridDim.y == 1) {
      if (bias != nullptr) v += to_float<T>(bias[n]);
      y[(size_t)m * N + n] = from_float<T>(v);
    } else {
      atomicAdd(workspace + (size_t)m * N + n, v);
    }
  }
}

// ---- dequant: M > 128, then cuBLAS ---------------------------------------------------------------------------

template <typename T>
__global__ void dequant_w4_kernel(const uint32_t* __restrict__ qweight, const __half* __restrict__ scales,
                                  const uint8_t* __restrict__ zeros, T* __restrict__ w, int N, int K, int group) {
  using P = Pair<T>;
  const size_t words = (size_t)N * (K / 8);
  const int groups = K / group;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < words; i += (size_t)gridDim.x * blockDim.x) {
    const size_t n = i / (K / 8);
    const int k0 = (int)(i % (K / 8)) * 8;
    const float s = __half2float(scales[n * groups + k0 / group]);
    const float z = float(zeros[n * groups + k0 / group]);
    alignas(16) T out[8];
    dequant_word<T>(qweight[i], P::splat(P::base + z), P::splat(s), out);
    *reinterpret_cast<uint4*>(w + n * K + k0) = *reinterpret_cast<const uint4*>(out);
  }
}

// ---- host launchers (raw pointers; the torch binding lives in binding.cpp) -----------------------------------

template <typename T, int M>
static void launch_gemv(const void* x, const uint32_t* qw, const __half* s, const uint8_t* zeros, const void* bias, void* y,
                        float* workspace, int N, int K, int group, int splits, cudaStream_t stream) {
  const int chunks = K / 32;
  const int per_split = (chunks + splits - 1) / splits;
  constexpr int rows_per_block = GEMV_WARPS * gemv_rows_per_warp(M);
  dim3 grid((N + rows_per_block - 1) / rows_per_block, splits);
  gemv_w4_kernel<T, M><<<grid, GEMV_WARPS * 32, 0, stream>>>(
      static_cast<const T*>(x), qw, s, zeros, static_cast<const T*>(bias), static_cast<T*>(y), workspace, N, K, group,
      per_split);
}

template <typename T, int MT>
static void launch_mma(int M, const void* x, const uint32_t* qw, const __half* s, const uint8_t* zeros, const void* bias,
                       void* y, float* workspace, int N, int K, int group, int splits, cudaStream_t stream) {
  const int k_tiles = K / MMA_K_TILE;
  const int per_split = ((k_tiles + splits - 1) / splits) * MMA_K_TILE;
  dim3 grid((N + MMA_N_TILE - 1) / MMA_N_TILE, splits);
  mma_w4_kernel<T, MT><<<grid, MMA_THREADS, 0, stream>>>(
      static_cast<const T*>(x), qw, s, zeros, static_cast<const T*>(bias), static_cast<T*>(y), workspace, M, N, K,
      group, per_split);
}

template <typename T>
static void gemv_dispatch(int M, const void* x, const uint32_t* qw, const __half* s, const uint8_t* zeros, const void* bias,
                          void* y, float* workspace, int N, int K, int group, int splits, cudaStream_t stream) {
  switch (M) {
    case 1: launch_gemv<T, 1>(x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream); break;
    case 2: launch_gemv<T, 2>(x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream); break;
    case 3: launch_gemv<T, 3>(x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream); break;
    case 4: launch_gemv<T, 4>(x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream); break;
    case 5: launch_gemv<T, 5>(x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream); break;
    case 6: launch_gemv<T, 6>(x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream); break;
    case 7: launch_gemv<T, 7>(x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream); break;
    default: launch_gemv<T, 8>(x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream); break;
  }
}

}  // namespace llmq

// dtype: 0 = fp16, 1 = bf16. Preconditions (checked by the binding): K % 64 == 0, group % 32 == 0, K % group == 0,
// 16-byte aligned pointers, workspace zeroed [M, N] float when splits > 1.
void llmq_w4_gemv(int dtype, int M, const void* x, const uint32_t* qw, const __half* s, const uint8_t* zeros,
                  const void* bias, void* y, float* workspace, int N, int K, int group, int splits,
                  cudaStream_t stream) {
  if (dtype == 0) llmq::gemv_dispatch<__half>(M, x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream);
  else llmq::gemv_dispatch<__nv_bfloat16>(M, x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream);
}

void llmq_w4_mma(int dtype, int M, const void* x, const uint32_t* qw, const __half* s, const uint8_t* zeros,
                 const void* bias, void* y, float* workspace, int N, int K, int group, int splits,
                 cudaStream_t stream) {
  const int m_tiles = (M + 15) / 16;
  if (dtype == 0) {
    if (m_tiles <= 1) llmq::launch_mma<__half, 1>(M, x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream);
    else if (m_tiles <= 2) llmq::launch_mma<__half, 2>(M, x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream);
    else if (m_tiles <= 4) llmq::launch_mma<__half, 4>(M, x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream);
    else llmq::launch_mma<__half, 8>(M, x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream);
  } else {
    using B = __nv_bfloat16;
    if (m_tiles <= 1) llmq::launch_mma<B, 1>(M, x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream);
    else if (m_tiles <= 2) llmq::launch_mma<B, 2>(M, x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream);
    else if (m_tiles <= 4) llmq::launch_mma<B, 4>(M, x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream);
    else llmq::launch_mma<B, 8>(M, x, qw, s, zeros, bias, y, workspace, N, K, group, splits, stream);
  }
}

void llmq_w4_dequant(int dtype, const uint32_t* qw, const __half* s, const uint8_t* zeros, void* w, int N, int K, int group,
                     cudaStream_t stream) {
  const size_t words = (size_t)N * (K / 8);
  const int blocks = (int)((words + 255) / 256 < 65535 * 4 ? (words + 255) / 256 : 65535 * 4);
  if (dtype == 0)
    llmq::dequant_w4_kernel<__half><<<blocks, 256, 0, stream>>>(qw, s, zeros, static_cast<__half*>(w), N, K, group);
  else
    llmq::dequant_w4_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(qw, s, zeros, static_cast<__nv_bfloat16*>(w), N, K,
                                                                       group);
}
