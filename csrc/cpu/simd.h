// The vector type and loads/stores the CPU kernel uses for each data type, per instruction set:
// our own AVX-512 / AVX2 float vectors for float, bfloat16 and half data, ATen's Vectorized for
// float64 data and for the DEFAULT build.
//
// These headers are compiled once per instruction set into one library. Everything they define sits
// in an inline namespace named after the instruction set (as ATen's vector code does), so no symbol
// is shared between the copies: a function emitted out of line is always the copy of its own
// instruction set, never one the linker picked from another (which could need AVX-512 to run).
#pragma once

#include <type_traits>

#include "simd_aten.h"

#if defined(CPU_CAPABILITY_AVX512)
#include "simd_avx512.h"
#elif defined(CPU_CAPABILITY_AVX2)
#include "simd_avx2.h"
#endif

// For the kernels' per-vector lambdas: inlined at each call site (full vectors, a row's tail), the
// compiler drops the masks from the full-vector loop.
#if defined(__GNUC__)
#define FOCAL_ALWAYS_INLINE __attribute__((always_inline))
#else
#define FOCAL_ALWAYS_INLINE
#endif

namespace focal::simd {
inline namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
using NativeFloat = Avx512Float;
#elif defined(CPU_CAPABILITY_AVX2)
using NativeFloat = Avx2Float;
#endif

// SimdFor<scalar_t>: V, Mask, acc_t, kLanes, load / store of scalar_t, first(n), lane(i),
// zero_unless(mask, v) and sum(v).
template <typename scalar_t>
struct SimdForImpl {
  using type = AtenIO<scalar_t>;
};
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <>
struct SimdForImpl<float> {
  using type = NativeFloat;
};
template <>
struct SimdForImpl<c10::BFloat16> {
  using type = NativeFloat;
};
template <>
struct SimdForImpl<c10::Half> {
  using type = NativeFloat;
};
#endif

template <typename scalar_t>
using SimdFor = typename SimdForImpl<scalar_t>::type;

}  // namespace CPU_CAPABILITY
}  // namespace focal::simd
