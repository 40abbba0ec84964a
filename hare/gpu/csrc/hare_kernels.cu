// hare_kernels.cu: every kernel Hare launches, as extern "C" entry points (names looked up by
// hare/gpu/_launch.py). Built once per source hash with nvcc -gencode=arch=compute_90a,code=sm_90a to a cubin.
#include <cuda.h>
#include "moe_gemm.cuh"
#include "layout.cuh"
#include "combine.cuh"

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
HARE_SMALL_KERNEL(hare_glu_combine_silu, 256, GluCombineParams, glu_combine<kSilu>)
HARE_SMALL_KERNEL(hare_glu_combine_gelu, 256, GluCombineParams, glu_combine<kGelu>)

// GEMM entry points: hare_<kind>_bn<BN> (dense weights) and hare_<kind>_sp_bn<BN> (Block N:M sparse weights:
// values and metadata tensor maps), for kind in gateup_silu, gateup_gelu, down_det, down_fast.
#define HARE_DENSE_GEMM(NAME, BN, KIND)                                                                    \
  extern "C" __global__ void __launch_bounds__(kGemmThreads, 1)                                            \
      NAME(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) {                               \
    moe_gemm_body<BN, KIND, false>(&tmap_a, nullptr, p);                                                   \
  }
#define HARE_SPARSE_GEMM(NAME, BN, KIND)                                                                   \
  extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) NAME(                                      \
      const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_meta,           \
      const GemmParams p) {                                                                                \
    moe_gemm_body<BN, KIND, true>(&tmap_a, &tmap_meta, p);                                                 \
  }
#define HARE_GEMM_KIND(NAME, KIND)                                                                         \
  HARE_DENSE_GEMM(hare_##NAME##_bn16, 16, KIND)                                                            \
  HARE_DENSE_GEMM(hare_##NAME##_bn32, 32, KIND)                                                            \
  HARE_DENSE_GEMM(hare_##NAME##_bn64, 64, KIND)                                                            \
  HARE_DENSE_GEMM(hare_##NAME##_bn128, 128, KIND)                                                          \
  HARE_SPARSE_GEMM(hare_##NAME##_sp_bn16, 16, KIND)                                                        \
  HARE_SPARSE_GEMM(hare_##NAME##_sp_bn32, 32, KIND)                                                        \
  HARE_SPARSE_GEMM(hare_##NAME##_sp_bn64, 64, KIND)                                                        \
  HARE_SPARSE_GEMM(hare_##NAME##_sp_bn128, 128, KIND)

HARE_GEMM_KIND(gateup_silu, kGateUpSilu)
HARE_GEMM_KIND(gateup_gelu, kGateUpGelu)
HARE_GEMM_KIND(down_det, kDownDet)
HARE_GEMM_KIND(down_fast, kDownFast)
