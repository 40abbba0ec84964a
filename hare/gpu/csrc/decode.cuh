// decode.cuh: the fused decode kernel, one persistent launch for a whole MoE layer after the layout:
// gate/up GEMM + gated unit, down GEMM, top-k (and K-split) sum (hare/gpu/plan.py plan_moe says when).
//
// At decode a layer moves megabytes of weights in tens of microseconds, so the gaps between kernels (each one's
// pipeline fill, the tail of the one before, the split and top-k combines) cost as much as the bytes. Here one
// grid of at most one CTA per SM walks one list of tiles: every gate/up tile (row block, M tile, K split), then
// every down tile. A CTA's tiles are tile = blockIdx.x + i * gridDim.x in order, so it finishes its gate/up tiles
// before it starts a down tile, and only down tiles wait (for their row block's h): with every CTA resident
// (grid <= SMs, one CTA per SM) the waits cannot deadlock. The dependencies are counters in global memory:
//   gate/up, K split: each split writes fp32 partials (as the split GEMM does) and counts itself in
//                     tile_count[block, m]; the last split sums the partials in split order, applies the gated
//                     unit (exactly hare_glu_combine's arithmetic) and writes h;
//   block_ready[b]:   gate/up M tiles of row block b whose h is written; a down tile of block b waits for all;
//                     its producer issues the tile's first stages of weights (TMA) before it waits, so weight
//                     streaming overlaps the gate/up tail;
//   token_count[t, m]: down rows of token t for down M tile m written to Y (per (token, slot, split), routing
//                     weight applied, as the unfused kernel writes them); the tile bringing it to top_k * splits
//                     sums the token's rows in (split, slot) order (hare_combine's order) into out.
// So the result is bit-identical to the unfused deterministic path with the same splits. Every counter is zero at
// rest: the last arriver of tile_count and token_count resets its entry, and the last CTA to exit (exit_ticket)
// resets block_ready and the ticket. The counters are the device's (hare/gpu/_launch.py), so like the layout's
// ticket, two fused decode calls must not run at the same time on two streams of one device.
// The kernel lets its dependents launch only when its CTA has finished every tile: a dependent's CTA holding an
// SM while this grid still waits on a CTA not yet resident would deadlock.
#pragma once
#include "moe_gemm.cuh"

namespace hare {

template <int A>
struct ActivationTag {
  static constexpr int value = A;
};

// f(ActivationTag<act>{}) for the runtime gated unit `act` (the decode kernel takes it as an argument: one kernel
// per tile width and weight kind instead of four).
template <class F>
__device__ __forceinline__ void with_activation(int act, F&& f) {
  switch (act) {
    case kGelu: f(ActivationTag<kGelu>{}); break;
    case kClampedSilu: f(ActivationTag<kClampedSilu>{}); break;
    case kGptOss: f(ActivationTag<kGptOss>{}); break;
    default: f(ActivationTag<kSilu>{}); break;
  }
}

// Counter arrivals at gpu scope. Release: every write this CTA made before the barrier that precedes the call is
// visible to whoever acquires the counter; acq_rel also acquires the writes released by the earlier arrivals (so the
// last arriver reads them after its next barrier). No fence.sc: arriving costs one L2 round trip, or none (red).
__device__ __forceinline__ int arrive_acq_rel(int* p) {
  int old;
  asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], 1;\n" : "=r"(old) : "l"(p) : "memory");
  return old;
}
__device__ __forceinline__ void arrive_release(int* p) {
  asm volatile("red.add.release.gpu.global.s32 [%0], 1;\n" ::"l"(p) : "memory");
}

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The timeline of one call (DecodeParams::trace, scripts/profile_layer.py --timeline): per tile, the global timer
// (ns) when its consumers start it, when its MMAs are done, when it is finished, and when its producer may gather
// its token rows (down: the wait for h is over).
enum TraceMark { kTraceStart = 0, kTraceMma = 1, kTraceEnd = 2, kTraceReady = 3 };
__device__ __forceinline__ void trace(const DecodeParams& dp, int tile, int mark) {
  if (dp.trace == nullptr) return;
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  dp.trace[tile * 4 + mark] = t;
}

// The 256 consumer threads of the CTA (named barrier 4; 1 + cw are the warpgroups', 3 the producer's).
__device__ __forceinline__ void consumers_barrier() { named_barrier(4, 256); }

