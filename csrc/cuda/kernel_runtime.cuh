// What the kernels use beyond C++: the CUDA language and cub::BlockReduce from the toolkit, or, in
// the test-only emulated build (-DFOCAL_CUDA_EMULATION), from
// tests/cuda_emulation/cuda_emulation.h, which runs the same kernel source on the CPU (README.md).
// Keep this file the only place that tells the two apart on the device side.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(FOCAL_CUDA_EMULATION)
#include "cuda_emulation.h"
#else
#include <cub/block/block_reduce.cuh>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace focal::cuda {

// a + b, rounded once and never fused with a neighbouring multiply: a running sum then takes the
// same values on the GPU and in the emulation, whatever nvcc contracts elsewhere.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// The hardware's approximate reciprocal (within 1 ulp) and base-2 exponential (relative error about
// 2^-22), both flushing subnormal results to zero, and its full-range division; the emulation
// computes them exactly, which is within those bounds. Used only by the precision tiers of
// device_math.cuh.
__device__ __forceinline__ float approx_reciprocal(float x) {
#if defined(FOCAL_CUDA_EMULATION)
  return 1.0f / x;
#else
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

// a / b within 2 ulp for every float a and b, subnormals included (div.full scales b into the
// reciprocal's range first); the emulation divides exactly.
__device__ __forceinline__ float approx_divide(float a, float b) {
#if defined(FOCAL_CUDA_EMULATION)
  return a / b;
#else
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#endif
}

__device__ __forceinline__ float approx_exp2(float x) {
#if defined(FOCAL_CUDA_EMULATION)
  return exp2f(x);
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

// The 16 bytes at `src` (16-byte aligned global memory), loaded where the call stands: nvcc would
// otherwise move a load that only one branch uses into that branch, after the tests that choose it
// (and the loads they wait for), so that its latency no longer overlaps theirs.
template <typename T>
__device__ __forceinline__ T load_here(const T* src) {
  static_assert(sizeof(T) == 16, "load_here takes 16 bytes");
  T out;
#if defined(FOCAL_CUDA_EMULATION)
  memcpy(&out, src, sizeof(T));
#else
  uint32_t w[4];
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
               : "l"(src));
  memcpy(&out, w, sizeof(T));
#endif
  return out;
}

// Copies from global into shared memory that hold no register while in flight (cp.async, sm_80 and
// newer; a plain copy on older GPUs; in the emulation, a copy that lands at the wait that lets it
// go). async_copy starts one of `Bytes` (both addresses aligned to it); async_commit closes the
// group of those the thread started since its last, and async_wait<N> returns once at most N of
// the thread's groups are still in flight: the older groups' data is then in shared memory, for the
// calling thread (the warp's other lanes see it after a __syncwarp).
#if !defined(FOCAL_CUDA_EMULATION) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define FOCAL_CP_ASYNC 1
#else
#define FOCAL_CP_ASYNC 0
#endif

template <int Bytes>
__device__ __forceinline__ void async_copy(void* shared_dst, const void* global_src) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "async_copy takes 4, 8 or 16 bytes");
#if defined(FOCAL_CUDA_EMULATION)
  focal_emu::async_copy(shared_dst, global_src, Bytes, Bytes);
#elif FOCAL_CP_ASYNC
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst));
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global_src) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dst), "l"(global_src), "n"(Bytes)
                 : "memory");
  }
#else
  memcpy(shared_dst, global_src, Bytes);
#endif
}

// async_copy<16> of which only the first `src_bytes` (0 to 16) are read, the rest zeros.
__device__ __forceinline__ void async_copy_head(void* shared_dst, const void* global_src, uint32_t src_bytes) {
#if defined(FOCAL_CUDA_EMULATION)
  focal_emu::async_copy(shared_dst, global_src, 16, static_cast<int>(src_bytes));
#elif FOCAL_CP_ASYNC
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(global_src), "r"(src_bytes)
               : "memory");
#else
  memcpy(shared_dst, global_src, src_bytes);
  memset(static_cast<char*>(shared_dst) + src_bytes, 0, 16 - src_bytes);
#endif
}

__device__ __forceinline__ void async_commit() {
#if defined(FOCAL_CUDA_EMULATION)
  focal_emu::async_commit();
#elif FOCAL_CP_ASYNC
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void async_wait() {
#if defined(FOCAL_CUDA_EMULATION)
  focal_emu::async_wait(N);
#elif FOCAL_CP_ASYNC
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 as a multiply-high, an add and a shift (Granlund and
// Montgomery's method, as in ATen's IntDivider), the constants made by the host.
struct Divider {
  uint32_t magic = 1;
  uint32_t shift = 0;

  static Divider make(int64_t d) {
    Divider v;
    while ((uint64_t{1} << v.shift) < static_cast<uint64_t>(d)) ++v.shift;
    v.magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << v.shift) - d)) / d + 1);
    return v;
  }
  __device__ __forceinline__ uint32_t operator()(uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }
};

// Reports that the calling thread touched `n` elements. Only the emulation counts them (tests check
// that a kernel does the work they expect, e.g. none); on the GPU this compiles to nothing.
__device__ __forceinline__ void trace_elements(int64_t n) {
#if defined(FOCAL_CUDA_EMULATION)
  focal_emu::trace_elements(n);
#else
  (void)n;
#endif
}

// Deliberate bugs for the test of the tests (tests/test_cuda_emulated.py), which builds the
// emulation with them and expects the sanitizers to report the fault. Always false otherwise.
#if defined(FOCAL_CUDA_EMULATION) && defined(FOCAL_EMU_BREAK_TAIL)
// The last, partial pack read and written as a whole.
inline constexpr bool kFaultVectorTail = true;
#else
inline constexpr bool kFaultVectorTail = false;
#endif
#if defined(FOCAL_CUDA_EMULATION) && defined(FOCAL_EMU_BREAK_ALIGN)
inline constexpr bool kFaultAssumeAligned = true;  // 128-bit accesses whatever the alignment
#else
inline constexpr bool kFaultAssumeAligned = false;
#endif

// The dtype of one number in device memory that a kernel reads itself (a normaliser, a gradient
// scale), so the host needs neither to read it nor to convert it first.
enum class ScalarTag : int8_t {
  kDouble, kFloat, kHalf, kBFloat16, kLong, kInt, kShort, kChar, kByte
};

struct ScalarRef {
  const void* ptr = nullptr;  // nullptr: absent
  ScalarTag tag = ScalarTag::kDouble;
};

// Exact for every tag (int64 up to 2^53).
__device__ __forceinline__ double load(const ScalarRef& s) {
  switch (s.tag) {
    case ScalarTag::kDouble: return *static_cast<const double*>(s.ptr);
    case ScalarTag::kFloat: return *static_cast<const float*>(s.ptr);
    case ScalarTag::kHalf: return static_cast<float>(*static_cast<const c10::Half*>(s.ptr));
    case ScalarTag::kBFloat16: return static_cast<float>(*static_cast<const c10::BFloat16*>(s.ptr));
    case ScalarTag::kLong: return static_cast<double>(*static_cast<const int64_t*>(s.ptr));
    case ScalarTag::kInt: return *static_cast<const int32_t*>(s.ptr);
    case ScalarTag::kShort: return *static_cast<const int16_t*>(s.ptr);
    case ScalarTag::kChar: return *static_cast<const int8_t*>(s.ptr);
    case ScalarTag::kByte: return *static_cast<const uint8_t*>(s.ptr);
  }
  return 0.0;
}

}  // namespace focal::cuda
