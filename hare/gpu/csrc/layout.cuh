// layout.cuh: the padding-free routing layout (hare.routing.route) built on the GPU in two launches.
//
//   layout_count: one CTA per tile of `tile_items` (token, slot) assignments; 8 warps each count their
//                 contiguous slice per expert (warp match + popc, no atomics) and the CTA writes its per-expert
//                 totals. The last CTA to finish (atomic ticket) scans: counts, offsets, per-tile bases,
//                 row-block arrays (block_expert/start/height for all B slots), num_blocks, and resets the ticket.
//                 With a single tile (R <= 2048) that CTA also assigns the rows and layout_scatter is skipped.
//                 For the fused MoE it also writes the routing weights as fp32 (weights_in -> weights_out, any
//                 float dtype), and with check_ids it checks every id (below).
//   layout_scatter: one CTA per tile again; recomputes per-warp counts, turns them into bases and gives every
//                 assignment its stable row: rows keep token order inside an expert, exactly as torch.sort(stable).
// Shapes depend on (R, E, block) only; no host sync; graph-capturable.
//
// The id check (check_ids != 0; hare.gpu's module docstring has the whole design): every thread tests its ids for
// a value outside [0, E) or an expert already named by an earlier slot of the same token, and sends the flat
// index of a bad one to first_bad (atomicMin, so the first bad id wins whatever the CTA order; untouched when all
// ids are good). The CTA that finishes the layout takes first_bad back to rest (atomicExch) and, when an id was
// bad, writes its record into the host-mapped `status` record (no host sync: the host reads it at its next call)
// and NaN into every fp32 routing weight, so the down GEMM makes the whole output NaN.
#pragma once
#include <climits>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"
#include "hare_params.cuh"

