// combine.cuh: deterministic top-k (and K-split) reduction of the down kernel's per-(token, slot) rows.
// out[t, :] = sum_s sum_j Y[s, t*k + j, :] in fixed (s, j) order, fp32 sums, bf16 out; 16-byte accesses.
#pragma once
#include <cuda_bf16.h>
#include "epilogue.cuh"
#include "hare_params.cuh"

namespace hare {

__device__ __forceinline__ void combine(const CombineParams& p) {
  const int chunks_per_row = p.hidden / 8;
  const long long total = static_cast<long long>(p.num_tokens) * chunks_per_row;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long t = idx / chunks_per_row;
    const int c = static_cast<int>(idx - t * chunks_per_row);
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    // rows q = s * top_k + j in fixed order, loaded 8 at a time (independent loads in flight, then the sums)
    const int nq = p.splits * p.top_k;
    for (int q0 = 0; q0 < nq; q0 += 8) {
      uint4 v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int q = q0 + u;
        if (q < nq) {
          const int s = q / p.top_k, j = q - s * p.top_k;
          v[u] = __ldg(reinterpret_cast<const uint4*>(p.y + s * p.split_stride + (t * p.top_k + j) * p.hidden + c * 8));
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (q0 + u < nq) add_bf16x8(acc, v[u]);
      }
    }
    const uint4 o = pack_bf16x8(acc);
    *reinterpret_cast<uint4*>(p.out + t * p.hidden + c * 8) = o;
  }
}

// h[r, f] = glu(sum_s gate_s[r, f], sum_s up_s[r, f]), splits summed in order (deterministic); split 0 holds the
// gate/up bias.
template <int ACT>
__device__ __forceinline__ void glu_combine(const GluCombineParams& p) {
  const long long total = static_cast<long long>(p.num_rows) * p.ffn;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = idx / p.ffn;
    const int f = static_cast<int>(idx - r * p.ffn);
    const float* base = p.part + r * (2 * p.ffn) + f;
    float g = 0.0f, u = 0.0f;
    for (int s0 = 0; s0 < p.splits; s0 += 8) {  // 16 independent loads in flight, summed in split order
      float gv[8], uv[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const bool ok = s0 + q < p.splits;
        gv[q] = ok ? base[(s0 + q) * p.split_stride] : 0.0f;
        uv[q] = ok ? base[(s0 + q) * p.split_stride + p.ffn] : 0.0f;
      }
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        g += gv[q];
        u += uv[q];
      }
    }
    p.h[idx] = __float2bfloat16_rn(glu<ACT>(g, u, GluArgs{p.alpha, p.limit}));
  }
}

}  // namespace hare
