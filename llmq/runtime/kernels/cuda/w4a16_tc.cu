// llmq W4A16 tensor-core kernel, second design: weights in the order mma.sync's B fragments consume them.
//
// y[M, N] = x[M, K] @ W^T for 1 <= M (any; rows in passes of 16 MT <= 64), fp16 or bf16 activations, float32
// accumulation. The layout, the work partition and every index below are written out (and emulated in plain
// torch, lane by lane, against the reference maths) in llmq/runtime/kernels/fragments.py; in short:
//
//   tiles   int32 [N/64, K/16, 32 lanes, 4 words]  lane l's 16 bytes of a 16 k x 64 n tile are exactly its B
//           fragments of the eight n8 tiles: (word w >> 4p) & 0x000F000F is register p of tiles 2w, 2w+1
//           (p = 0: tile 2w b0b1, 1: tile 2w b2b3, 2: tile 2w+1 b0b1, 3: tile 2w+1 b2b3), low half first
//   scales  half  [K/g, N/64, 8, 8]   [q, c, g, j] = s of column 64c + 8j + g: one 16-byte load per lane group
//   zeros   uint8 [K/g, N/64, 8, 8]   the same order, unsigned (symmetric: 8)
//
//   block  256 threads = 8 warps: 2 along n (64 columns each) x 4 along k (64 k each per stage: 4 k16 steps)
//   stage  256 k: every warp's weights (2 KB), scales and zeros, and the activation tile x[rows, 256], brought
//          by cp.async into a ring of STAGES shared-memory slots (weights with an L2 evict-first hint: read
//          once), so several stages of weight bytes are in flight per SM while the tensor cores work
//   step   per k16: A fragments by ldmatrix.x4 from the activation tile (rows padded by 16 bytes: the eight
//          row addresses of a matrix fall in distinct banks); B fragments dequantized in registers from the
//          lane's own 16 bytes (magic-number trick, w4_numbers.cuh: exact, then one rounding by the scale);
//          MT x 8 mma.m16n8k16 with float accumulators
//   end    the 4 k-warps' partial sums added in shared memory; a K split across blocks (gridDim.y, to fill
//          the SMs when N gives few blocks) adds in float into a zeroed workspace, otherwise y is written
//          (+ bias) directly
//
// This translation unit includes no torch header: CI compiles it with nvcc alone for sm_80 and sm_90 and requires
// no register spills.

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "w4_numbers.cuh"

