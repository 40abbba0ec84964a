// moe_gemm.cuh: the persistent, warp-specialized expert GEMM shared by the gate/up and down kernels.
//
// Swap-AB: the weights are the wgmma A operand (64 out-dim rows per wgmma, K-major, loaded by TMA), the routed
// token rows are B (BN = 16..128 rows of one row block = wgmma N, K-major, gathered with cp.async). A CTA
// computes a 256 x BN tile of out^T: two 128-row weight boxes, each consumer warpgroup takes 64 rows of each box.
//   gate/up: box 0 = gate rows [128 m, +128) of expert e, box 1 = the matching up rows (F + 128 m); warpgroup w
//            holds gate and up for the same 64 ffn columns, so the epilogue fuses act(gate) * up.
//   down:    box 0 / box 1 = rows [256 m, +128) / [256 m + 128, +128) of W_down[e] (H x F), or for joint
//            panels paired as halves rows [128 m, +128) / [H/2 + 128 m, +128) (GemmParams m_tile, a_box1_offset).
// Warpgroups 0-1 (threads 0-255) are the consumers, warpgroup 2 (threads 256-383) the producer: one thread
// issues TMA, all 128 gather B rows. setmaxnreg moves registers from the producer (56) to the consumers (224).
// A kernel is moe_gemm_body<BN, PROJ, EPI, SPARSE, SHARED_B>: the projection (which rows a tile's boxes and token
// rows are), its epilogue (gate/up: the fused gated unit; down: how the top-k rows are reduced) and how the
// weights are read (dense, sparse, sparse with one token tile for both boxes) are the axes of the variant table
// in hare/gpu/plan.py. The body reads as its pieces: produce (TMA + gather), mainloop
// (one tile's wgmma K loop), and the epilogues epilogue_gate_up_partials / epilogue_gate_up / epilogue_down.
// Expert biases (GemmParams::bias, fp32, null when absent) are added to the accumulators in the epilogue; with
// K split, only split 0 adds them.
// Sparse (Block N:M + 2:4) weights, SPARSE = true: the K loop runs over the kept columns of each 128-row panel
// (its kept K blocks, concatenated), 64 of them per stage = two m64nNk32 sparse wgmma steps. A stage holds the
// two boxes' compressed values (128 rows x 32 bf16, TMA, 64B swizzle), their 2:4 metadata (TMA, in the
// per-thread register order of hare.blocknm, so each consumer thread reads its word with one ld.shared), and
// one gathered token tile per box: the two boxes are different panels with different kept blocks, so token
// chunk c of a box comes from column block_idx[panel][q] * bw + offset of the logical column. SHARED_B: the two
// panels keep the same blocks (1:1, or joint panels), so one tile serves both and a stage is 16 KB smaller.
// Pipeline: STAGES shared-memory stages, full/empty mbarriers. A stage is full when TMA's bytes landed
// (expect_tx) and each of the 128 producer threads' cp.async gathers for it landed (cp.async.mbarrier.arrive
// .noinc: the hardware arrives for the thread, which goes straight on to the next stage, so every free stage
// has its loads in flight). The gathered rows are generic-proxy writes: each consumer thread fences the proxies
// (fence.proxy.async) after its full-barrier wait, before wgmma (async proxy) reads them.
#pragma once
#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>
#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "gather.cuh"
#include "scheduler.cuh"
#include "epilogue.cuh"
#include "hare_params.cuh"

