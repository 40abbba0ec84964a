// hare_kernels.cu: every kernel Hare launches, as extern "C" entry points (names looked up by
// hare/gpu/_launch.py). Built once per source hash with nvcc -gencode=arch=compute_90a,code=sm_90a to a cubin.
#include <cuda.h>
#include "moe_gemm.cuh"
#include "layout.cuh"
#include "combine.cuh"

using namespace hare;

extern "C" __global__ void __launch_bounds__(kLayoutThreads) hare_layout_count(const LayoutParams p) { layout_count(p); }
extern "C" __global__ void __launch_bounds__(kLayoutThreads) hare_layout_scatter(const LayoutParams p) { layout_scatter(p); }
extern "C" __global__ void __launch_bounds__(256) hare_combine(const CombineParams p) { combine(p); }
extern "C" __global__ void __launch_bounds__(256) hare_glu_combine_silu(const GluCombineParams p) { glu_combine<kSilu>(p); }
extern "C" __global__ void __launch_bounds__(256) hare_glu_combine_gelu(const GluCombineParams p) { glu_combine<kGelu>(p); }

extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_gateup_silu_bn16(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<16, kGateUpSilu>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_gateup_silu_bn32(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<32, kGateUpSilu>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_gateup_silu_bn64(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<64, kGateUpSilu>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_gateup_silu_bn128(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<128, kGateUpSilu>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_gateup_gelu_bn16(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<16, kGateUpGelu>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_gateup_gelu_bn32(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<32, kGateUpGelu>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_gateup_gelu_bn64(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<64, kGateUpGelu>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_gateup_gelu_bn128(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<128, kGateUpGelu>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_down_det_bn16(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<16, kDownDet>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_down_det_bn32(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<32, kDownDet>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_down_det_bn64(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<64, kDownDet>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_down_det_bn128(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<128, kDownDet>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_down_fast_bn16(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<16, kDownFast>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_down_fast_bn32(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<32, kDownFast>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_down_fast_bn64(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<64, kDownFast>(&tmap_a, p); }
extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) hare_down_fast_bn128(const __grid_constant__ CUtensorMap tmap_a, const GemmParams p) { moe_gemm_body<128, kDownFast>(&tmap_a, p); }

// Shared-memory bytes per GEMM variant, read by the host through cuModuleGetGlobal.

extern "C" __device__ const int hare_gemm_smem_bn16 = GemmConfig<16>::kSmemBytes;
extern "C" __device__ const int hare_gemm_smem_bn32 = GemmConfig<32>::kSmemBytes;
extern "C" __device__ const int hare_gemm_smem_bn64 = GemmConfig<64>::kSmemBytes;
extern "C" __device__ const int hare_gemm_smem_bn128 = GemmConfig<128>::kSmemBytes;