namespace hare {

constexpr int kLayoutThreads = 256;
constexpr int kLayoutWarps = kLayoutThreads / 32;
constexpr int kLayoutItemsPerLane = 8;  // a warp owns 256 consecutive assignments, a CTA 2048
constexpr int kLayoutTileItems = kLayoutThreads * kLayoutItemsPerLane;

// The caller's id of assignment i, as given.
__device__ __forceinline__ long long raw_id(const LayoutParams& p, int i) {
  return p.ids_is_64 ? static_cast<const long long*>(p.topk_ids)[i] : static_cast<const int*>(p.topk_ids)[i];
}

// Expert id of assignment i. Ids come from the caller, and every index the layout writes derives from them, so an
// id outside [0, E) is clamped into it: a bad id routes a row to a wrong expert, never to memory outside the
// layout. With check_ids the check below reports it (and the output is NaN); without, the debug build traps.
__device__ __forceinline__ int load_id(const LayoutParams& p, int i) {
  const long long id = raw_id(p, i);
  HARE_DEVICE_CHECK(p.check_ids || (id >= 0 && id < p.num_experts), "topk_ids[%d] = %lld not in [0, %d)", i, id,
                    p.num_experts);
  return static_cast<int>(min(max(id, 0ll), static_cast<long long>(p.num_experts - 1)));
}

// ---- the id check (check_ids) ----
constexpr int kNoBadId = INT_MAX;  // first_bad at rest
// status record (long long words; hare/gpu/_launch.py STATUS_* reads them): the device counts bad calls in
// kStatusErrors, the host counts the ones it raised in kStatusReported; the fields describe the first bad call not
// yet raised and are written only while the two counts are equal (nothing pending), before the count moves on.
enum StatusWord {
  kStatusErrors = 0, kStatusReported = 1, kStatusCode = 2, kStatusToken = 3, kStatusSlot = 4, kStatusValue = 5,
  kStatusOtherSlot = 6, kStatusExperts = 7, kStatusTokens = 8, kStatusTopK = 9, kStatusSeq = 10,
};
enum BadIdCode { kIdOutOfRange = 1, kIdRepeated = 2 };

// 0 when assignment i's id is good, else its BadIdCode; *other = the earlier slot of its token naming the same
// expert (kIdRepeated). An id is compared with the earlier slots of its token only: top-k reads per item.
__device__ __forceinline__ int bad_id(const LayoutParams& p, int i, int* other) {
  const long long id = raw_id(p, i);
  if (id < 0 || id >= p.num_experts) return kIdOutOfRange;
  const int first = i - i % p.top_k;
  for (int s = first; s < i; ++s) {
    if (raw_id(p, s) == id) {
      *other = s - first;
      return kIdRepeated;
    }
  }
  return 0;
}

// This thread's ids of the tile (the items of layout_load_slice): the flat index of each bad one to first_bad.
__device__ __forceinline__ void layout_check_slice(const LayoutParams& p, int begin) {
  const int lane = threadIdx.x & 31;
  int first_bad = kNoBadId, other;
#pragma unroll
  for (int j = 0; j < kLayoutItemsPerLane; ++j) {
    const int i = begin + 32 * j + lane;
    if (i < p.num_rows && first_bad == kNoBadId && bad_id(p, i, &other)) first_bad = i;
  }
  if (first_bad != kNoBadId) atomicMin(p.first_bad, first_bad);
}

// One thread: the record of bad assignment i into the host-mapped status words, unless an earlier bad call's
// record is still pending; the count of bad calls moves on either way. Volatile stores to host memory, ordered for
// the host by the system fence before the count.
__device__ __forceinline__ void layout_record_bad_id(const LayoutParams& p, int i) {
  volatile long long* r = p.status;
  const long long errors = r[kStatusErrors];
  if (errors == r[kStatusReported]) {
    int other = -1;
    r[kStatusCode] = bad_id(p, i, &other);
    r[kStatusToken] = i / p.top_k;
    r[kStatusSlot] = i % p.top_k;
    r[kStatusValue] = raw_id(p, i);
    r[kStatusOtherSlot] = other;
    r[kStatusExperts] = p.num_experts;
    r[kStatusTokens] = p.num_rows / p.top_k;
    r[kStatusTopK] = p.top_k;
    r[kStatusSeq] = errors;
    __threadfence_system();
  }
  r[kStatusErrors] = errors + 1;
  __threadfence_system();
}

// The CTA that finishes the layout: first_bad back to rest and, after a bad id, its record and NaN weights.
__device__ __forceinline__ void layout_finish_check(const LayoutParams& p) {
  __shared__ int bad;
  if (threadIdx.x == 0) {
    bad = atomicExch(p.first_bad, kNoBadId);
    if (bad != kNoBadId) layout_record_bad_id(p, bad);
  }
  __syncthreads();
  if (bad != kNoBadId && p.weights_out != nullptr)
    for (int i = threadIdx.x; i < p.num_rows; i += kLayoutThreads) p.weights_out[i] = __int_as_float(0x7fc00000);
}

// Routing weight of assignment i as fp32 (weights_dtype: 0 fp32, 1 bf16, 2 fp16, 3 fp64).
__device__ __forceinline__ float load_weight(const LayoutParams& p, int i) {
  switch (p.weights_dtype) {
    case 1: return __bfloat162float(static_cast<const __nv_bfloat16*>(p.weights_in)[i]);
    case 2: return __half2float(static_cast<const __half*>(p.weights_in)[i]);
    case 3: return static_cast<float>(static_cast<const double*>(p.weights_in)[i]);
    default: return static_cast<const float*>(p.weights_in)[i];
  }
}

// Loads this warp's slice of expert ids (lane l holds items begin + 32 j + l), -1 past the end.
__device__ __forceinline__ void layout_load_slice(const LayoutParams& p, int (&e)[kLayoutItemsPerLane], int& begin) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  begin = blockIdx.x * kLayoutTileItems + warp * (32 * kLayoutItemsPerLane);
#pragma unroll
  for (int j = 0; j < kLayoutItemsPerLane; ++j) {
    const int i = begin + 32 * j + lane;
    e[j] = i < p.num_rows ? load_id(p, i) : -1;
  }
}

