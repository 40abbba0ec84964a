// hare_kernels.cu: every kernel Hare launches, as extern "C" entry points (named by hare/gpu/plan.py).
// Built once per source hash with nvcc -gencode=arch=compute_90a,code=sm_90a to a cubin.
#include <cuda.h>
#include "moe_gemm.cuh"
#include "layout.cuh"
#include "combine.cuh"
#include "decode.cuh"
#include "gemv.cuh"

using namespace hare;

// Small kernels have no prologue worth overlapping: they wait for the previous kernel first thing (common.cuh).
#define HARE_SMALL_KERNEL(NAME, THREADS, PARAMS, BODY)                                  \
  extern "C" __global__ void __launch_bounds__(THREADS) NAME(const PARAMS p) {        \
    grid_dependency_wait();                                                            \
    allow_dependents_launch();                                                         \
    BODY(p);                                                                           \
  }
HARE_SMALL_KERNEL(hare_layout_count, kLayoutThreads, LayoutParams, layout_count)
HARE_SMALL_KERNEL(hare_layout_scatter, kLayoutThreads, LayoutParams, layout_scatter)
HARE_SMALL_KERNEL(hare_combine, 256, CombineParams, combine)

// The few-token path (gemv.cuh): dense or Block N:M weights per projection; each kernel places its own grid
// dependency wait (the down kernel reads its ids and prefetches its weights before it). Three CTAs per SM (<= 85
// registers): 24 warps with 8 loads in flight each.
#define HARE_GEMV_KERNEL(NAME, BODY, SPARSE)                                                          \
  extern "C" __global__ void __launch_bounds__(kGemvThreads, 3) NAME(const GemvParams p, const LayoutParams lp) { \
    BODY<SPARSE>(p, lp);                                                                               \
  }
HARE_GEMV_KERNEL(hare_gemv_gateup, gemv_gate_up, false)
HARE_GEMV_KERNEL(hare_gemv_gateup_sp, gemv_gate_up, true)
HARE_GEMV_KERNEL(hare_gemv_down, gemv_down, false)
HARE_GEMV_KERNEL(hare_gemv_down_sp, gemv_down, true)

// Generated from the variant table of hare/gpu/plan.py: the GEMM entry points hare_<projection>_<epilogue>[_sp]
// _bn<BN> (dense: the weights' tensor map; sparse: values and metadata tensor maps) and the split gate/up combine
// hare_glu_combine_<unit> of every fused gated unit.
#include "hare_entry_points.cuh"
