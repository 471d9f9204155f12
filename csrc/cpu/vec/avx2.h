// 8 floats in one AVX2 register, for focal_math.h.
//
// As avx512.h, minus mask registers: comparisons give all-ones lanes, used directly by blendv;
// relu and the clamps are one max or min whose operand order keeps NaN (ATen's spend three more
// instructions on it). Only for a translation unit compiled with -mavx2 -mfma -mf16c
// (CPU_CAPABILITY_AVX2).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../../focal_math.h"
#include "exp_log1p.h"

namespace focal::simd {
inline namespace CPU_CAPABILITY {

struct F32x8 {
  __m256 v;

  F32x8() = default;
  F32x8(__m256 raw) : v(raw) {}  // NOLINT: a raw register is this vector
  explicit F32x8(float s) : v(_mm256_set1_ps(s)) {}
  operator __m256() const { return v; }  // NOLINT
};

inline F32x8 operator+(F32x8 a, F32x8 b) { return _mm256_add_ps(a, b); }
inline F32x8 operator-(F32x8 a, F32x8 b) { return _mm256_sub_ps(a, b); }
inline F32x8 operator*(F32x8 a, F32x8 b) { return _mm256_mul_ps(a, b); }
inline F32x8 operator/(F32x8 a, F32x8 b) { return _mm256_div_ps(a, b); }

}  // namespace CPU_CAPABILITY
}  // namespace focal::simd

namespace focal {

template <>
struct Ops<simd::F32x8> {
  using V = simd::F32x8;
  using Mask = __m256;  // all-ones lanes where true

  // Primitives of exp_log1p.h.
  static inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static inline V round_nearest(V x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // max / min return their second operand when either is NaN: with x second, NaN passes through.
  static inline V max_keep_nan(V bound, V x) { return _mm256_max_ps(bound, x); }
  static inline V min_keep_nan(V bound, V x) { return _mm256_min_ps(bound, x); }
  // p * 2^n for integer-valued n in [-151, 128]: two normal factors 2^n1 and 2^(n - n1), so that a
  // subnormal result is rounded once.
  static inline V scale_by_pow2(V p, V n) {
    const __m256 n1 = _mm256_floor_ps(_mm256_mul_ps(n, _mm256_set1_ps(0.5f)));
    return _mm256_mul_ps(_mm256_mul_ps(p, exp2_int(n1)), exp2_int(_mm256_sub_ps(n, n1)));
  }

  // p * 2^n with 2^n a normal float for integer-valued n in [-126, 127], 0 below -126 (also for
  // NaN n, leaving p * 0: NaN for a NaN p).
  static inline V scale_by_normal_pow2(V p, V n) {
    const __m256i biased = _mm256_cvtps_epi32(_mm256_add_ps(n, _mm256_set1_ps(127.f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_max_epi32(biased, _mm256_setzero_si256()), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }

  // The members focal_math.h uses.
  static inline V exp(V x) { return vec_math::exp(x); }
  static inline V exp_neg_abs(V z) {  // -|z|: the sign bit set
    return vec_math::exp_nonpositive(V(_mm256_or_ps(_mm256_set1_ps(-0.f), z)));
  }
  // exp(-|z|) with one factor of two (focal_math.h's HasFlushedExp): 11 instructions less.
  static inline V exp_neg_abs_flushed(V z) {
    return vec_math::exp_nonpositive_flushed(V(_mm256_or_ps(_mm256_set1_ps(-0.f), z)));
  }
  static inline V log(V x) { return V(at::vec::Vectorized<float>(x.v).log()); }  // any x (Sleef)
  static inline V log1p_unit(V e, V /*d*/, V /*inv*/) { return vec_math::log1p_unit(e); }
  static inline V abs(V x) { return V(_mm256_andnot_ps(_mm256_set1_ps(-0.f), x)); }  // the sign bit cleared
  static inline V relu(V x) { return max_keep_nan(_mm256_setzero_ps(), x); }
  static inline V min0(V x) { return min_keep_nan(_mm256_setzero_ps(), x); }
  static inline Mask nonneg(V x) { return _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ); }
  static inline Mask positive(V x) { return _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ); }
  static inline V select(Mask m, V a, V b) { return _mm256_blendv_ps(b, a, m); }

 private:
  // 2^k for integer-valued k in [-126, 127], built from its exponent bits.
  static inline __m256 exp2_int(__m256 k) {
    const __m256i biased = _mm256_cvtps_epi32(_mm256_add_ps(k, _mm256_set1_ps(127.f)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
};

namespace simd {
inline namespace CPU_CAPABILITY {

// Loads, stores and lane masks of the CPU kernel for float, bfloat16 and half data computed in float.
// `n` < kLanes touches only the first n elements.
struct Avx2Float {
  using V = F32x8;
  using Mask = __m256;
  using acc_t = float;
  static constexpr int64_t kLanes = 8;

  static inline __m256i iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static inline __m256i first_i(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, kLanes))), iota());
  }
  static inline Mask first(int64_t n) { return _mm256_castsi256_ps(first_i(n)); }
  // The lane i (no lane when i is outside [0, kLanes)).
  static inline Mask lane(int64_t i) {
    const int in_range = static_cast<uint64_t>(i) < static_cast<uint64_t>(kLanes) ? static_cast<int>(i) : -1;
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(iota(), _mm256_set1_epi32(in_range)));
  }
  static inline V zero_unless(Mask m, V x) { return _mm256_and_ps(m, x); }

  static inline V load(const float* p, int64_t n) {
    return n == kLanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_i(n));
  }
  static inline void store(float* p, int64_t n, V x) {
    if (n == kLanes) _mm256_storeu_ps(p, x);
    else _mm256_maskstore_ps(p, first_i(n), x);
  }

  // bfloat16 is the top half of a float: widening is a shift.
  static inline V load(const c10::BFloat16* p, int64_t n) {
    const __m128i h = load_halves(p, n);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // Round to nearest even on the bits, as Avx512Float::store does (see there, NaN included).
  static inline void store(c10::BFloat16* p, int64_t n, V x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    // Values are in [0, 0xFFFF]: the unsigned pack keeps them, then the two 64-bit halves join.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    store_halves(p, n, _mm256_castsi256_si128(packed));
  }

  static inline V load(const c10::Half* p, int64_t n) { return _mm256_cvtph_ps(load_halves(p, n)); }
  static inline void store(c10::Half* p, int64_t n, V x) {
    store_halves(p, n, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }


  // The lanes added in order, in double: the same total for any compiler.
  static inline double sum(V x) {
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, x);
    double total = 0;
    for (const float l : lanes) total += l;
    return total;
  }

 private:
  // Eight 16-bit values; a short tail goes through a zeroed buffer (AVX2 has no 16-bit masked moves).
  template <typename T>
  static inline __m128i load_halves(const T* p, int64_t n) {
    if (n == kLanes) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    alignas(16) uint16_t buf[kLanes] = {};
    std::memcpy(buf, p, static_cast<size_t>(n) * sizeof(uint16_t));
    return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  template <typename T>
  static inline void store_halves(T* p, int64_t n, __m128i h) {
    if (n == kLanes) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
      return;
    }
    alignas(16) uint16_t buf[kLanes];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
    std::memcpy(p, buf, static_cast<size_t>(n) * sizeof(uint16_t));
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace simd
}  // namespace focal