namespace hare {

enum Projection : int { kGateUp = 0, kDown = 1 };
enum Reduction : int { kDet = 0, kFast = 1 };  // down: rows to a buffer summed in slot order, or fp32 atomics

constexpr int kSmemLimit = 232448;  // 227 KB opt-in per block on sm_90
constexpr int kProducerThreads = 128;
constexpr int kGemmThreads = 256 + kProducerThreads;

// One stage = 64 logical K columns. Dense: A two 128 x 64 bf16 boxes, one token tile. Sparse: A two 128 x 32
// boxes of compressed values, two token tiles (one per box; one when SHARED_B), two 1 KB metadata boxes.
template <int BN, bool SPARSE, bool SHARED_B = false>
struct GemmConfig {
  static_assert(SPARSE || !SHARED_B, "SHARED_B is a sparse variant");
  static constexpr int kABytes = SPARSE ? 256 * 32 * 2 : 256 * 64 * 2;
  static constexpr int kBTileBytes = BN * 64 * 2;
  static constexpr int kBBytes = (SPARSE && !SHARED_B ? 2 : 1) * kBTileBytes;
  static constexpr int kMetaBytes = SPARSE ? 2 * 1024 : 0;
  static constexpr int kStageBytes = kABytes + kBBytes + kMetaBytes;
  static constexpr int kEpiBytes = 2 * BN * 128;  // two warpgroups x [BN][64] bf16
  static constexpr int kAuxBytes = 2 * BN * 8;    // two warpgroups x (weight f32, dest i32) per row
  static constexpr int kBarBytes = 256;  // full and empty barriers (16 bytes per stage), then GemmSmem::flags
  static constexpr int kFitStages = (kSmemLimit - kEpiBytes - kAuxBytes - kBarBytes) / kStageBytes;
  static constexpr int kMaxStages = SPARSE ? 8 : 6;
  static constexpr int kStages = kFitStages > kMaxStages ? kMaxStages : kFitStages;
  static constexpr int kSmemBytes = kStages * kStageBytes + kEpiBytes + kAuxBytes + kBarBytes;
  static_assert(kStages >= 3, "too few stages");
  static_assert(kStages * 16 + 8 <= kBarBytes, "barriers and flags");
  static_assert(kSmemBytes <= kSmemLimit, "shared memory");
  static_assert(BN % 16 == 0 && BN >= 16 && BN <= 128, "BN");
  static_assert(kStageBytes % 1024 == 0, "stages keep the 1024-byte alignment of 128B-swizzled tiles");
};

// The dynamic shared memory of a GEMM CTA: STAGES pipeline stages, then per consumer warpgroup its epilogue
// staging tile and per-row routing data, then the full/empty mbarriers.
template <int BN, bool SPARSE, bool SHARED_B>
struct GemmSmem {
  using Cfg = GemmConfig<BN, SPARSE, SHARED_B>;
  uint8_t* base;
  __device__ __forceinline__ uint8_t* stage(int st) const { return base + st * Cfg::kStageBytes; }
  __device__ __forceinline__ uint8_t* epi(int cw) const {
    return base + Cfg::kStages * Cfg::kStageBytes + cw * BN * 128;
  }
  __device__ __forceinline__ float* row_weight(int cw) const {
    return reinterpret_cast<float*>(base + Cfg::kStages * Cfg::kStageBytes + Cfg::kEpiBytes + cw * BN * 8);
  }
  __device__ __forceinline__ int* row_dest(int cw) const { return reinterpret_cast<int*>(row_weight(cw) + BN); }
  __device__ __forceinline__ uint64_t* full() const {
    return reinterpret_cast<uint64_t*>(base + Cfg::kStages * Cfg::kStageBytes + Cfg::kEpiBytes + Cfg::kAuxBytes);
  }
  __device__ __forceinline__ uint64_t* empty() const { return full() + Cfg::kStages; }
  // two ints after the barriers (the fused decode kernel's broadcasts: csrc/decode.cuh)
  __device__ __forceinline__ int* flags() const { return reinterpret_cast<int*>(empty() + Cfg::kStages); }
};

// One output tile: row block b, M tile m, K split s covering pipeline stages [kb0, kb1).
struct Tile {
  int b, m, s, kb0, kb1;
  __device__ __forceinline__ Tile(const TileScheduler& sched, const GemmParams& p, int tile) {
    sched.get(tile, b, m, s);
    kb0 = s * p.k_blocks_per_split;
    kb1 = min(p.k_stages, kb0 + p.k_blocks_per_split);
  }
};

// The row block of a tile: its expert and its rows [start, start + height) of the layout.
struct RowBlock {
  int e = 0, start = 0, height = 0;
  RowBlock() = default;
  __device__ __forceinline__ RowBlock(const GemmParams& p, int b)
      : e(p.block_expert[b]), start(p.block_start[b]), height(p.block_height[b]) {}
};

// Kept K block q of a weight panel (its row of block_idx at `panel_idx`). block_idx is the caller's tensor, so
// the index is clamped into the K blocks before it becomes an address: a corrupt or not-yet-written weight gives
// wrong numbers, never a read outside b_src (the debug build reports it instead).
__device__ __forceinline__ int kept_block(const GemmParams& p, const int* panel_idx, int q) {
  const int v = __ldg(panel_idx + q);
  const int num_k_blocks = p.K >> p.bw_log2;
  HARE_DEVICE_CHECK(v >= 0 && v < num_k_blocks, "block_idx entry %d = %d not in [0, %d)", q, v, num_k_blocks);
  return min(max(v, 0), num_k_blocks - 1);
}

// ---------------------------------------------------------------------------------------------- producer
// Warpgroup 2, one tile: TMA of the two weight boxes (and their 2:4 metadata) and the cp.async gather of the
// token rows into each of its stages; a stage's full barrier completes when both have landed. `it` counts stages
// over the CTA's tiles (the consumers count the same). The first `prefetch` stages get their weights first, then
// `ready()` runs (the fused decode kernel waits there until the token rows exist; the weights do not depend on
// them), then their token rows; the other stages get both together.
template <int BN, int PROJ, bool SPARSE, bool SHARED_B, class Ready>
__device__ __forceinline__ void produce_tile(const CUtensorMap* tmap_a, const CUtensorMap* tmap_meta,
                                             const GemmParams& p, const Tile& t, int& it,
                                             const GemmSmem<BN, SPARSE, SHARED_B>& sm, int tid, int prefetch,
                                             Ready ready) {
  using Cfg = GemmConfig<BN, SPARSE, SHARED_B>;
  constexpr int STAGES = Cfg::kStages;
  uint64_t* full = sm.full();
  uint64_t* empty = sm.empty();
  const RowBlock rb(p, t.b);
  const int e = rb.e, start = rb.start, height = rb.height;
  HARE_DEVICE_CHECK(e >= 0 && e < p.num_experts && height >= 1 && height <= BN && start >= 0 &&
                        start + height <= p.num_rows,
                    "row block %d: expert %d, rows [%d, +%d) (E %d, R %d, BN %d)", t.b, e, start, height,
                    p.num_experts, p.num_rows, BN);
  RowGather<BN, kProducerThreads> g;
  if constexpr (PROJ == kGateUp) {
    g.setup(height, tid, [&](int r) {
      const int token = p.gather_index[start + r];
      HARE_DEVICE_CHECK(token >= 0 && token < p.num_rows / p.top_k, "gather_index[%d] = %d not in [0, %d)",
                        start + r, token, p.num_rows / p.top_k);
      return token;
    });
  } else {
    g.setup(height, tid, [&](int r) { return start + r; });
  }
  const int row0 = e * p.a_rows_per_expert + t.m * p.m_tile;
  const int row1 = row0 + p.a_box1_offset;
  const int* bidx0 = nullptr;
  const int* bidx1 = nullptr;
  if constexpr (SPARSE) {  // a box past the last panel (out not a multiple of 256) reads masked rows only
    const int panel0 = min(t.m * (p.m_tile >> 7), p.panels - 1);
    const int panel1 = min(t.m * (p.m_tile >> 7) + p.box1_panel_offset, p.panels - 1);
    bidx0 = p.block_idx + (static_cast<long long>(e) * p.panels + panel0) * p.kept;
    bidx1 = p.block_idx + (static_cast<long long>(e) * p.panels + panel1) * p.kept;
  }
  auto wait_empty = [&](int i) { mbar_wait(&empty[(it + i) % STAGES], (((it + i) / STAGES) & 1) ^ 1); };
  auto weights = [&](int i) {
    if (tid != 0) return;
    const int st = (it + i) % STAGES, kb = t.kb0 + i;
    uint8_t* a = sm.stage(st);
    if constexpr (SPARSE) {
      uint8_t* meta = a + Cfg::kABytes + Cfg::kBBytes;
      mbar_arrive_expect_tx(&full[st], Cfg::kABytes + Cfg::kMetaBytes);
      tma_load_2d(a, tmap_a, &full[st], kb * 32, row0);
      tma_load_2d(a + Cfg::kABytes / 2, tmap_a, &full[st], kb * 32, row1);
      tma_load_2d(meta, tmap_meta, &full[st], kb * 128, row0 >> 4);
      tma_load_2d(meta + 1024, tmap_meta, &full[st], kb * 128, row1 >> 4);
    } else {
      mbar_arrive_expect_tx(&full[st], Cfg::kABytes);
      tma_load_2d(a, tmap_a, &full[st], kb * 64, row0);
      tma_load_2d(a + Cfg::kABytes / 2, tmap_a, &full[st], kb * 64, row1);
    }
  };
  auto tokens = [&](int i) {
    const int st = (it + i) % STAGES, kb = t.kb0 + i;
    uint8_t* b = sm.stage(st) + Cfg::kABytes;
    if constexpr (SPARSE) {
      if (SHARED_B && p.all_kept) {
        g.load(smem_u32(b), p.b_src, p.K, kb * 64);
      } else {
        // logical columns past the last kept block (the zero-filled tail of the values) read the last block
        const int logical = kb * 64 + g.col;
        const int q = min(logical >> p.bw_log2, p.kept - 1);
        const int off = logical & ((1 << p.bw_log2) - 1);
        g.load_at(smem_u32(b), p.b_src, p.K, (kept_block(p, bidx0, q) << p.bw_log2) + off);
        if constexpr (!SHARED_B) {
          g.load_at(smem_u32(b + Cfg::kBTileBytes), p.b_src, p.K, (kept_block(p, bidx1, q) << p.bw_log2) + off);
        }
      }
    } else {
      g.load(smem_u32(b), p.b_src, p.K, kb * 64);
    }
    cp_async_arrive_noinc(&full[st]);
  };
  const int n = t.kb1 - t.kb0;
  const int pre = min(prefetch, n);
  for (int i = 0; i < pre; ++i) {
    wait_empty(i);
    weights(i);
  }
  ready();
  for (int i = 0; i < n; ++i) {
    if (i >= pre) {
      wait_empty(i);
      weights(i);
    }
    tokens(i);
  }
  it += n;
}

__device__ __forceinline__ void prefetch_tensor_maps(const CUtensorMap* a, const CUtensorMap* meta) {
  tma_prefetch_desc(a);
  if (meta != nullptr) tma_prefetch_desc(meta);
}

// ---------------------------------------------------------------------------------------------- mainloop
// One consumer warpgroup's K loop of one tile: acc0 / acc1 (its 64 rows of box 0 / box 1 x BN tokens). wgmma
// groups of consecutive K blocks overlap: after issuing block kb, wait until only that group is in flight, then
// release the previous block's stage. `it` counts stages over the CTA's tiles (the producer counts the same).
template <int BN, bool SPARSE, bool SHARED_B>
__device__ __forceinline__ void mainloop(float (&acc0)[BN / 2], float (&acc1)[BN / 2], const GemmParams& p,
                                         const Tile& t, int& it, int cw, int lane, int meta_word,
                                         const GemmSmem<BN, SPARSE, SHARED_B>& sm) {
  using Cfg = GemmConfig<BN, SPARSE, SHARED_B>;
  constexpr int STAGES = Cfg::kStages;
  uint64_t* full = sm.full();
  uint64_t* empty = sm.empty();
  int prev_st = -1;
  for (int kb = t.kb0; kb < t.kb1; ++kb, ++it) {
    const int st = it % STAGES;
    mbar_wait(&full[st], (it / STAGES) & 1);
    fence_proxy_async_smem();  // the producer's cp.async rows (generic proxy) before wgmma reads them
    const uint8_t* a = sm.stage(st);
    if constexpr (SPARSE) {
      const uint64_t da0 = make_desc<64>(a + cw * 64 * 64);
      const uint64_t da1 = make_desc<64>(a + Cfg::kABytes / 2 + cw * 64 * 64);
      const uint64_t db0 = make_desc<128>(a + Cfg::kABytes);
      const uint64_t db1 = SHARED_B ? db0 : make_desc<128>(a + Cfg::kABytes + Cfg::kBTileBytes);
      const uint32_t* meta = reinterpret_cast<const uint32_t*>(a + Cfg::kABytes + Cfg::kBBytes) + meta_word;
      const uint32_t e00 = meta[0], e01 = meta[16], e10 = meta[256], e11 = meta[256 + 16];
      fence_operand(acc0);
      fence_operand(acc1);
      wgmma_fence();
      const int scale_d = kb > t.kb0 ? 1 : 0;
      WgmmaSp<BN>::mma(acc0, da0, db0, e00, scale_d);
      WgmmaSp<BN>::mma(acc1, da1, db1, e10, scale_d);
      WgmmaSp<BN>::mma(acc0, da0 + 2, db0 + 4, e01, 1);
      WgmmaSp<BN>::mma(acc1, da1 + 2, db1 + 4, e11, 1);
    } else {
      const uint64_t da0 = make_desc<128>(a + cw * 64 * 128);
      const uint64_t da1 = make_desc<128>(a + Cfg::kABytes / 2 + cw * 64 * 128);
      const uint64_t db = make_desc<128>(a + Cfg::kABytes);
      fence_operand(acc0);
      fence_operand(acc1);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int scale_d = (kb > t.kb0 || k > 0) ? 1 : 0;
        Wgmma<BN>::mma(acc0, da0 + 2 * k, db + 2 * k, scale_d);
        Wgmma<BN>::mma(acc1, da1 + 2 * k, db + 2 * k, scale_d);
      }
    }
    wgmma_commit();
    wgmma_wait<1>();
    fence_operand(acc0);
    fence_operand(acc1);
    if (prev_st >= 0 && lane == 0) mbar_arrive(&empty[prev_st]);
    prev_st = st;
  }
  wgmma_wait<0>();
  fence_operand(acc0);
  fence_operand(acc1);
  if (prev_st >= 0 && lane == 0) mbar_arrive(&empty[prev_st]);
}

