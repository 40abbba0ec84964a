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
#include "hare_params.cuh"

namespace hare {

__device__ __forceinline__ uint32_t stage_offset(int n, int f) {  // byte offset of element (token n, col f)
  return static_cast<uint32_t>(n * 128 + ((((f >> 3) ^ (n & 7))) << 4) + (f & 7) * 2);
}

__device__ __forceinline__ uint32_t stage_chunk_offset(int n, int c) {
  return static_cast<uint32_t>(n * 128 + ((c ^ (n & 7)) << 4));
}

// The gated units the gate/up epilogue fuses (hare.activations; enum Activation, generated into hare_params.cuh
// from plan.GATE_UP_UNITS): act(gate) * up, or a clamped form. Their parameters (alpha, limit) come from the call
// (GemmParams / GluCombineParams), the unit from the template.

struct GluArgs {
  float alpha, limit;
};

template <int ACT>
__device__ __forceinline__ float glu(float g, float u, const GluArgs& a) {
  if constexpr (ACT == kSilu) {
    return silu(g) * u;
  } else if constexpr (ACT == kGelu) {
    return gelu_tanh(g) * u;
  } else if constexpr (ACT == kClampedSilu) {  // silu(min(g, limit)) * clamp(u, +-limit)
    return silu(fminf(g, a.limit)) * fminf(fmaxf(u, -a.limit), a.limit);
  } else {  // GPT-OSS: (clamp(u, +-limit) + 1) * g * sigmoid(alpha * g), g = min(g, limit)
    g = fminf(g, a.limit);
    return (fminf(fmaxf(u, -a.limit), a.limit) + 1.0f) * (g / (1.0f + __expf(-a.alpha * g)));
  }
}

// The two out-dim rows a thread holds in a 64-row accumulator (epilogue layout above): row0 and row0 + 8.
__device__ __forceinline__ int acc_row0(int warp, int lane) { return warp * 16 + (lane >> 2); }

// A per-row bias of those two rows (bias[f0 + row] for row < valid, else 0; all 0 without a bias).
__device__ __forceinline__ float2 row_bias_pair(const float* bias, int f0, int valid, int warp, int lane) {
  const int f = f0 + acc_row0(warp, lane);
  float2 b = make_float2(0.0f, 0.0f);
  if (bias != nullptr) {
    if (f < valid) b.x = __ldg(bias + f);
    if (f + 8 < valid) b.y = __ldg(bias + f + 8);
  }
  return b;
}

// glu(gate + bias_g, up + bias_u) -> staging (bf16).
template <int BN, int ACT>
__device__ __forceinline__ void stage_glu(uint8_t* stage, const float (&gate)[BN / 2], const float (&up)[BN / 2],
                                          float2 bias_g, float2 bias_u, const GluArgs& args, int warp, int lane) {
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) {
    const bool hi = (i & 2) != 0;
    const int f = acc_row0(warp, lane) + (hi ? 8 : 0);
    const int n = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
    const float g = gate[i] + (hi ? bias_g.y : bias_g.x), u = up[i] + (hi ? bias_u.y : bias_u.x);
    *reinterpret_cast<__nv_bfloat16*>(stage + stage_offset(n, f)) = __float2bfloat16_rn(glu<ACT>(g, u, args));
  }
}

// (acc + bias) * row_weight[token] -> staging (bf16).
template <int BN>
__device__ __forceinline__ void stage_scaled(uint8_t* stage, const float (&acc)[BN / 2], float2 bias,
                                             const float* row_weight, int warp, int lane) {
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) {
    const bool hi = (i & 2) != 0;
    const int f = acc_row0(warp, lane) + (hi ? 8 : 0);
    const int n = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
    *reinterpret_cast<__nv_bfloat16*>(stage + stage_offset(n, f)) =
        __float2bfloat16_rn((acc[i] + (hi ? bias.y : bias.x)) * row_weight[n]);
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
