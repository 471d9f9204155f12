// focal::Ops and the kernel's loads and stores for ATen's Vectorized<T>: the float64 kernel on every
// instruction set, and everything on the DEFAULT one (where ATen maps Vectorized onto whatever SIMD
// the compiler targets, NEON on aarch64).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../../focal_math.h"
#include "exp_log1p.h"

namespace focal {

template <typename T>
struct Ops<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;  // all-ones lanes where true
  static constexpr bool kFloat = std::is_same_v<T, float>;

  // Primitives of exp_log1p.h (float only).
  // Not fused, whatever ATen's backend for V (its generic one has no FMA, others do): every
  // backend rounds alike.
  static inline V fmadd(const V& a, const V& b, const V& c) { return a * b + c; }
  static inline V fmsub(const V& a, const V& b, const V& c) { return a * b - c; }
  // For |x| < 2^22, by adding and removing 1.5 * 2^23: plain arithmetic, which the generic
  // (DEFAULT) Vectorized runs as SIMD, where its round() calls nearbyint once per lane.
  static inline V round_nearest(const V& x) {
    const V magic(T(12582912));
    return (x + magic) - magic;
  }
  static inline V max_keep_nan(const V& bound, const V& x) { return at::vec::maximum(x, bound); }
  static inline V min_keep_nan(const V& bound, const V& x) { return at::vec::minimum(x, bound); }
  static inline V scale_by_pow2(const V& p, const V& n) {
    // Two normal factors, so that a subnormal result is rounded once.
    const V n1 = round_nearest(n * V(T(0.5)) - V(T(0.25)));  // floor(n / 2) for integer n
    return p * exp2_int(n1) * exp2_int(n - n1);
  }

  // The members focal_math.h uses.
  static inline V exp(const V& x) {
    if constexpr (kFloat) return vec_math::exp(x);
    else return x.exp();
  }
  static inline V log(const V& x) { return x.log(); }
  static inline V exp_neg_abs(const V& z) {
    const V neg_abs = V(T(0)) - z.abs();
    if constexpr (kFloat) return vec_math::exp_nonpositive(neg_abs);
    else return neg_abs.exp();
  }
  // log(1 + e) for e in [0, 1]; float64 as the scalar Ops<double> (see focal_math.h).
  static inline V log1p_unit(const V& e, const V& d, const V& inv) {
    if constexpr (kFloat) return vec_math::log1p_unit(e);
    else return d.log() + (e - (d - V(T(1)))) * inv;
  }
  static inline V abs(const V& x) { return x.abs(); }
  static inline V relu(const V& x) { return at::vec::maximum(x, V(T(0))); }
  static inline V min0(const V& x) { return at::vec::minimum(x, V(T(0))); }
  static inline Mask nonneg(const V& x) { return x >= V(T(0)); }
  static inline Mask positive(const V& x) { return x > V(T(0)); }
  static inline V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }

 private:
  // 2^k for integer-valued k in [-126, 127], built from its exponent bits.
  static inline V exp2_int(const V& k) {
    const auto bits = at::vec::convert<int32_t>((k + V(T(127))) * V(T(8388608)));  // << 23
    return at::vec::cast<float>(bits);
  }
};

namespace simd {
inline namespace CPU_CAPABILITY {

// Loads and stores of `scalar_t` as one Vectorized of its math type (float for bfloat16 / half);
// `n` < kLanes touches only the first n elements.
template <typename scalar_t>
struct AtenIO {
  using acc_t = at::opmath_type<scalar_t>;
  using V = at::vec::Vectorized<acc_t>;
  using Mask = V;
  static constexpr int64_t kLanes = V::size();
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;

  static inline V iota() { return V::arange(acc_t(0), acc_t(1)); }
  static inline Mask first(int64_t n) { return iota() < V(static_cast<acc_t>(n)); }
  static inline Mask lane(int64_t i) { return iota() == V(static_cast<acc_t>(i)); }
  static inline V zero_unless(const Mask& m, const V& x) { return V::blendv(V(acc_t(0)), x, m); }

  static inline V load(const scalar_t* p, int64_t n) {
    if constexpr (kReduced) {
      if (n == kLanes) {
        V out;
        at::vec::load_to_float<scalar_t>(p, out);
        return out;
      }
      return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, n)));
    } else {
      return n == kLanes ? V::loadu(p) : V::loadu(p, n);
    }
  }
  static inline void store(scalar_t* p, int64_t n, const V& x) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(x, x).store(p, n);
    } else {
      x.store(p, n);
    }
  }


  static inline double sum(const V& x) {
    alignas(64) acc_t lanes[kLanes];
    x.store(lanes);
    double total = 0;
    for (int64_t i = 0; i < kLanes; ++i) total += lanes[i];
    return total;
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace simd
}  // namespace focal