// The last split of gate/up tile t: h[row, f] = glu(sum_s gate_s, sum_s up_s) for its rows and 128 ffn columns,
// the partials read from L2 in split order (split 0 holds the bias), as hare_glu_combine computes them.
template <int ACT>
__device__ __forceinline__ void finish_gate_up_splits(const GemmParams& gu, const DecodeParams& dp, const Tile& t,
                                                      const RowBlock& rb, int tid) {
  const float* part = static_cast<const float*>(gu.out);
  const int F = gu.M;
  for (int q = tid; q < rb.height * 128; q += 256) {
    const int n = q >> 7, f = t.m * 128 + (q & 127);
    if (f >= F) continue;
    const long long row = rb.start + n;
    const float* base = part + row * (2 * F) + f;
    float g = 0.0f, u = 0.0f;
    for (int s = 0; s < gu.splits; ++s) {
      g += __ldcg(base + s * gu.out_split_stride);
      u += __ldcg(base + s * gu.out_split_stride + F);
    }
    dp.h[row * F + f] = __float2bfloat16_rn(glu<ACT>(g, u, GluArgs{gu.act_alpha, gu.act_limit}));
  }
}

// Token rows `tokens[0, count)` of down M tile t are complete in Y: out[token, tile's columns] = sum over (split,
// slot) of Y[split, token * k + slot, column], fp32, in hare_combine's order. 32 16-byte chunks per token (two
// 128-column boxes), 8 tokens per pass of the 256 threads.
__device__ __forceinline__ void finish_tokens(const GemmParams& dn, const DecodeParams& dp, const Tile& t,
                                              const int* tokens, int count, int tid) {
  const __nv_bfloat16* y = static_cast<const __nv_bfloat16*>(dn.out);
  const int H = dn.M, k = dn.top_k;
  for (int q = tid; q < count * 32; q += 256) {
    const int token = tokens[q >> 5], chunk = q & 31;
    const int col = t.m * dn.m_tile + (chunk >> 4) * dn.a_box1_offset + (chunk & 15) * 8;
    if (col >= H) continue;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    for (int s = 0; s < dn.splits; ++s) {
      for (int j = 0; j < k; ++j) {
        const uint4 v = __ldcg(reinterpret_cast<const uint4*>(
            y + s * dn.out_split_stride + (static_cast<long long>(token) * k + j) * H + col));
        add_bf16x8(acc, v);
      }
    }
    const uint4 o = pack_bf16x8(acc);
    *reinterpret_cast<uint4*>(dp.out + static_cast<long long>(token) * H + col) = o;
  }
}

