// scheduler.cuh: static persistent tile scheduler over (row block, M tile, K split).
//
// The number of used row blocks is read on the device (layout.num_blocks), so the launch shape depends only on
// (tokens, top-k, experts) and a launch never syncs with the host. Tiles are ordered in groups of `group` M tiles:
// inside a group the M tile varies fastest, then the row block, so the CTAs running at the same time share a few
// weight tiles (one expert's blocks are contiguous) and each gathered row block is re-read from L2 by `group` CTAs.
#pragma once

namespace hare {

struct TileScheduler {
  int num_blocks, num_m, splits, total, group;

  // group > 0: M-grouped order (G = group M tiles vary fastest, then the row block): concurrent CTAs share row
  //            blocks, each weight tile is re-read by every block of its expert as the groups sweep.
  // group < 0: block-grouped order (GB = -group row blocks vary fastest, then the M tile): concurrent CTAs
  //            working on one expert read the same weight tile at the same time (one DRAM read, L2 hits for the
  //            rest); the GB gathered row blocks stay in L2 across the M sweep.
  __device__ __forceinline__ TileScheduler(int num_blocks_, int num_m_, int splits_, int group_)
      : num_blocks(num_blocks_), num_m(num_m_), splits(splits_), total(num_blocks_ * num_m_ * splits_),
        group(group_ == 0 ? 1 : group_) {}

  // Tiles of an (outer x inner) grid, inner swept in groups of g.
  __device__ __forceinline__ static void swizzle(int t, int outer, int inner, int g, int& o, int& i) {
    g = inner < g ? inner : g;
    const int full_inner = (inner / g) * g;
    const int full = full_inner * outer;
    if (t < full) {
      const int gi = t / (outer * g);
      const int r = t - gi * (outer * g);
      o = r / g;
      i = gi * g + (r - o * g);
    } else {
      const int tail = inner - full_inner;
      const int r = t - full;
      o = r / tail;
      i = full_inner + (r - o * tail);
    }
  }

  __device__ __forceinline__ void get(int tile, int& block, int& m, int& split) const {
    split = tile % splits;
    const int t = tile / splits;
    if (group > 0) swizzle(t, num_blocks, num_m, group, block, m);
    else swizzle(t, num_m, num_blocks, -group, m, block);
  }
};

}  // namespace hare