namespace llmq {
namespace tc {

constexpr int WARPS_N = 2, WARPS_K = 4, WARPS = WARPS_N * WARPS_K, THREADS = 32 * WARPS;
constexpr int STEPS = 4, CHUNK_K = 16 * STEPS, STAGE_K = CHUNK_K * WARPS_K;  // 64 and 256
constexpr int TILE_N = 64, BLOCK_N = TILE_N * WARPS_N;
constexpr int A_STRIDE = STAGE_K + 8;  // halves per shared activation row: 528 bytes, 4 banks apart row to row

// One warp's part of a stage slot: its weights, then its scales, then its zeros.
constexpr int B_BYTES = STEPS * 32 * 16;  // 4 steps x 32 lanes x 16 bytes
constexpr int S_BYTES = STEPS * 8 * 16;   // 4 steps x 8 lane groups x 8 halves
constexpr int Z_BYTES = STEPS * 8 * 8;    // 4 steps x 8 lane groups x 8 bytes
constexpr int WARP_BYTES = B_BYTES + S_BYTES + Z_BYTES;

template <int MT> __host__ __device__ constexpr int stage_bytes() { return WARPS * WARP_BYTES + MT * 16 * A_STRIDE * 2; }
// Slots by rows: 4 while they fit beside the activations (M <= 32), 2 at 64 rows; MT=2 x 4 = 158 KB (A100: 164).
template <int MT> __host__ __device__ constexpr int stages() { return MT <= 2 ? 4 : 2; }

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zeros when !valid (src-size 0: nothing is read).
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

// The same for weights, which are read exactly once: evict-first in L2 keeps activations and scales resident.
__device__ __forceinline__ void copy16_streaming(void* dst, const void* src, bool valid) {
  asm volatile(
      "{\n"
      "  .reg .b64 policy;\n"
      "  createpolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
      "  cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, policy;\n"
      "}\n" ::"r"(shared_address(dst)),
      "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void copy8(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 8 : 0));
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING> __device__ __forceinline__ void wait_all_but() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// A fragments of a 16 x 16 piece: lane l gives the address of row l % 16, column 8 (l / 16) of the piece.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const void* address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(shared_address(address)));
}

template <typename T> __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Register p of a lane's word as a B-fragment register: ((base + u_low) - (base + z)) * s, two at a time.
template <typename T>
__device__ __forceinline__ uint32_t b_register(uint32_t word, int p, typename Pair<T>::type base_plus_zero,
                                               typename Pair<T>::type scale) {
  using P = Pair<T>;
  const uint32_t bits = ((word >> (4 * p)) & 0x000F000Fu) | P::magic;
  typename P::type v;
  memcpy(&v, &bits, sizeof(bits));
  v = __hmul2(__hsub2(v, base_plus_zero), scale);
  uint32_t out;
  memcpy(&out, &v, sizeof(out));
  return out;
}

template <typename T, int MT>
__global__ void __launch_bounds__(THREADS, 1)
tc_w4_kernel(const T* __restrict__ x, const int4* __restrict__ tiles, const __half* __restrict__ scales,
             const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
             float* __restrict__ workspace, int M, int N, int K, int group, int chunks_per_split) {
  using P = Pair<T>;
  constexpr int STAGES = stages<MT>();
  constexpr int SLOT = stage_bytes<MT>();
  extern __shared__ __align__(16) uint8_t smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WARPS_N, wk = warp / WARPS_N;
  const int column_blocks = (N + TILE_N - 1) / TILE_N;  // the tiles' first dimension (N padded to 64)
  const int c = blockIdx.x * WARPS_N + wn;              // this warp's 64 columns
  const bool c_valid = c < column_blocks;               // false for a block's second warp past the padded N
  const int k_steps = K / 16;
  const int chunk_begin = blockIdx.y * chunks_per_split;
  const int chunk_end = min(K / CHUNK_K, chunk_begin + chunks_per_split);
  const int stage_count = chunk_end > chunk_begin ? (chunk_end - chunk_begin + WARPS_K - 1) / WARPS_K : 0;
  const int row0 = blockIdx.z * 16 * MT;

  auto issue = [&](int stage) {  // stage's bytes into slot stage % STAGES, asynchronously
    uint8_t* slot = smem + (stage % STAGES) * SLOT;
    const int stage_chunk = chunk_begin + stage * WARPS_K;
    const int chunk = stage_chunk + wk;
    const bool mine = c_valid && chunk < chunk_end;
    uint8_t* area = slot + warp * WARP_BYTES;
#pragma unroll
    for (int step = 0; step < STEPS; ++step) {
      const int4* src = tiles + ((size_t)c * k_steps + chunk * STEPS + step) * 32 + lane;
      copy16_streaming(area + (step * 32 + lane) * 16, mine ? src : tiles, mine);
    }
    {  // lane l brings lane group l % 8's scales and zeros of step l / 8
      const int step = lane >> 3, lane_group = lane & 7;
      const int q = (chunk * CHUNK_K + step * 16) / group;
      const size_t at = (((size_t)q * column_blocks + c) * 8 + lane_group) * 8;
      copy16(area + B_BYTES + (step * 8 + lane_group) * 16, mine ? (const void*)(scales + at) : scales, mine);
      copy8(area + B_BYTES + S_BYTES + (step * 8 + lane_group) * 8, mine ? (const void*)(zeros + at) : zeros, mine);
    }
    T* a = reinterpret_cast<T*>(slot + WARPS * WARP_BYTES);  // x[row0 .., 64 stage_chunk .. + 256], zero outside
    for (int i = threadIdx.x; i < MT * 16 * (STAGE_K / 8); i += THREADS) {
      const int r = i / (STAGE_K / 8), col = (i % (STAGE_K / 8)) * 8;
      const int m = row0 + r, k = stage_chunk * CHUNK_K + col;
      const bool inside = m < M && k < K;
      copy16(a + r * A_STRIDE + col, inside ? (const void*)(x + (size_t)m * K + k) : x, inside);
    }
  };

  float acc[MT][8][4];
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[t][j][r] = 0.f;

  // Ring of STAGES slots: STAGES - 1 stages in flight ahead of the one being multiplied. One commit per
  // iteration (empty past the end) keeps the group count, so wait_group<STAGES - 2> means "this stage landed".
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < stage_count) issue(s);
    commit();
  }
  for (int stage = 0; stage < stage_count; ++stage) {
    wait_all_but<STAGES - 2>();
    __syncthreads();  // this stage is visible to all, and every warp is done with the slot refilled next
    if (stage + STAGES - 1 < stage_count) issue(stage + STAGES - 1);
    commit();
    const int chunk = chunk_begin + stage * WARPS_K + wk;
    if (!c_valid || chunk >= chunk_end) continue;
    const uint8_t* slot = smem + (stage % STAGES) * SLOT;
    const uint8_t* area = slot + warp * WARP_BYTES;
    const T* a_tile = reinterpret_cast<const T*>(slot + WARPS * WARP_BYTES);
    const int lane_group = lane >> 2;
#pragma unroll
    for (int step = 0; step < STEPS; ++step) {
      const uint4 words = *reinterpret_cast<const uint4*>(area + (step * 32 + lane) * 16);
      const uint4 scale_bits = *reinterpret_cast<const uint4*>(area + B_BYTES + (step * 8 + lane_group) * 16);
      const uint2 zero_bits = *reinterpret_cast<const uint2*>(area + B_BYTES + S_BYTES + (step * 8 + lane_group) * 8);
      __half s8[8];
      uint8_t z8[8];
      memcpy(s8, &scale_bits, sizeof(s8));
      memcpy(z8, &zero_bits, sizeof(z8));
      uint32_t a[MT][4];
#pragma unroll
      for (int t = 0; t < MT; ++t)
        load_a(a[t], a_tile + (t * 16 + (lane & 15)) * A_STRIDE + wk * CHUNK_K + step * 16 + 8 * (lane >> 4));
      const uint32_t w4[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) {  // n8 tile j: registers 2 (j % 2), +1 of word j / 2
        const typename P::type scale = P::splat(__half2float(s8[j]));
        const typename P::type base_plus_zero = P::splat(P::base + float(z8[j]));
        const uint32_t b0 = b_register<T>(w4[j / 2], 2 * (j % 2), base_plus_zero, scale);
        const uint32_t b1 = b_register<T>(w4[j / 2], 2 * (j % 2) + 1, base_plus_zero, scale);
#pragma unroll
        for (int t = 0; t < MT; ++t) mma<T>(acc[t][j], a[t], b0, b1);
      }
    }
  }
  wait_all_but<0>();
  __syncthreads();  // the slots are free: reuse them for the k-warps' partial sums