template <int BN, bool SPARSE, bool SHARED_B>
__device__ __forceinline__ void decode_body(const CUtensorMap* gu_a, const CUtensorMap* gu_meta,
                                            const CUtensorMap* dn_a, const CUtensorMap* dn_meta, const GemmParams& gu,
                                            const GemmParams& dn, const DecodeParams& dp) {
  using Cfg = GemmConfig<BN, SPARSE, SHARED_B>;
  extern __shared__ __align__(1024) uint8_t smem[];
  const GemmSmem<BN, SPARSE, SHARED_B> sm{smem};
  const int wg = threadIdx.x / 128;  // 0, 1: consumers; 2: the producer warpgroup
  init_pipeline(sm);
  grid_dependency_wait();  // the layout

  const int num_blocks = *gu.num_blocks;
  HARE_DEVICE_CHECK(num_blocks >= 0 && num_blocks <= gu.num_slots, "num_blocks %d not in [0, %d]", num_blocks,
                    gu.num_slots);
  const TileScheduler sa(num_blocks, gu.num_m, gu.splits, gu.group);  // gate/up tiles [0, sa.total)
  const TileScheduler sb(num_blocks, dn.num_m, dn.splits, dn.group);  // down tiles after them
  const int total = sa.total + sb.total;
  if (wg == 2) {  // the producer
    setmaxnreg_dec<56>();
    const int tid = threadIdx.x - 256;
    if (tid == 0) {
      prefetch_tensor_maps(gu_a, gu_meta);
      prefetch_tensor_maps(dn_a, dn_meta);
    }
    int it = 0;
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
      if (tile < sa.total) {
        produce_tile<BN, kGateUp, SPARSE, SHARED_B>(gu_a, gu_meta, gu, Tile(sa, gu, tile), it, sm, tid, 0, [] {});
      } else {
        const Tile t(sb, dn, tile - sa.total);
        produce_tile<BN, kDown, SPARSE, SHARED_B>(dn_a, dn_meta, dn, t, it, sm, tid, Cfg::kStages, [&] {
          if (tid == 0) {
            while (load_acquire(dp.block_ready + t.b) < gu.num_m) {
            }
            trace(dp, tile, kTraceReady);
          }
          named_barrier(3, kProducerThreads);  // h of the row block is written (acquired by thread 0)
        });
      }
    }
    cp_async_wait_all();
  } else {
    setmaxnreg_inc<224>();
    const int cw = wg;
    const int tid = threadIdx.x - 128 * wg;  // in the warpgroup
    const int ctid = threadIdx.x;            // in the two consumer warpgroups
    const int warp = tid >> 5, lane = tid & 31;
    const int meta_word = (4 * cw + warp) * 32 + (lane >> 2) * 2 + (lane & 1);  // as moe_gemm_body's
    uint8_t* epi = sm.epi(cw);
    int* flags = sm.flags();
    float acc0[BN / 2], acc1[BN / 2];
    int it = 0;
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
      if (ctid == 0) trace(dp, tile, kTraceStart);
      if (tile < sa.total) {  // gate/up
        const Tile t(sa, gu, tile);
        mainloop<BN, SPARSE, SHARED_B>(acc0, acc1, gu, t, it, cw, lane, meta_word, sm);
        if (ctid == 0) trace(dp, tile, kTraceMma);
        const RowBlock rb(gu, t.b);
        named_barrier(1 + cw, 128);  // the previous tile's staging reads are done
        bool done = true;
        if (gu.splits > 1) {
          epilogue_gate_up_partials<BN>(gu, t, rb.e, rb.start, rb.height, acc0, acc1, cw, warp, lane);
          consumers_barrier();
          if (ctid == 0) {  // the last split acquires the others' partials, for every consumer thread after the barrier
            int* c = dp.tile_count + t.b * gu.num_m + t.m;
            const bool last = arrive_acq_rel(c) == gu.splits - 1;
            if (last) *c = 0;
            flags[0] = last;
          }
          consumers_barrier();
          done = flags[0] != 0;
          if (done) {
            with_activation(dp.activation, [&](auto act) {
              finish_gate_up_splits<decltype(act)::value>(gu, dp, t, rb, ctid);
            });
          }
        } else {
          with_activation(dp.activation, [&](auto act) {
            epilogue_gate_up<BN, decltype(act)::value>(gu, t, rb.e, rb.start, rb.height, acc0, acc1, epi, cw, tid,
                                                        warp, lane);
          });
        }
        if (done) {
          consumers_barrier();  // every h store of the tile issued
          if (ctid == 0) arrive_release(dp.block_ready + t.b);
        }
      } else {  // down
        const Tile t(sb, dn, tile - sa.total);
        const RowBlock rb(dn, t.b);
        const int ra = load_row_assignment<BN>(dn, rb.start, rb.height, tid);
        mainloop<BN, SPARSE, SHARED_B>(acc0, acc1, dn, t, it, cw, lane, meta_word, sm);
        if (ctid == 0) trace(dp, tile, kTraceMma);
        named_barrier(1 + cw, 128);
        epilogue_down<BN, kDet>(dn, t, rb.e, rb.height, ra, acc0, acc1, epi, sm.row_weight(cw), sm.row_dest(cw),
                                cw, tid, warp, lane);
        consumers_barrier();  // every Y store of the tile issued; row_dest(0) free for the token list
        int* tokens = sm.row_dest(0);
        if (cw == 0 && ra >= 0) {  // the last row of a token acquires its other rows, as above
          const int token = ra / dn.top_k;
          int* c = dp.token_count + token * dn.num_m + t.m;
          if (arrive_acq_rel(c) == dn.top_k * dn.splits - 1) {
            *c = 0;
            tokens[atomicAdd(&flags[1], 1)] = token;
          }
        }
        consumers_barrier();
        const int count = flags[1];
        if (count > 0) {
          finish_tokens(dn, dp, t, tokens, count, ctid);
        }
        consumers_barrier();  // the list is read
        if (ctid == 0) flags[1] = 0;
      }
      if (ctid == 0) trace(dp, tile, kTraceEnd);
    }
  }
  __syncthreads();
  allow_dependents_launch();  // no CTA of this grid waits any more (the header says why not earlier)
  bool last = false;
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(dp.exit_ticket, 1u) == gridDim.x - 1;
  }
  if (__syncthreads_or(last)) {  // the last CTA: every counter back to rest for the next call
    for (int i = threadIdx.x; i < gu.num_slots; i += blockDim.x) dp.block_ready[i] = 0;
    if (threadIdx.x == 0) *dp.exit_ticket = 0u;
  }
}

}  // namespace hare