// ---------------------------------------------------------------------------------------------- epilogues
// Each consumer warpgroup writes its own 64 out-dim columns of the tile: cw selects them, t is the thread within
// the warpgroup. The staging tile is shared by the warpgroup's 128 threads (named barrier 1 + cw).

// Split gate/up (decode): fp32 partial gate | up sums to (splits, R, 2F); hare_glu_combine finishes.
template <int BN>
__device__ __forceinline__ void epilogue_gate_up_partials(const GemmParams& p, const Tile& t, int e, int start,
                                                          int height, const float (&acc0)[BN / 2],
                                                          const float (&acc1)[BN / 2], int cw, int warp, int lane) {
  float* part = static_cast<float*>(p.out) + t.s * p.out_split_stride;
  const int f0 = t.m * 128 + cw * 64;
  const float* bias = t.s == 0 && p.bias != nullptr ? p.bias + static_cast<long long>(e) * 2 * p.M : nullptr;
  const float2 bg = row_bias_pair(bias, f0, p.M, warp, lane);
  const float2 bu = row_bias_pair(bias == nullptr ? nullptr : bias + p.M, f0, p.M, warp, lane);
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) {
    const bool hi = (i & 2) != 0;
    const int f = f0 + acc_row0(warp, lane) + (hi ? 8 : 0);
    const int n = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
    if (n < height && f < p.M) {
      float* row = part + static_cast<long long>(start + n) * (2 * p.M);
      row[f] = acc0[i] + (hi ? bg.y : bg.x);
      row[p.M + f] = acc1[i] + (hi ? bu.y : bu.x);
    }
  }
}

