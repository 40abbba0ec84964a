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

// byte offset of 16-byte chunk c (out-dim columns 8c..8c+7) of token row n in a staging tile
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
    return (fminf(fmaxf(u, -a.limit), a.limit) + 1.0f) * (g * sigmoid(a.alpha * g));
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

// Two floats as one bf16x2 word, `lo` in the low half (one F2FP for both).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Accumulators -> staging with stmatrix .trans: the pairs (i, i + 1), i even, of the accumulator layout above are
// exactly the m8n8 b16 fragments of 8 (out-dim) x 8 (token) matrices, so one stmatrix.x4.trans stores four of
// them transposed as 16-byte chunks of token rows (eight instructions per thread at BN = 128 instead of 64
// two-byte stores). Instruction q holds accumulators [8q, 8q + 8): matrix j = token rows 16q + 8 (j / 2) + 0..7,
// out-dim chunk 2 warp + j % 2; lane l gives the address of row l % 8 of matrix l / 8. The swizzle puts a matrix's
// eight rows in eight different 16-byte bank groups. `pair(i)` is the packed bf16x2 of accumulators i and i + 1.
template <int BN, class Pair>
__device__ __forceinline__ void stage_pairs(uint8_t* stage, int warp, int lane, Pair pair) {
  const int j = lane >> 3, r = lane & 7;
  const uint32_t base = smem_u32(stage) + stage_chunk_offset(8 * (j >> 1) + r, 2 * warp + (j & 1));
#pragma unroll
  for (int q = 0; q < BN / 16; ++q) {
    const uint32_t r0 = pair(8 * q), r1 = pair(8 * q + 2), r2 = pair(8 * q + 4), r3 = pair(8 * q + 6);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(base + q * 2048),
                 "r"(r0), "r"(r1), "r"(r2), "r"(r3)
                 : "memory");
  }
}

// glu(gate + bias_g, up + bias_u) -> staging (bf16).
template <int BN, int ACT>
__device__ __forceinline__ void stage_glu(uint8_t* stage, const float (&gate)[BN / 2], const float (&up)[BN / 2],
                                          float2 bias_g, float2 bias_u, const GluArgs& args, int warp, int lane) {
  stage_pairs<BN>(stage, warp, lane, [&](int i) {
    const bool hi = (i & 2) != 0;  // out-dim row row0 + 8 (both of the pair)
    const float bg = hi ? bias_g.y : bias_g.x, bu = hi ? bias_u.y : bias_u.x;
    return pack_bf16x2(glu<ACT>(gate[i] + bg, up[i] + bu, args), glu<ACT>(gate[i + 1] + bg, up[i + 1] + bu, args));
  });
}

// (acc + bias) * row_weight[token] -> staging (bf16).
template <int BN>
__device__ __forceinline__ void stage_scaled(uint8_t* stage, const float (&acc)[BN / 2], float2 bias,
                                             const float* row_weight, int warp, int lane) {
  stage_pairs<BN>(stage, warp, lane, [&](int i) {
    const float b = (i & 2) != 0 ? bias.y : bias.x;
    const float2 w = *reinterpret_cast<const float2*>(row_weight + (i >> 2) * 8 + (lane & 3) * 2);  // tokens n, n + 1
    return pack_bf16x2((acc[i] + b) * w.x, (acc[i + 1] + b) * w.y);
  });
}

// acc[0, 8) += the eight bf16 of a 16-byte chunk (the top-k sums: hare_combine and the decode kernel's tokens).
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], uint4 v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float2 f = __bfloat1622float2(h[r]);
    acc[2 * r] += f.x;
    acc[2 * r + 1] += f.y;
  }
}

// acc[0, 8) rounded to bf16, as one 16-byte chunk.
__device__ __forceinline__ uint4 pack_bf16x8(const float (&acc)[8]) {
  return make_uint4(pack_bf16x2(acc[0], acc[1]), pack_bf16x2(acc[2], acc[3]), pack_bf16x2(acc[4], acc[5]),
                    pack_bf16x2(acc[6], acc[7]));
}

__device__ __forceinline__ void atomic_add_bf16x8_to_f32(float* dst, uint4 v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
  float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
  float2 c = __bfloat1622float2(h[2]), d = __bfloat1622float2(h[3]);
  atomicAdd(reinterpret_cast<float4*>(dst), make_float4(a.x, a.y, b.x, b.y));
  atomicAdd(reinterpret_cast<float4*>(dst + 4), make_float4(c.x, c.y, d.x, d.y));
}

}  // namespace hare
