// Vectorised float exp and log1p, written once for every CPU vector type.
//
// Each vector type V supplies, as static members of Ops<V>: fmadd(a, b, c), round_nearest(x),
// max_keep_nan(bound, x) / min_keep_nan(bound, x) (NaN in x passes through), scale_by_pow2(p, n)
// (p * 2^n for integer-valued n, rounded once) and, for exp_nonpositive_flushed,
// scale_by_normal_pow2(p, n) (the same for n >= -126, 0 below). Sleef's exp and log1p (what Vectorized<float>::exp /
// log1p call) are slower at this accuracy.
#pragma once

#include "../../focal_math.h"

namespace focal::vec_math {
inline namespace CPU_CAPABILITY {

// exp(x) = 2^n exp(r): n = round(x / ln2), and exp(r) for x = n ln2 + r with |r| <= ln2 / 2
// (Cody-Waite, ln2 split in two) as 1 + r Q(r), Q a degree-5 minimax fit (six multiply-adds in all).
template <typename V>
inline V exp_reduced(V x, V n) {
  using O = Ops<V>;
  V r = O::fmadd(n, V(-0.693359375f), x);
  r = O::fmadd(n, V(2.12194440e-4f), r);
  V q(1.3843611814081669e-3f);
  q = O::fmadd(q, r, V(8.374197408556938e-3f));
  q = O::fmadd(q, r, V(4.166800528764725e-2f));
  q = O::fmadd(q, r, V(1.6666430234909058e-1f));
  q = O::fmadd(q, r, V(4.999999403953552e-1f));
  q = O::fmadd(q, r, V(1.f));
  return O::fmadd(q, r, V(1.f));
}

template <typename V>
inline V exp_exponent(V x) {
  return Ops<V>::round_nearest(x * V(1.44269504088896341f));
}

// exp(x) for x in [-104, 88.8] (or NaN) within about 1.5 ulp, subnormal results included: 2^n
// applied by scale_by_pow2.
template <typename V>
inline V exp_in_range(V x) {
  const V n = exp_exponent(x);
  return Ops<V>::scale_by_pow2(exp_reduced(x, n), n);
}

// exp(x) for x <= 0 (or NaN) with one power-of-two factor (Ops::scale_by_normal_pow2): as
// exp_in_range while n >= -126 (x >= -87.68; subnormal results from -87.34 on), 0 below.
template <typename V>
inline V exp_nonpositive_flushed(V x) {
  x = Ops<V>::max_keep_nan(V(-104.f), x);  // keeps r small
  const V n = exp_exponent(x);
  return Ops<V>::scale_by_normal_pow2(exp_reduced(x, n), n);
}

// exp(x) for every float x: below -104 the result is 0, above 88.8 infinity.
template <typename V>
inline V exp(V x) {
  using O = Ops<V>;
  return exp_in_range(O::min_keep_nan(V(88.8f), O::max_keep_nan(V(-104.f), x)));
}

// exp(x) for x <= 0 (or NaN).
template <typename V>
inline V exp_nonpositive(V x) {
  return exp_in_range(Ops<V>::max_keep_nan(V(-104.f), x));
}

// log(1 + e) for e in [0, 1] within about 3 ulp (NaN passes through): 2 atanh(e / (2 + e)).
// With t = e / (1 + e/2) in [0, 2/3] (exact for tiny e, subnormals included) and v = t^2,
// 2 atanh(t / 2) = t + t v R(v), R a degree-3 minimax fit of (2 atanh(t/2) / t - 1) / v on
// [0, 4/9] whose error, times v, is below 2^-27. One division and six multiply-adds, against a
// log and a correction term.
template <typename V>
inline V log1p_unit(V e) {
  using O = Ops<V>;
  const V t = e / O::fmadd(e, V(0.5f), V(1.f));
  const V v = t * t;
  V r(5.473551573231816e-4f);
  r = O::fmadd(r, v, V(2.187431091442704e-3f));
  r = O::fmadd(r, v, V(1.250678114593029e-2f));
  r = O::fmadd(r, v, V(8.333301544189453e-2f));
  return O::fmadd(t, v * r, t);
}

}  // namespace CPU_CAPABILITY
}  // namespace focal::vec_math