// gate/up: h[row, f] = glu(gate + bias, up + bias) for the tile's 64 ffn columns of this warpgroup, bf16.
template <int BN, int ACT>
__device__ __forceinline__ void epilogue_gate_up(const GemmParams& p, const Tile& t, int e, int start, int height,
                                                 const float (&acc0)[BN / 2], const float (&acc1)[BN / 2],
                                                 uint8_t* epi, int cw, int tid, int warp, int lane) {
  const int col0 = t.m * 128 + cw * 64;
  const float* bias = p.bias == nullptr ? nullptr : p.bias + static_cast<long long>(e) * 2 * p.M;
  const float2 bg = row_bias_pair(bias, col0, p.M, warp, lane);
  const float2 bu = row_bias_pair(bias == nullptr ? nullptr : bias + p.M, col0, p.M, warp, lane);
  stage_glu<BN, ACT>(epi, acc0, acc1, bg, bu, GluArgs{p.act_alpha, p.act_limit}, warp, lane);
  named_barrier(1 + cw, 128);
  if (col0 < p.M) {
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
    for (int q = tid; q < BN * 8; q += 128) {
      const int n = q >> 3, c = q & 7;
      if (n < height) {
        const uint4 v = *reinterpret_cast<const uint4*>(epi + stage_chunk_offset(n, c));
        *reinterpret_cast<uint4*>(out + static_cast<long long>(start + n) * p.M + col0 + c * 8) = v;
      }
    }
  }
}

