// common.cuh: small device utilities shared by every Hare kernel.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cuda_bf16.h>

// HARE_DEVICE_CHECK(cond, fmt, ...): in the debug build (HARE_DEBUG=1, see hare/gpu/_build.py) a failed check
// prints which index left its range, with the CTA and thread, and traps (the CUDA context then reports an error
// at the next sync). In release builds it compiles to nothing: the checked values are built by the same call
// (layout) or clamped where they come from the caller (block_idx, topk_ids).
#ifndef HARE_DEBUG
#define HARE_DEBUG 0
#endif
#if HARE_DEBUG
#define HARE_DEVICE_CHECK(cond, fmt, ...)                                                                 \
  do {                                                                                                    \
    if (!(cond)) {                                                                                        \
      printf("hare device check failed (block %d thread %d): " fmt "\n", blockIdx.x, threadIdx.x,          \
             __VA_ARGS__);                                                                                \
      __trap();                                                                                           \
    }                                                                                                     \
  } while (0)
#else
#define HARE_DEVICE_CHECK(cond, fmt, ...) \
  do {                                    \
  } while (0)
#endif

namespace hare {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Named barrier over `count` threads (ids 1..15; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// Makes this thread's generic-proxy shared-memory writes visible to the async proxy (TMA, wgmma).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// Programmatic dependent launch: every Hare kernel is launched with programmatic stream serialization, so it may
// start while the previous kernel of the stream is still running (its prologue overlaps that kernel's tail and the
// launch latency). grid_dependency_wait() blocks until the previous kernel has completed and its writes are visible;
// each kernel calls it before its first global memory access, read or write. allow_dependents_launch() lets the
// next kernel start early; until a kernel calls it (or exits), its dependents wait to launch.
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void allow_dependents_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

// The sigmoid of the gated units as MUFU.EX2 and MUFU.RCP alone: the .ftz forms skip the denormal fix-ups that
// __expf / __fdividef wrap around each (a compare and two predicated multiplies per op; notes/pipeline.md section 5
// counts what they cost the epilogues). They differ from those only where a result is below 2^-126, which
// the bf16 rounding of the output cannot tell from 0. For very negative x, ex2 overflows to inf and the sigmoid
// is 0 (silu -0), as it should be.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rcp_ftz(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float sigmoid(float x) { return rcp_ftz(1.0f + ex2_ftz(x * -1.4426950408889634f)); }
__device__ __forceinline__ float silu(float g) { return g * sigmoid(g); }
__device__ __forceinline__ float gelu_tanh(float g) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  return 0.5f * g * (1.0f + tanhf(k0 * (g + k1 * g * g * g)));
}

}  // namespace hare