// hist[w * E + e] = number of assignments of expert e in warp w's slice of this tile.
__device__ __forceinline__ void layout_warp_histogram(const LayoutParams& p, int* hist,
                                                      const int (&e)[kLayoutItemsPerLane]) {
  const int E = p.num_experts;
  for (int i = threadIdx.x; i < kLayoutWarps * E; i += kLayoutThreads) hist[i] = 0;
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int* h = hist + warp * E;
#pragma unroll
  for (int j = 0; j < kLayoutItemsPerLane; ++j) {
    const unsigned peers = __match_any_sync(0xffffffffu, e[j]);
    if (e[j] >= 0 && lane == __ffs(peers) - 1) h[e[j]] += __popc(peers);
    __syncwarp();
  }
  __syncthreads();
}

// In-place exclusive scan of data[0..n) by the whole CTA; returns the total to every thread.
__device__ __forceinline__ int block_exclusive_scan(int* data, int n, int* scratch /* >= kLayoutWarps + 1 */) {
  const int per = (n + kLayoutThreads - 1) / kLayoutThreads;
  const int lo = min(n, threadIdx.x * per), hi = min(n, lo + per);
  int local = 0;
  for (int i = lo; i < hi; ++i) local += data[i];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = local;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int w = 0; w < kLayoutWarps; ++w) {
      const int v = scratch[w];
      scratch[w] = run;
      run += v;
    }
    scratch[kLayoutWarps] = run;
  }
  __syncthreads();
  int run = scratch[warp] + incl - local;
  for (int i = lo; i < hi; ++i) {
    const int v = data[i];
    data[i] = run;
    run += v;
  }
  const int total = scratch[kLayoutWarps];
  __syncthreads();
  return total;
}