// The (token, slot) assignment of row `tid` of a down tile (-1 past the block's height or BN), loaded before the
// tile's main loop so that its latency hides behind the MMAs instead of opening the epilogue.
template <int BN>
__device__ __forceinline__ int load_row_assignment(const GemmParams& p, int start, int height, int tid) {
  static_assert(BN <= 128, "one row per consumer thread");
  if (tid >= BN || tid >= height) return -1;
  const int ra = p.row_assignment[start + tid];
  HARE_DEVICE_CHECK(ra >= 0 && ra < p.num_rows, "row_assignment[%d] = %d not in [0, %d)", start + tid, ra,
                    p.num_rows);
  return ra;
}

// down: (acc + bias) * routing weight of each row, to its (token, slot) row of Y (kDet) or added to its token's
// fp32 row (kFast); the warpgroup's columns of box 0, then of box 1, through the one staging tile.
template <int BN, int RED>
__device__ __forceinline__ void epilogue_down(const GemmParams& p, const Tile& t, int e, int height, int ra,
                                              const float (&acc0)[BN / 2], const float (&acc1)[BN / 2],
                                              uint8_t* epi, float* row_weight, int* row_dest, int cw, int tid,
                                              int warp, int lane) {
  if (tid < BN) {
    row_weight[tid] = ra >= 0 ? p.topk_weights[ra] : 0.0f;
    row_dest[tid] = ra < 0 ? 0 : RED == kFast ? ra / p.top_k : ra;
  }
  named_barrier(1 + cw, 128);
  const float* bias = t.s == 0 && p.bias != nullptr ? p.bias + static_cast<long long>(e) * p.M : nullptr;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int col0 = t.m * p.m_tile + half * p.a_box1_offset + cw * 64;
    const float2 bias2 = row_bias_pair(bias, col0, p.M, warp, lane);
    if (half == 0) stage_scaled<BN>(epi, acc0, bias2, row_weight, warp, lane);
    else stage_scaled<BN>(epi, acc1, bias2, row_weight, warp, lane);
    named_barrier(1 + cw, 128);
    if (col0 < p.M) {
      for (int q = tid; q < BN * 8; q += 128) {
        const int n = q >> 3, c = q & 7;
        if (n < height) {
          const uint4 v = *reinterpret_cast<const uint4*>(epi + stage_chunk_offset(n, c));
          const long long off = static_cast<long long>(row_dest[n]) * p.M + col0 + c * 8;
          if constexpr (RED == kFast) {
            atomic_add_bf16x8_to_f32(static_cast<float*>(p.out) + off, v);
          } else {
            __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + t.s * p.out_split_stride;
            *reinterpret_cast<uint4*>(out + off) = v;
          }
        }
      }
    }
    if (half == 0) named_barrier(1 + cw, 128);
  }
}

