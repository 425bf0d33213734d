// Numbers shared by llmq's 4-bit kernels (w4a16.cu, w4a16_tc.cu): float conversions of the activation types and
// the 'magic number' dequantization of two nibbles at a time.
//
// (word >> 4i) & 0x000F000F puts nibbles i and i+4 in the low bits of the two 16-bit halves; OR-ed into 1024.0
// (fp16) or 128.0 (bf16), whose last mantissa bit is worth 1, they read as (base + u_i, base + u_{i+4}): no
// int->float conversion instruction. Subtracting base + z is exact; one multiply by the scale then rounds
// (u - z) * s once, i.e. the weight rounded to T.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace llmq {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ __half low_of(__half2 v) { return __low2half(v); }
__device__ __forceinline__ __half high_of(__half2 v) { return __high2half(v); }
__device__ __forceinline__ __nv_bfloat16 low_of(__nv_bfloat162 v) { return __low2bfloat16(v); }
__device__ __forceinline__ __nv_bfloat16 high_of(__nv_bfloat162 v) { return __high2bfloat16(v); }

template <typename T> struct Pair;
template <> struct Pair<__half> {
  using type = __half2;
  static constexpr uint32_t magic = 0x64006400u;  // (1024.0, 1024.0)
  static constexpr float base = 1024.f;
  static __device__ __forceinline__ type splat(float v) { return __float2half2_rn(v); }
};
template <> struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr uint32_t magic = 0x43004300u;  // (128.0, 128.0)
  static constexpr float base = 128.f;
  static __device__ __forceinline__ type splat(float v) { return __float2bfloat162_rn(v); }
};

}  // namespace llmq