// Gives each assignment of this warp's slice its row. hist holds the per-warp histograms (warp w's count of expert
// e at hist[w * E + e]); expert e's rows of this CTA start at first_row(e). A scan over the warps turns the counts
// into each warp's first row of each expert, then every warp places its slice.
template <class FirstRow>
__device__ __forceinline__ void layout_assign(const LayoutParams& p, int* hist, const int (&ids)[kLayoutItemsPerLane],
                                              int begin, FirstRow first_row) {
  const int E = p.num_experts;
  for (int e = threadIdx.x; e < E; e += kLayoutThreads) {
    int run = first_row(e);
#pragma unroll
    for (int w = 0; w < kLayoutWarps; ++w) {
      const int v = hist[w * E + e];
      hist[w * E + e] = run;
      run += v;
    }
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int* h = hist + warp * E;
  const unsigned lt = (1u << lane) - 1u;
#pragma unroll
  for (int j = 0; j < kLayoutItemsPerLane; ++j) {
    const int e = ids[j];
    const int i = begin + 32 * j + lane;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    int base = 0;
    if (e >= 0) base = h[e];
    __syncwarp();
    if (e >= 0) {
      const int row = base + __popc(peers & lt);
      if (lane == __ffs(peers) - 1) h[e] = base + __popc(peers);
      p.gather_index[row] = i / p.top_k;
      p.row_assignment[row] = i;
      p.assignment_row[i] = row;
    }
    __syncwarp();
  }
}

__device__ __forceinline__ void layout_count(const LayoutParams& p) {
  extern __shared__ int sh[];
  __shared__ int is_last;
  __shared__ int scratch[kLayoutWarps + 1];
  const int E = p.num_experts;
  int ids[kLayoutItemsPerLane], begin;
  layout_load_slice(p, ids, begin);
  if (p.check_ids) layout_check_slice(p, begin);
  if (p.weights_out != nullptr) {  // this thread's items, coalesced across the warp
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < kLayoutItemsPerLane; ++j) {
      const int i = begin + 32 * j + lane;
      if (i < p.num_rows) p.weights_out[i] = load_weight(p, i);
    }
  }
  layout_warp_histogram(p, sh, ids);
  const int T = p.num_tiles;
  const bool single = T == 1;  // one tile (R <= 2048): no other CTA, no global round trips
  int* tc = sh + kLayoutWarps * E;  // [T][E] tile counts -> exclusive prefix over tiles (after the histogram)
  for (int e = threadIdx.x; e < E; e += kLayoutThreads) {
    int sum = 0;
#pragma unroll
    for (int w = 0; w < kLayoutWarps; ++w) sum += sh[w * E + e];
    if (single) tc[e] = sum;
    else p.tile_base[blockIdx.x * E + e] = sum;
  }
  if (!single) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(p.ticket, 1u) == static_cast<unsigned>(T - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // ---- the last CTA: global scan ----
    // batched loads: 16 in flight per thread (a loop of dependent L2 round trips costs ~0.5 us each)
    constexpr int kBatch = 16;
    for (int i0 = threadIdx.x; i0 < T * E; i0 += kLayoutThreads * kBatch) {
      int v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = i0 + u * kLayoutThreads;
        v[u] = i < T * E ? __ldcg(p.tile_base + i) : 0;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = i0 + u * kLayoutThreads;
        if (i < T * E) tc[i] = v[u];
      }
    }
  }
  __syncthreads();
  int* cnt = tc + T * E;    // [E] counts -> offsets (exclusive scan)
  int* nb = cnt + E;        // [E] blocks per expert -> first block (exclusive scan)
  int* cnt_keep = nb + E;   // [E] counts
  int* nb_keep = cnt_keep + E;  // [E] blocks per expert
  for (int e = threadIdx.x; e < E; e += kLayoutThreads) {
    int run = 0;
#pragma unroll 8
    for (int t = 0; t < T; ++t) {
      const int v = tc[t * E + e];
      tc[t * E + e] = run;
      run += v;
    }
    cnt[e] = run;
    cnt_keep[e] = run;
    const int b = (run + p.block - 1) / p.block;
    nb[e] = b;
    nb_keep[e] = b;
  }
  __syncthreads();
  block_exclusive_scan(cnt, E, scratch);
  const int total_blocks = block_exclusive_scan(nb, E, scratch);
  for (int e = threadIdx.x; e < E; e += kLayoutThreads) {
    p.counts[e] = cnt_keep[e];
    p.offsets[e] = cnt[e];
  }
  if (threadIdx.x == 0) {
    p.offsets[E] = p.num_rows;
    *p.num_blocks = total_blocks;
    if (!single) *p.ticket = 0u;
  }
  if (!single)
    for (int i = threadIdx.x; i < T * E; i += kLayoutThreads) p.tile_base[i] = cnt[i % E] + tc[i];
  for (int slot = threadIdx.x; slot < p.num_slots; slot += kLayoutThreads) {
    int expert = -1, start = p.num_rows, height = 0;
    if (slot < total_blocks) {
      // the expert whose block range [nb[e], nb[e] + nb_keep[e]) holds the slot: last e with nb[e] <= slot
      // and nb_keep[e] > 0
      int lo = 0, hi = E - 1;
      while (lo < hi) {  // first e with nb[e] + nb_keep[e] > slot
        const int mid = (lo + hi) >> 1;
        if (nb[mid] + nb_keep[mid] > slot) hi = mid;
        else lo = mid + 1;
      }
      expert = lo;
      const int local = slot - nb[lo];
      start = cnt[lo] + local * p.block;
      height = min(p.block, cnt_keep[lo] - local * p.block);
    }
    p.block_expert[slot] = expert;
    p.block_start[slot] = start;
    p.block_height[slot] = height;
  }
  if (p.check_ids) layout_finish_check(p);  // after every CTA's checks and weights (the ticket orders them)
  if (single) {  // finish here, no layout_scatter launch
    __syncthreads();
    layout_assign(p, sh, ids, begin, [&](int e) { return cnt[e]; });
  }
}

__device__ __forceinline__ void layout_scatter(const LayoutParams& p) {
  extern __shared__ int sh[];
  const int E = p.num_experts;
  int ids[kLayoutItemsPerLane], begin;
  layout_load_slice(p, ids, begin);
  layout_warp_histogram(p, sh, ids);
  layout_assign(p, sh, ids, begin, [&](int e) { return p.tile_base[blockIdx.x * E + e]; });
}

}  // namespace hare
