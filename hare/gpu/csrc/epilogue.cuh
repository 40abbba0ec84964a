// epilogue.cuh: accumulator -> shared staging -> 16-byte global stores.
//
// In the swap-AB formulation a consumer warpgroup's accumulator is a 64 (weight out-dim) x BN (token rows)
// tile; the output is row-major in tokens, so the tile is transposed through shared memory: each warpgroup
// owns a [BN][64] bf16 staging tile (128-byte rows, 16-byte chunks XOR-swizzled by row % 8 against bank
// conflicts) and then writes whole 16-byte chunks of token rows, masking rows past the block's height.
//
// wgmma m64nN f32 accumulator layout: register i of thread (warp w, lane l) of the warpgroup holds
//   row (out-dim) = 16 w + l/4 + 8 * ((i >> 1) & 1),  column (token) = 8 * (i >> 2) + 2 * (l % 4) + (i & 1).
#pragma once
#include <cuda_bf16.h>
#include "common.cuh"

namespace hare {

__device__ __forceinline__ uint32_t stage_offset(int n, int f) {  // byte offset of element (token n, col f)
  return static_cast<uint32_t>(n * 128 + ((((f >> 3) ^ (n & 7))) << 4) + (f & 7) * 2);
}

__device__ __forceinline__ uint32_t stage_chunk_offset(int n, int c) {
  return static_cast<uint32_t>(n * 128 + ((c ^ (n & 7)) << 4));
}

enum Activation : int { kSilu = 0, kGelu = 1 };

template <int ACT>
__device__ __forceinline__ float activate(float g) {
  if constexpr (ACT == kSilu) return silu(g);
  else return gelu_tanh(g);
}

// act(gate) * up -> staging (bf16).
template <int BN, int ACT>
__device__ __forceinline__ void stage_glu(uint8_t* stage, const float (&gate)[BN / 2], const float (&up)[BN / 2],
                                          int warp, int lane) {
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) {
    const int f = warp * 16 + (lane >> 2) + ((i & 2) ? 8 : 0);
    const int n = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
    *reinterpret_cast<__nv_bfloat16*>(stage + stage_offset(n, f)) = __float2bfloat16_rn(activate<ACT>(gate[i]) * up[i]);
  }
}

// acc * row_weight[token] -> staging (bf16).
template <int BN>
__device__ __forceinline__ void stage_scaled(uint8_t* stage, const float (&acc)[BN / 2], const float* row_weight,
                                             int warp, int lane) {
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) {
    const int f = warp * 16 + (lane >> 2) + ((i & 2) ? 8 : 0);
    const int n = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
    *reinterpret_cast<__nv_bfloat16*>(stage + stage_offset(n, f)) = __float2bfloat16_rn(acc[i] * row_weight[n]);
  }
}

__device__ __forceinline__ void atomic_add_bf16x8_to_f32(float* dst, uint4 v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
  float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
  float2 c = __bfloat1622float2(h[2]), d = __bfloat1622float2(h[3]);
  atomicAdd(reinterpret_cast<float4*>(dst), make_float4(a.x, a.y, b.x, b.y));
  atomicAdd(reinterpret_cast<float4*>(dst + 4), make_float4(c.x, c.y, d.x, d.y));
}

}  // namespace hare
