// focal::Ops for ATen's SIMD vectors, so that focal_math.h runs vectorised on the CPU.
// Must be compiled with the ISA flags of the CPU_CAPABILITY being built (see setup.py).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../focal_math.h"

namespace focal {

namespace vec_math {

using VecF = at::vec::Vectorized<float>;
using VecI = at::vec::Vectorized<int32_t>;

// 2^k for integer-valued k in [-126, 127], built from its exponent bits.
inline VecF exp2_int(const VecF& k) {
  const VecI bits = at::vec::convert<int32_t>((k + VecF(127.f)) * VecF(8388608.f));  // << 23
  return at::vec::cast<float>(bits);
}

// exp(x) within about 1 ulp for every float x, subnormal results included. Sleef's exp (what
// Vectorized::exp calls) is twice as slow for the same accuracy on the inputs we need.
// x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite, ln2 split in two), exp(r) from a degree-5 minimax
// polynomial (the coefficients of Cephes' expf), and 2^n applied as two normal factors so that a
// subnormal result is rounded once.
inline VecF exp(const VecF& x_in) {
  using at::vec::fmadd;
  const VecF x = at::vec::minimum(at::vec::maximum(x_in, VecF(-104.f)), VecF(88.8f));  // keeps NaN
  const VecF n = (x * VecF(1.44269504088896341f)).round();
  VecF r = fmadd(n, VecF(-0.693359375f), x);
  r = fmadd(n, VecF(2.12194440e-4f), r);
  VecF p(1.9875691500e-4f);
  p = fmadd(p, r, VecF(1.3981999507e-3f));
  p = fmadd(p, r, VecF(8.3334519073e-3f));
  p = fmadd(p, r, VecF(4.1665795894e-2f));
  p = fmadd(p, r, VecF(1.6666665459e-1f));
  p = fmadd(p, r, VecF(5.0000001201e-1f));
  p = fmadd(p, r * r, r + VecF(1.f));
#if defined(CPU_CAPABILITY_AVX512)
  return VecF(_mm512_scalef_ps(p, n));  // p * 2^n, rounded once, subnormals included
#else
  const VecF n1 = (n * VecF(0.5f)).floor();
  return p * exp2_int(n1) * exp2_int(n - n1);
#endif
}

// log(d) within about 2 ulp for d in [1, 2] (not for other d).
#if defined(CPU_CAPABILITY_AVX512)
// d = 2^k m with m in [1, 2); m = c_i (1 + f) where c_i is the centre of the sixteenth of [1, 2)
// that holds m (c_0 = 1, so that values near 1 keep their relative accuracy), looked up with one
// in-register permute; log(1 + f), |f| <= 1/16, from its degree-6 Taylor polynomial. The table of
// log(c_i) holds -log of the float 1 / c_i actually used, so the rounding of 1 / c_i cancels.
inline VecF log_1_to_2(const VecF& d_vec) {
  const __m512 d = d_vec;
  const __m512 inv_c_table = _mm512_setr_ps(
      1.000000000e+00f, 9.142857194e-01f, 8.648648858e-01f, 8.205128312e-01f, 7.804877758e-01f,
      7.441860437e-01f, 7.111111283e-01f, 6.808510423e-01f, 6.530612111e-01f, 6.274510026e-01f,
      6.037735939e-01f, 5.818181634e-01f, 5.614035130e-01f, 5.423728824e-01f, 5.245901346e-01f,
      5.079365373e-01f);
  const __m512 log_c_table = _mm512_setr_ps(
      0.000000000e+00f, 8.961215615e-02f, 1.451819837e-01f, 1.978257298e-01f, 2.478362024e-01f,
      2.954642177e-01f, 3.409265578e-01f, 3.844117224e-01f, 4.260844290e-01f, 4.660896957e-01f,
      5.045560002e-01f, 5.415973067e-01f, 5.773153305e-01f, 6.118015647e-01f, 6.451380253e-01f,
      6.773987412e-01f);
  const __m512 m = _mm512_getmant_ps(d, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __m512 k = _mm512_getexp_ps(d);  // 0, or 1 for d = 2
  // The permute reads the low 4 bits of each index: the top 4 bits of m's mantissa.
  const __m512i index = _mm512_srli_epi32(_mm512_castps_si512(m), 19);
  const __m512 f = _mm512_fmsub_ps(m, _mm512_permutexvar_ps(index, inv_c_table), _mm512_set1_ps(1.f));
  __m512 p = _mm512_set1_ps(-1.f / 6.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 5.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.f / 4.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 3.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.f / 2.f));
  const __m512 log1p_f = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), f);
  const __m512 log_m = _mm512_add_ps(_mm512_permutexvar_ps(index, log_c_table), log1p_f);
  return VecF(_mm512_fmadd_ps(k, _mm512_set1_ps(0.693147182f), log_m));
}
#else
// d = 2^k m with m in [sqrt(1/2), sqrt(2)), log(1 + f) = f - f^2/2 + f^3 P(f) for f = m - 1
// (exact), with the coefficients of Cephes' logf, and k ln2 added in two parts.
inline VecF log_1_to_2(const VecF& d) {
  using at::vec::fmadd;
  const VecF big = d > VecF(1.41421356237f);
  const VecF m = VecF::blendv(d, d * VecF(0.5f), big);
  const VecF k = VecF::blendv(VecF(0.f), VecF(1.f), big);
  const VecF f = m - VecF(1.f);
  const VecF z = f * f;
  VecF p(7.0376836292e-2f);
  p = fmadd(p, f, VecF(-1.1514610310e-1f));
  p = fmadd(p, f, VecF(1.1676998740e-1f));
  p = fmadd(p, f, VecF(-1.2420140846e-1f));
  p = fmadd(p, f, VecF(1.4249322787e-1f));
  p = fmadd(p, f, VecF(-1.6668057665e-1f));
  p = fmadd(p, f, VecF(2.0000714765e-1f));
  p = fmadd(p, f, VecF(-2.4999993993e-1f));
  p = fmadd(p, f, VecF(3.3333331174e-1f));
  VecF y = f * z * p;
  y = fmadd(k, VecF(-2.12194440e-4f), y);
  y = fmadd(z, VecF(-0.5f), y);
  return fmadd(k, VecF(0.693359375f), f + y);
}
#endif

}  // namespace vec_math

template <typename T>
struct Ops<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;  // all-ones lanes where true
  static constexpr bool kFloat = std::is_same_v<T, float>;

  static inline V exp(const V& x) {
    if constexpr (kFloat) return vec_math::exp(x);
    else return x.exp();
  }
  static inline V log(const V& x) { return x.log(); }
  static inline V log_1_to_2(const V& x) {
    if constexpr (kFloat) return vec_math::log_1_to_2(x);
    else return x.log();
  }
  static inline V abs(const V& x) { return x.abs(); }
  static inline V relu(const V& x) { return at::vec::maximum(x, V(T(0))); }
  static inline V min0(const V& x) { return at::vec::minimum(x, V(T(0))); }
  static inline Mask nonneg(const V& x) { return x >= V(T(0)); }
  static inline Mask positive(const V& x) { return x > V(T(0)); }
  static inline V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

}  // namespace focal