// The CTA's prologue: checks the dynamic shared memory it was given, initialises the stages' barriers (the full
// barrier counts TMA's arrival and every producer thread's cp.async arrival; the empty barrier one arrival per
// consumer warp) and the decode kernel's flags. Touches no global memory (it may overlap the previous kernel).
template <int BN, bool SPARSE, bool SHARED_B>
__device__ __forceinline__ void init_pipeline(const GemmSmem<BN, SPARSE, SHARED_B>& sm) {
  using Cfg = GemmConfig<BN, SPARSE, SHARED_B>;
  if (threadIdx.x == 0) {
    uint32_t dyn;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
    if ((smem_u32(sm.base) & 1023) != 0 || dyn < static_cast<uint32_t>(Cfg::kSmemBytes)) __trap();
#pragma unroll
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(&sm.full()[s], 1 + kProducerThreads);
      mbar_init(&sm.empty()[s], 8);
    }
    sm.flags()[0] = 0;
    sm.flags()[1] = 0;
    mbar_init_fence();
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------- the kernel
// EPI: an Activation (PROJ == kGateUp) or a Reduction (PROJ == kDown).
template <int BN, int PROJ, int EPI, bool SPARSE, bool SHARED_B>
__device__ __forceinline__ void moe_gemm_body(const CUtensorMap* tmap_a, const CUtensorMap* tmap_meta,
                                              const GemmParams& p) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const GemmSmem<BN, SPARSE, SHARED_B> sm{smem};
  const int wg = threadIdx.x / 128;  // 0, 1: consumers; 2: the producer warpgroup
  init_pipeline(sm);
  grid_dependency_wait();  // the prologue above touched no global memory; everything below may depend on it
  allow_dependents_launch();

  const TileScheduler sched(*p.num_blocks, p.num_m, p.splits, p.group);
  HARE_DEVICE_CHECK(sched.num_blocks >= 0 && sched.num_blocks <= p.num_slots, "num_blocks %d not in [0, %d]",
                    sched.num_blocks, p.num_slots);
  if (wg == 2) {  // the producer
    setmaxnreg_dec<56>();
    const int tid = threadIdx.x - 256;
    if (tid == 0) prefetch_tensor_maps(tmap_a, tmap_meta);
    int it = 0;
    for (int tile = blockIdx.x; tile < sched.total; tile += gridDim.x) {
      produce_tile<BN, PROJ, SPARSE, SHARED_B>(tmap_a, tmap_meta, p, Tile(sched, p, tile), it, sm, tid, 0, [] {});
    }
    cp_async_wait_all();  // leave no copy in flight behind an exiting thread
    return;
  }
  setmaxnreg_inc<224>();
  const int cw = wg;
  const int tid = threadIdx.x - 128 * wg;
  const int warp = tid >> 5, lane = tid & 31;
  // sparse: this thread's metadata word in a stage's metadata box (blocknm.py): 16-row group 4 cw + warp,
  // slot 2 (lane / 4) + lane % 2; steps 64 bytes apart, box 1 at +1 KB
  const int meta_word = (4 * cw + warp) * 32 + (lane >> 2) * 2 + (lane & 1);
  uint8_t* epi = sm.epi(cw);
  float acc0[BN / 2], acc1[BN / 2];
  int it = 0;
  for (int tile = blockIdx.x; tile < sched.total; tile += gridDim.x) {
    const Tile t(sched, p, tile);
    // a down tile reads its row block and row assignments before its main loop, so that their two dependent
    // global round trips overlap the MMAs instead of opening the epilogue (gate/up tiles read theirs after it:
    // the registers held across the loop would spill in the sparse BN = 128 kernels)
    RowBlock rb;
    int ra = -1;
    if constexpr (PROJ == kDown) {
      rb = RowBlock(p, t.b);
      ra = load_row_assignment<BN>(p, rb.start, rb.height, tid);
    }
    mainloop<BN, SPARSE, SHARED_B>(acc0, acc1, p, t, it, cw, lane, meta_word, sm);
    if constexpr (PROJ == kGateUp) rb = RowBlock(p, t.b);
    named_barrier(1 + cw, 128);  // the previous tile's staging reads are done
    if constexpr (PROJ == kGateUp) {
      if (p.splits > 1) {
        epilogue_gate_up_partials<BN>(p, t, rb.e, rb.start, rb.height, acc0, acc1, cw, warp, lane);
      } else {
        epilogue_gate_up<BN, EPI>(p, t, rb.e, rb.start, rb.height, acc0, acc1, epi, cw, tid, warp, lane);
      }
    } else {
      epilogue_down<BN, EPI>(p, t, rb.e, rb.height, ra, acc0, acc1, epi, sm.row_weight(cw), sm.row_dest(cw), cw,
                             tid, warp, lane);
    }
  }
}

}  // namespace hare
