// Vectorised float exp and log on [1, 2], written once for every CPU vector type.
//
// Each vector type V supplies, as static members of Ops<V>: fmadd(a, b, c), round_nearest(x),
// max_keep_nan(bound, x) / min_keep_nan(bound, x) (NaN in x passes through), scale_by_pow2(p, n)
// (p * 2^n for integer-valued n, rounded once), select(mask, a, b) and positive(x).
// Sleef's exp and log1p (what Vectorized<float>::exp / log1p call) are slower at this accuracy.
#pragma once

#include "../focal_math.h"

namespace focal::vec_math {

// exp(x) within about 1 ulp for every float x, subnormal results included.
// x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite, ln2 split in two), exp(r) from a degree-5 minimax
// polynomial (the coefficients of Cephes' expf), and 2^n applied by scale_by_pow2.
template <typename V>
inline V exp(V x_in) {
  using O = Ops<V>;
  const V x = O::min_keep_nan(V(88.8f), O::max_keep_nan(V(-104.f), x_in));
  const V n = O::round_nearest(x * V(1.44269504088896341f));
  V r = O::fmadd(n, V(-0.693359375f), x);
  r = O::fmadd(n, V(2.12194440e-4f), r);
  V p(1.9875691500e-4f);
  p = O::fmadd(p, r, V(1.3981999507e-3f));
  p = O::fmadd(p, r, V(8.3334519073e-3f));
  p = O::fmadd(p, r, V(4.1665795894e-2f));
  p = O::fmadd(p, r, V(1.6666665459e-1f));
  p = O::fmadd(p, r, V(5.0000001201e-1f));
  p = O::fmadd(p, r * r, r + V(1.f));
  return O::scale_by_pow2(p, n);
}

// log(d) within about 2 ulp for d in [1, 2] (not for other d), for vector types without AVX-512's
// getmant / permute (simd_avx512.h has a table-driven one).
// d = 2^k m with m in [sqrt(1/2), sqrt(2)), log(1 + f) = f - f^2/2 + f^3 P(f) for f = m - 1
// (exact), with the coefficients of Cephes' logf, and k ln2 added in two parts.
template <typename V>
inline V log_1_to_2_cephes(V d) {
  using O = Ops<V>;
  const auto big = O::positive(d - V(1.41421356237f));
  const V m = O::select(big, d * V(0.5f), d);
  const V k = O::select(big, V(1.f), V(0.f));
  const V f = m - V(1.f);
  const V z = f * f;
  V p(7.0376836292e-2f);
  p = O::fmadd(p, f, V(-1.1514610310e-1f));
  p = O::fmadd(p, f, V(1.1676998740e-1f));
  p = O::fmadd(p, f, V(-1.2420140846e-1f));
  p = O::fmadd(p, f, V(1.4249322787e-1f));
  p = O::fmadd(p, f, V(-1.6668057665e-1f));
  p = O::fmadd(p, f, V(2.0000714765e-1f));
  p = O::fmadd(p, f, V(-2.4999993993e-1f));
  p = O::fmadd(p, f, V(3.3333331174e-1f));
  V y = f * z * p;
  y = O::fmadd(k, V(-2.12194440e-4f), y);
  y = O::fmadd(z, V(-0.5f), y);
  return O::fmadd(k, V(0.693359375f), f + y);
}

}  // namespace focal::vec_math
