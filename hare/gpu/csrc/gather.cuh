// gather.cuh: row gathers into 128-byte-swizzled shared memory with cp.async (TMA cannot gather rows).
//
// A tile holds `ROWS` rows of 64 bf16 (128 bytes) each, in the layout TMA's SWIZZLE_128B writes and wgmma's
// 128B-swizzle descriptor reads: 16-byte chunk c of row r sits at byte r*128 + ((c ^ (r % 8)) * 16); the
// tile base is 1024-byte aligned. Rows past the block's height are zero-filled (src-size 0), never read.
#pragma once
#include <cstdint>
#include "common.cuh"

namespace hare {

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const uint32_t src_size = valid ? 16u : 0u;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
}
// One arrival on `bar` once every cp.async this thread issued so far has landed. noinc: the barrier's expected
// count includes this arrival (the producer threads are counted at mbar_init), so the thread never waits.
__device__ __forceinline__ void cp_async_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Per-thread state of one gathered tile loaded by THREADS producer threads: thread `tid` owns 16-byte chunk
// column (tid % 8) of rows tid/8 + (THREADS/8)*u, u < ROWS*8/THREADS, and keeps one source row index per u
// (-1 when the row is past the block's height: zero-filled).
template <int ROWS, int THREADS>
struct RowGather {
  static constexpr int kRowStep = THREADS / 8;
  static constexpr int kPerThread = ROWS / kRowStep;
  static_assert(ROWS % kRowStep == 0, "rows per tile must be a multiple of THREADS / 8");
  int row[kPerThread];
  int r0, col;

  template <typename RowOf>
  __device__ __forceinline__ void setup(int height, int tid, RowOf row_of) {
    r0 = tid >> 3;
    col = (tid & 7) * 8;
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int r = r0 + kRowStep * u;
      row[u] = r < height ? row_of(r) : -1;
    }
  }

  // Issues the cp.async loads of K chunk [k0, k0 + 64) of rows of `base` (row stride `ld` elements) into the
  // tile at shared address `tile`.
  __device__ __forceinline__ void load(uint32_t tile, const __nv_bfloat16* base, int64_t ld, int k0) const {
    load_at(tile, base, ld, k0 + col);
  }

  // As load, with this thread's source column given directly: the sparse kernels map each 16-byte chunk of the
  // tile to a column of a kept K block, so the 8 chunks of a tile row come from up to 8 places.
  __device__ __forceinline__ void load_at(uint32_t tile, const __nv_bfloat16* base, int64_t ld, int src_col) const {
    const int c = col >> 3;
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int r = r0 + kRowStep * u;
      const bool valid = row[u] >= 0;
      const __nv_bfloat16* src = base + (valid ? static_cast<int64_t>(row[u]) * ld + src_col : 0);
      cp_async_16(tile + static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4)), src, valid);
    }
  }
};

}  // namespace hare