  // Sum over the WARPS_K warps of a column block: the last writes, the middle ones add, the first reads.
  constexpr int VALUES = MT * 8 * 4;
  float* partial = reinterpret_cast<float*>(smem) + wn * VALUES * 32 + lane;  // [wn][value][lane]
#pragma unroll
  for (int k_warp = WARPS_K - 1; k_warp > 0; --k_warp) {
    if (wk == k_warp) {
#pragma unroll
      for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            float* at = partial + ((t * 8 + j) * 4 + r) * 32;
            *at = (k_warp == WARPS_K - 1 ? 0.f : *at) + acc[t][j][r];
          }
    }
    __syncthreads();
  }
  if (wk != 0 || !c_valid) return;
  const int g = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {  // c0 c1: row g, columns 2 tig, +1; c2 c3: row g + 8
        const int m = row0 + t * 16 + g + 8 * (r >> 1);
        const int n = c * TILE_N + 8 * j + 2 * tig + (r & 1);
        if (m >= M || n >= N) continue;
        float v = acc[t][j][r] + partial[((t * 8 + j) * 4 + r) * 32];
        if (gridDim.y == 1) {
          if (bias != nullptr) v += to_float<T>(bias[n]);
          y[(size_t)m * N + n] = from_float<T>(v);
        } else {
          atomicAdd(workspace + (size_t)m * N + n, v);
        }
      }
}

template <typename T, int MT>
static void launch(int M, const void* x, const int4* tiles, const __half* s, const uint8_t* zeros, const void* bias,
                   void* y, float* workspace, int N, int K, int group, int splits, cudaStream_t stream) {
  constexpr int bytes = stages<MT>() * stage_bytes<MT>();
  // above 48 KB of dynamic shared memory a kernel must opt in (per device; cheap to repeat)
  cudaFuncSetAttribute(tc_w4_kernel<T, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  const int chunks = K / CHUNK_K;
  const int per_split = (chunks + splits - 1) / splits;
  const dim3 grid((N + BLOCK_N - 1) / BLOCK_N, splits, (M + 16 * MT - 1) / (16 * MT));
  tc_w4_kernel<T, MT><<<grid, THREADS, bytes, stream>>>(static_cast<const T*>(x), tiles, s, zeros,
                                                        static_cast<const T*>(bias), static_cast<T*>(y), workspace, M,
                                                        N, K, group, per_split);
}

template <typename T>
static void dispatch(int M, const void* x, const int4* tiles, const __half* s, const uint8_t* zeros, const void* bias,
                     void* y, float* workspace, int N, int K, int group, int splits, cudaStream_t stream) {
  const int m_tiles = (M + 15) / 16;
  if (m_tiles <= 1) launch<T, 1>(M, x, tiles, s, zeros, bias, y, workspace, N, K, group, splits, stream);
  else if (m_tiles <= 2) launch<T, 2>(M, x, tiles, s, zeros, bias, y, workspace, N, K, group, splits, stream);
  else launch<T, 4>(M, x, tiles, s, zeros, bias, y, workspace, N, K, group, splits, stream);
}

}  // namespace tc
}  // namespace llmq

// dtype: 0 = fp16, 1 = bf16. Preconditions (checked by the binding): K % 64 == 0, group % 16 == 0, K % group == 0,
// 16-byte aligned x, tiles, scales and 8-byte aligned zeros; workspace zeroed [M, N] float when splits > 1.
void llmq_w4_tc(int dtype, int M, const void* x, const int32_t* tiles, const __half* s, const uint8_t* zeros,
                const void* bias, void* y, float* workspace, int N, int K, int group, int splits, cudaStream_t stream) {
  const int4* t = reinterpret_cast<const int4*>(tiles);
  if (dtype == 0) llmq::tc::dispatch<__half>(M, x, t, s, zeros, bias, y, workspace, N, K, group, splits, stream);
  else llmq::tc::dispatch<__nv_bfloat16>(M, x, t, s, zeros, bias, y, workspace, N, K, group, splits, stream);
}
