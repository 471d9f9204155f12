// 16 floats in one AVX-512 register, with comparisons into mask registers, for focal_math.h.
//
// ATen's Vectorized<float> keeps comparison results as vectors (every select converts them back to
// a mask) and its minimum/maximum spend three more instructions on NaN propagation; the focal-loss
// math is a long chain of such operations, so here every compare is one instruction into a k-mask,
// every select one masked blend, and relu / clamps one max or min whose operand order keeps NaN.
// Only for a translation unit compiled with the AVX-512 F/BW/VL/DQ flags (CPU_CAPABILITY_AVX512).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../../focal_math.h"
#include "exp_log1p.h"

namespace focal::simd {
inline namespace CPU_CAPABILITY {

struct F32x16 {
  __m512 v;

  F32x16() = default;
  F32x16(__m512 raw) : v(raw) {}  // NOLINT: a raw register is this vector
  explicit F32x16(float s) : v(_mm512_set1_ps(s)) {}
  operator __m512() const { return v; }  // NOLINT
};

inline F32x16 operator+(F32x16 a, F32x16 b) { return _mm512_add_ps(a, b); }
inline F32x16 operator-(F32x16 a, F32x16 b) { return _mm512_sub_ps(a, b); }
inline F32x16 operator*(F32x16 a, F32x16 b) { return _mm512_mul_ps(a, b); }
inline F32x16 operator/(F32x16 a, F32x16 b) { return _mm512_div_ps(a, b); }

}  // namespace CPU_CAPABILITY
}  // namespace focal::simd

namespace focal {

template <>
struct Ops<simd::F32x16> {
  using V = simd::F32x16;
  using Mask = __mmask16;

  // Primitives of exp_log1p.h.
  static inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  static inline V round_nearest(V x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // max / min return their second operand when either is NaN: with x second, NaN passes through.
  static inline V max_keep_nan(V bound, V x) { return _mm512_max_ps(bound, x); }
  static inline V min_keep_nan(V bound, V x) { return _mm512_min_ps(bound, x); }
  // p * 2^n for integer-valued n, rounded once (subnormal results included).
  static inline V scale_by_pow2(V p, V n) { return _mm512_scalef_ps(p, n); }

  // The members focal_math.h uses.
  static inline V exp(V x) { return vec_math::exp(x); }
  // exp(-|z|), -|z| by setting the sign bit. (VRANGEPS would also clamp, in one instruction, but
  // it turns NaN into a number.)
  static inline V exp_neg_abs(V z) {
    return vec_math::exp_nonpositive(V(_mm512_or_ps(_mm512_set1_ps(-0.f), z)));
  }
  static inline V log(V x) { return V(at::vec::Vectorized<float>(x.v).log()); }  // any x (Sleef)
  static inline V log1p_unit(V e, V /*d*/, V /*inv*/) { return vec_math::log1p_unit(e); }
  static inline V abs(V x) { return V(_mm512_abs_ps(x)); }
  static inline V relu(V x) { return max_keep_nan(_mm512_setzero_ps(), x); }
  static inline V min0(V x) { return min_keep_nan(_mm512_setzero_ps(), x); }
  static inline Mask nonneg(V x) { return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ); }
  static inline Mask positive(V x) { return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ); }
  static inline V select(Mask m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
};

namespace simd {
inline namespace CPU_CAPABILITY {

// Loads, stores and lane masks of the CPU kernel for float, bfloat16 and half data computed in float.
// `n` < kLanes touches only the first n elements (masked memory accesses never fault beyond them).
struct Avx512Float {
  using V = F32x16;
  using Mask = __mmask16;
  using acc_t = float;
  static constexpr int64_t kLanes = 16;

  static inline Mask first(int64_t n) {
    return n >= kLanes ? Mask(0xFFFF) : Mask((1u << static_cast<unsigned>(n)) - 1u);
  }
  // The lane i (no lane when i is outside [0, kLanes)).
  static inline Mask lane(int64_t i) {
    return static_cast<uint64_t>(i) < static_cast<uint64_t>(kLanes) ? Mask(1u << i) : Mask(0);
  }
  static inline V zero_unless(Mask m, V x) { return _mm512_maskz_mov_ps(m, x); }

  static inline V load(const float* p, int64_t n) {
    return n == kLanes ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first(n), p);
  }
  static inline void store(float* p, int64_t n, V x) {
    if (n == kLanes) _mm512_storeu_ps(p, x);
    else _mm512_mask_storeu_ps(p, first(n), x);
  }

  // bfloat16 is the top half of a float: widening is a shift.
  static inline V load(const c10::BFloat16* p, int64_t n) {
    const __m256i h = n == kLanes ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(first(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // Round to nearest even on the bits: adding 0x7FFF, plus 1 when the kept half is odd, carries
  // into the kept half exactly when the dropped half is above one half (or is one half and the kept
  // half is odd). Subnormals round like every other value (the AVX512-BF16 instruction would flush
  // them to zero). A NaN stays a NaN because its dropped half is zero: every NaN this kernel stores
  // is the default NaN of an invalid operation or carries the payload of a bfloat16 input.
  static inline void store(c10::BFloat16* p, int64_t n, V x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __mmask16 odd = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x10000));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF));
    rounded = _mm512_mask_add_epi32(rounded, odd, rounded, _mm512_set1_epi32(1));
    const __m256i h = _mm512_castsi512_si256(_mm512_permutexvar_epi16(high_halves(), rounded));
    if (n == kLanes) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    else _mm256_mask_storeu_epi16(p, first(n), h);
  }

  static inline V load(const c10::Half* p, int64_t n) {
    const __m256i h = n == kLanes ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(first(n), p);
    return _mm512_cvtph_ps(h);
  }
  static inline void store(c10::Half* p, int64_t n, V x) {
    const __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (n == kLanes) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    else _mm256_mask_storeu_epi16(p, first(n), h);
  }


  // The lanes added in order, in double: the same total for any compiler.
  static inline double sum(V x) {
    alignas(64) float lanes[kLanes];
    _mm512_store_ps(lanes, x);
    double total = 0;
    for (const float l : lanes) total += l;
    return total;
  }

 private:
  // Word indices that gather the upper 16 bits of every 32-bit lane into the lower 256 bits.
  static inline __m512i high_halves() {
    return _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                            31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace simd
}  // namespace focal
