// gemv.cuh: the few-token path: each (token, slot) pair's expert rows as dot products on the CUDA cores, no layout.
//
// At a token or so a MoE layer is a chain of dependent reads (notes/decode.md): the layout, then per GEMM tile its
// row block, token indices, kept blocks and weights, each an L2 or DRAM round trip, and the tensor cores idle on
// 1-16 token columns. Here two launches do the layer, and every thread's first loads are the weights themselves:
//   gate/up  CTA = (pair, a run of ffn columns f): the dot products of gate row f and up row F + f with x of the
//            pair's token, then bias and the gated unit, h[pair, f] (bf16). CTA 0 also writes the routing weights
//            as fp32 and, with check_ids, checks every id (the layout's check and record, one CTA: the ids are few).
//   down     CTA = (token, a run of hidden columns n): before its grid dependency wait it reads the token's expert
//            ids (written before the gate/up launch began) and prefetches its weight rows into L2, so they stream
//            while gate/up runs; then out[t, n] = sum_j w_j (W_down[e_j] row n . h[t k + j] + bias), the k slots
//            summed in slot order in fp32: deterministic, no atomics, no combine pass.
// Work items: each weight row of a CTA's units is cut into `segments` runs of 16-byte chunks (8 bf16 values); an
// item (row, run) goes to a group of L lanes, lane l taking chunks l, l + L, ... with 8 loads in flight, the group's
// sum to shared memory; the CTA then adds the runs and the rows of each unit in a fixed order. Dense chunks are
// multiplied with 8 activations read through L1 (every group of the CTA reads the same row). Block N:M rows are a
// row's kept values (a chunk = 16 kept columns of one kept block) with their 2:4 metadata (2 bytes per chunk, at
// its place in the sparse wgmma's register order: hare/blocknm.py) and the panel's block_idx; the activations are
// staged in shared memory and each group of 4 picks its two by a byte permute. The plan (hare/gpu/plan.py
// GemvLaunch) chooses L, the segments, the units per CTA and the grid.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include "common.cuh"
#include "epilogue.cuh"
#include "layout.cuh"
#include "hare_params.cuh"

