// wgmma.cuh: warpgroup MMA (sm_90a) helpers. Token rows are the wgmma N in the swap-AB formulation, so the
// instructions are instantiated per N in {16, 32, 64, 128}:
//   Wgmma<N>::mma    D(64xN, f32) += A(64x16, bf16) * B(Nx16, bf16)              (dense weights)
//   WgmmaSp<N>::mma  D(64xN, f32) += A(64x32, bf16, 2:4 sparse, stored 64x16) * B(Nx32, bf16)
// A and B come from shared memory through matrix descriptors, both K-major.
#pragma once
#include <cstdint>

namespace hare {

// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"):
//   bits  0-13 start address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4,
//   49-51 base offset, 62-63 swizzle mode (1 = 128B, 2 = 64B).
// K-major tiles whose rows are SWIZZLE bytes long, in 8-row swizzle atoms: SBO = 8 * SWIZZLE bytes, LBO unused.
// Stepping K by 32 bytes (16 bf16) advances the start address by 32 bytes (descriptor + 2).
template <int SWIZZLE>
__device__ __forceinline__ uint64_t make_desc(const void* smem_ptr) {
  static_assert(SWIZZLE == 128 || SWIZZLE == 64, "swizzle");
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  uint64_t desc = static_cast<uint64_t>((addr >> 4) & 0x3FFF);
  desc |= static_cast<uint64_t>(8 * SWIZZLE >> 4) << 32;
  desc |= static_cast<uint64_t>(SWIZZLE == 128 ? 1 : 2) << 62;
  return desc;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

template <int NREG>
__device__ __forceinline__ void fence_operand(float (&d)[NREG]) {
#pragma unroll
  for (int i = 0; i < NREG; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Accumulator operand lists: the register list of the instruction text and the matching "+f" constraints.
#define HARE_ACC_N16 "{%0, %1, %2, %3, %4, %5, %6, %7}"
#define HARE_ACC_N32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define HARE_ACC_N64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define HARE_ACC_N128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define HARE_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define HARE_F8(i) HARE_F4(i), HARE_F4(i + 4)
#define HARE_F16(i) HARE_F8(i), HARE_F8(i + 8)
#define HARE_F32(i) HARE_F16(i), HARE_F16(i + 16)
#define HARE_F64(i) HARE_F32(i), HARE_F32(i + 32)
#define HARE_OPS_N16 HARE_F8(0)
#define HARE_OPS_N32 HARE_F16(0)
#define HARE_OPS_N64 HARE_F32(0)
#define HARE_OPS_N128 HARE_F64(0)

template <int N>
struct Wgmma;  // m64nNk16, bf16 x bf16 -> f32
template <int N>
struct WgmmaSp;  // m64nNk32 with 2:4-sparse A, bf16 x bf16 -> f32

// Operand numbers after the N/2 accumulators: A descriptor, B descriptor, then (sparse) the metadata register,
// then the scale-d predicate source. The sparsity selector is 0: lanes 0-1 of each quad supply the metadata
// (hare loads the same word into lanes 2-3, so either selector would read the same).
#define HARE_WGMMA(N, IA, IB, IS, IM)                                                                           \
  template <>                                                                                                 \
  struct Wgmma<N> {                                                                                           \
    __device__ __forceinline__ static void mma(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,          \
                                               int scale_d) {                                                 \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                                          \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 " HARE_ACC_N##N                  \
                   ", %" #IA ", %" #IB ", p, 1, 1, 0, 0;\n}\n"                                                \
                   : HARE_OPS_N##N                                                                            \
                   : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                 \
    }                                                                                                         \
  };                                                                                                          \
  template <>                                                                                                 \
  struct WgmmaSp<N> {                                                                                         \
    __device__ __forceinline__ static void mma(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,          \
                                               uint32_t meta, int scale_d) {                                  \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                                          \
                   "wgmma.mma_async.sp.sync.aligned.m64n" #N "k32.f32.bf16.bf16 " HARE_ACC_N##N               \
                   ", %" #IA ", %" #IB ", %" #IM ", 0, p, 1, 1, 0, 0;\n}\n"                                   \
                   : HARE_OPS_N##N                                                                            \
                   : "l"(desc_a), "l"(desc_b), "r"(scale_d), "r"(meta));                                      \
    }                                                                                                         \
  };

HARE_WGMMA(16, 8, 9, 10, 11)
HARE_WGMMA(32, 16, 17, 18, 19)
HARE_WGMMA(64, 32, 33, 34, 35)
HARE_WGMMA(128, 64, 65, 66, 67)
#undef HARE_WGMMA

}  // namespace hare