namespace hare {

// kGemvThreads, kGemvBatch and kGemvMaxTopK come with the plan (hare_params.cuh).

__device__ __forceinline__ uint4 ld_stream_16(const void* p) {  // read once: do not keep in L1
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2::evict_last [%0];\n" ::"l"(p));
}

__device__ __forceinline__ float2 bf16x2_to_float2(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// The gated unit chosen at run time (GemvParams::activation), so one kernel serves every unit.
__device__ __forceinline__ float glu_runtime(int act, float g, float u, const GluArgs& a) {
  switch (act) {
    case kGelu: return glu<kGelu>(g, u, a);
    case kClampedSilu: return glu<kClampedSilu>(g, u, a);
    case kGptOss: return glu<kGptOss>(g, u, a);
    default: return glu<kSilu>(g, u, a);
  }
}

// One weight row of an expert: where its values, 2:4 metadata and kept block indices are, and the activation row
// it is multiplied with (dense: global memory, read through L1, every group of the CTA reads the same one; Block
// N:M: the CTA's shared-memory copy).
struct GemvRow {
  const uint4* w;        // the row's 16-byte chunks
  const uint8_t* meta;   // Block N:M: the row's metadata bytes of chunk 0
  const int* bidx;       // Block N:M: its panel's kept block indices
  const __nv_bfloat16* act;
};

template <bool SPARSE>
__device__ __forceinline__ GemvRow gemv_row(const GemvParams& p, int e, int r, const __nv_bfloat16* act) {
  GemvRow row;
  const long long er = static_cast<long long>(e) * p.rows + r;
  row.w = reinterpret_cast<const uint4*>(p.w + er * p.width);
  row.act = act;
  if constexpr (SPARSE) {
    // padded row byte (row 16 G + 8 h + g, byte 4 j + 2 t + b) sits at meta[e, G, 64 j + 8 g + 4 t + 2 h + b]
    const long long groups = (p.rows + 15) >> 4;
    row.meta = p.meta + (static_cast<long long>(e) * groups + (r >> 4)) * p.meta_stride + 8 * (r & 7) +
               2 * ((r >> 3) & 1);
    const int panel = r < p.half_rows ? r >> 7 : p.half_panel + ((r - p.half_rows) >> 7);
    row.bidx = p.block_idx + (static_cast<long long>(e) * p.panels + panel) * p.kept;
  } else {
    row.meta = nullptr;
    row.bidx = nullptr;
  }
  return row;
}

// A loaded chunk: its 8 values and (Block N:M) its 2:4 metadata and the dense column of its first kept column.
// The activations are read when the products are formed (L1 hits: every group of the CTA reads the same row).
struct GemvChunk {
  uint4 w;
  uint32_t meta;
  int col;
};

template <bool SPARSE>
__device__ __forceinline__ GemvChunk gemv_load(const GemvParams& p, const GemvRow& row, int c) {
  GemvChunk k;
  k.w = ld_stream_16(row.w + c);
  if constexpr (SPARSE) {
    k.meta = __ldg(reinterpret_cast<const unsigned short*>(row.meta + 64 * (c >> 1) + 4 * (c & 1)));
    // chunk c is kept columns [16 c, +16): one kept block (bw >= 16), clamped like the GEMMs' kept_block
    const int q = (16 * c) >> p.bw_log2;
    const int nblocks = p.K >> p.bw_log2;
    const int v = min(max(__ldg(row.bidx + q), 0), nblocks - 1);
    k.col = (v << p.bw_log2) + ((16 * c) & ((1 << p.bw_log2) - 1));
  } else {
    k.meta = 0;
    k.col = 8 * c;
  }
  return k;
}

// The chunk's products. Dense: its 8 activations, read through L1. Block N:M: the 16 activations of its dense
// columns (shared memory), and per group of 4 the two its 2:4 nibble names, picked as one bf16x2 by a byte
// permute (positions p0 < p1: bytes 2 p0, 2 p0 + 1, 2 p1, 2 p1 + 1 of the group's 8 bytes), no gathered loads.
template <bool SPARSE>
__device__ __forceinline__ float gemv_dot(const GemvChunk& k, const __nv_bfloat16* act) {
  const uint32_t w[4] = {k.w.x, k.w.y, k.w.z, k.w.w};
  float s = 0.0f;
  if constexpr (SPARSE) {
    const uint4 a0 = *reinterpret_cast<const uint4*>(act + k.col);
    const uint4 a1 = *reinterpret_cast<const uint4*>(act + k.col + 8);
    const uint32_t x[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // values 2i, 2i + 1: group i of the chunk, positions in nibble i
      const uint32_t nib = (k.meta >> (4 * i)) & 0xF;
      const uint32_t sel = 0x1010u + 0x22u * (nib & 3) + 0x2200u * (nib >> 2);
      const float2 v = bf16x2_to_float2(w[i]), xv = bf16x2_to_float2(__byte_perm(x[2 * i], x[2 * i + 1], sel));
      s = fmaf(v.x, xv.x, fmaf(v.y, xv.y, s));
    }
  } else {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(act + k.col));
    const uint32_t x[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 v = bf16x2_to_float2(w[i]), xv = bf16x2_to_float2(x[i]);
      s = fmaf(v.x, xv.x, fmaf(v.y, xv.y, s));
    }
  }
  return s;
}

// This lane's share of chunks [c0, c1) of a row: c0 + lane, + L, ..., kGemvBatch loads issued before their products.
template <bool SPARSE>
__device__ __forceinline__ float gemv_segment(const GemvParams& p, const GemvRow& row, int c0, int c1, int lane,
                                              int L) {
  float s = 0.0f;
  for (int c = c0 + lane; c < c1; c += kGemvBatch * L) {
    GemvChunk k[kGemvBatch];
#pragma unroll
    for (int b = 0; b < kGemvBatch; ++b)
      if (c + b * L < c1) k[b] = gemv_load<SPARSE>(p, row, c + b * L);
#pragma unroll
    for (int b = 0; b < kGemvBatch; ++b)
      if (c + b * L < c1) s += gemv_dot<SPARSE>(k[b], row.act);
  }
  return s;
}

// The sum over the L lanes of a group (L a power of two; every lane of the warp takes part).
__device__ __forceinline__ float group_sum(float v, int L) {
  for (int o = L >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A CTA's work: units [u0, u1) of one row of work (a pair for gate/up, a token for down), each `per_unit` weight
// rows cut into p.segments segments of chunks; item i = (row i / segments of the CTA, segment i % segments) goes to
// group i % groups. Each item's dot product lands in partial[i] (shared memory); row_of(unit, which) is the weight
// row `which` of a unit.
template <bool SPARSE, class RowOf>
__device__ __forceinline__ void gemv_items(const GemvParams& p, int u0, int u1, int per_unit, float* partial,
                                           RowOf row_of) {
  const int L = 1 << p.lanes_log2, groups = kGemvThreads >> p.lanes_log2;
  const int group = threadIdx.x >> p.lanes_log2, lane = threadIdx.x & (L - 1);
  const int S = p.segments, nch = p.width / 8, per_seg = (nch + S - 1) / S;
  const int items = (u1 - u0) * per_unit * S;
  for (int i0 = 0; i0 < items; i0 += groups) {  // warp-uniform trip count: the group sums shuffle
    const int i = i0 + group;
    float d = 0.0f;
    if (i < items) {
      const int row = i / S, seg = i - row * S, u = row / per_unit;
      const int c0 = seg * per_seg;
      d = gemv_segment<SPARSE>(p, row_of(u0 + u, row - u * per_unit), c0, min(nch, c0 + per_seg), lane, L);
    }
    d = group_sum(d, L);
    if (i < items && lane == 0) partial[i] = d;
  }
  __syncthreads();
}

// Block N:M: n bf16 (a multiple of 8) of activations copied into shared memory, where the chunks' 16-column
// windows are read; dense rows read theirs through L1 and stage nothing. Returns where the rows are.
template <bool SPARSE>
__device__ __forceinline__ const __nv_bfloat16* gemv_stage(uint8_t* smem, const __nv_bfloat16* src, int n) {
  if constexpr (!SPARSE) return src;
  __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(smem);
  for (int i = threadIdx.x; i < n / 8; i += kGemvThreads)
    reinterpret_cast<uint4*>(dst)[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
  __syncthreads();
  return dst;
}

// CTA 0 of the gate/up launch: the routing weights as fp32 (weights_out) and, with check_ids, the layout's id check
// over all of the call's ids: the first bad one is recorded and every weight becomes NaN (layout.cuh).
__device__ __forceinline__ void gemv_routing(const LayoutParams& lp) {
  __shared__ int first_bad;
  if (threadIdx.x == 0) first_bad = kNoBadId;
  __syncthreads();
  for (int i = threadIdx.x; i < lp.num_rows; i += kGemvThreads) {
    lp.weights_out[i] = load_weight(lp, i);
    int other;
    if (lp.check_ids && bad_id(lp, i, &other)) atomicMin(&first_bad, i);
  }
  __syncthreads();
  if (first_bad != kNoBadId) {
    if (threadIdx.x == 0) layout_record_bad_id(lp, first_bad);
    for (int i = threadIdx.x; i < lp.num_rows; i += kGemvThreads) lp.weights_out[i] = __int_as_float(0x7fc00000);
  }
}

template <bool SPARSE>
__device__ __forceinline__ void gemv_gate_up(const GemvParams& p, const LayoutParams& lp) {
  extern __shared__ __align__(16) uint8_t gemv_smem[];
  float* gemv_partial = reinterpret_cast<float*>(gemv_smem + (SPARSE ? 2 * p.K : 0));
  grid_dependency_wait();
  allow_dependents_launch();
  if (blockIdx.x == 0) gemv_routing(lp);
  const int pair = blockIdx.x / p.ctas_per_row, slice = blockIdx.x - pair * p.ctas_per_row;
  const int e = load_id(lp, pair), F = p.M, S = p.segments;
  const int u0 = slice * p.units_per_cta, u1 = min(F, u0 + p.units_per_cta);
  const __nv_bfloat16* x = gemv_stage<SPARSE>(gemv_smem, p.src + static_cast<long long>(pair / lp.top_k) * p.K, p.K);
  gemv_items<SPARSE>(p, u0, u1, 2, gemv_partial,
                     [&](int f, int which) { return gemv_row<SPARSE>(p, e, f + which * F, x); });
  const GluArgs args{p.act_alpha, p.act_limit};
  for (int u = threadIdx.x; u < u1 - u0; u += kGemvThreads) {
    const int f = u0 + u;
    float g = 0.0f, up = 0.0f;
    for (int s = 0; s < S; ++s) g += gemv_partial[(2 * u) * S + s], up += gemv_partial[(2 * u + 1) * S + s];
    if (p.bias != nullptr) {
      const float* b = p.bias + static_cast<long long>(e) * p.rows;
      g += b[f], up += b[F + f];
    }
    p.dst[static_cast<long long>(pair) * F + f] = __float2bfloat16_rn(glu_runtime(p.activation, g, up, args));
  }
}

template <bool SPARSE>
__device__ __forceinline__ void gemv_down(const GemvParams& p, const LayoutParams& lp) {
  extern __shared__ __align__(16) uint8_t gemv_smem[];
  __shared__ int experts[kGemvMaxTopK];
  __shared__ float weights[kGemvMaxTopK];
  const int k = lp.top_k, F = p.K, H = p.M, S = p.segments;
  float* gemv_partial = reinterpret_cast<float*>(gemv_smem + (SPARSE ? 2 * k * F : 0));
  const int t = blockIdx.x / p.ctas_per_row, slice = blockIdx.x - t * p.ctas_per_row;
  const int u0 = slice * p.units_per_cta, u1 = min(H, u0 + p.units_per_cta);
  for (int j = threadIdx.x; j < k; j += kGemvThreads) experts[j] = load_id(lp, t * k + j);
  __syncthreads();
  // the ids were written before the gate/up launch began: read, with the weights, before its results are waited for
  const int row_bytes = p.width * 2;
  for (int i = threadIdx.x; i < (u1 - u0) * k; i += kGemvThreads) {
    const int j = i % k, n = u0 + i / k;
    const uint8_t* w = reinterpret_cast<const uint8_t*>(gemv_row<SPARSE>(p, experts[j], n, nullptr).w);
    for (int b = 0; b < row_bytes; b += 128) prefetch_l2(w + b);
  }
  grid_dependency_wait();
  allow_dependents_launch();
  for (int j = threadIdx.x; j < k; j += kGemvThreads) weights[j] = lp.weights_out[t * k + j];
  const __nv_bfloat16* h = gemv_stage<SPARSE>(gemv_smem, p.src + static_cast<long long>(t) * k * F, k * F);
  gemv_items<SPARSE>(p, u0, u1, k, gemv_partial, [&](int n, int j) {
    return gemv_row<SPARSE>(p, experts[j], n, h + static_cast<long long>(j) * F);
  });
  for (int u = threadIdx.x; u < u1 - u0; u += kGemvThreads) {  // the k slots in slot order
    const int n = u0 + u;
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
      float d = 0.0f;
      for (int s = 0; s < S; ++s) d += gemv_partial[(u * k + j) * S + s];
      if (p.bias != nullptr) d += p.bias[static_cast<long long>(experts[j]) * p.rows + n];
      acc = fmaf(weights[j], d, acc);
    }
    p.dst[static_cast<long long>(t) * H + n] = __float2bfloat16_rn(acc);
  }
}

}  // namespace hare
