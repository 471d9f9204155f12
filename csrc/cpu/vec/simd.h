// The vector vocabulary of the CPU kernel, the one header it includes from this folder:
// - SimdFor<scalar_t>, the vector type and loads/stores for each data type, per instruction set: our
//   own AVX-512 / AVX2 float vectors (avx512.h, avx2.h) for float, bfloat16 and half data, ATen's
//   Vectorized (aten.h) for float64 data and for the DEFAULT build;
// - Pair<V>, two vectors computed as one value of focal_math.h.
//
// These headers are compiled once per instruction set into one library. Everything they define sits
// in an inline namespace named after the instruction set (as ATen's vector code does), so no symbol
// is shared between the copies: a function emitted out of line is always the copy of its own
// instruction set, never one the linker picked from another (which could need AVX-512 to run).
#pragma once

#include <type_traits>
#include <utility>

#include "../../family_math.h"
#include "../../focal_math.h"
#include "aten.h"

#if defined(CPU_CAPABILITY_AVX512)
#include "avx512.h"
#elif defined(CPU_CAPABILITY_AVX2)
#include "avx2.h"
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

// Two SIMD vectors computed as one value of focal_math.h.
//
// The per-element math is one long chain of dependent operations; a core keeps only so many in
// flight. Evaluating two independent vectors operation by operation puts two chains side by side,
// so one fills the other's latency. Every lane's arithmetic is exactly that of V.
template <typename V>
struct Pair {
  V lo, hi;

  Pair() = default;
  Pair(const V& l, const V& h) : lo(l), hi(h) {}
  template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
  explicit Pair(T s) : lo(V(s)), hi(V(s)) {}
};

template <typename V>
inline Pair<V> operator+(const Pair<V>& a, const Pair<V>& b) { return {a.lo + b.lo, a.hi + b.hi}; }
template <typename V>
inline Pair<V> operator-(const Pair<V>& a, const Pair<V>& b) { return {a.lo - b.lo, a.hi - b.hi}; }
template <typename V>
inline Pair<V> operator*(const Pair<V>& a, const Pair<V>& b) { return {a.lo * b.lo, a.hi * b.hi}; }
template <typename V>
inline Pair<V> operator/(const Pair<V>& a, const Pair<V>& b) { return {a.lo / b.lo, a.hi / b.hi}; }

// `loss` on pairs of vectors: each of its hyper-parameters and alpha weights twice.
template <LossKind L, GammaKind G, typename V>
inline ElementLoss<L, G, Pair<V>> paired(const ElementLoss<L, G, V>& loss) {
  using P = Pair<V>;
  return {{P{loss.p.gamma, loss.p.gamma}, P{loss.p.beta, loss.p.beta}, P{loss.p.inv_gamma, loss.p.inv_gamma},
           P{loss.p.shift, loss.p.shift}},
          {{loss.alpha.pos, loss.alpha.pos}, {loss.alpha.neg, loss.alpha.neg}}};
}

}  // namespace CPU_CAPABILITY
}  // namespace focal::simd

namespace focal {

template <typename V>
struct Ops<simd::Pair<V>> {
  using P = simd::Pair<V>;
  using O = Ops<V>;
  struct Mask {
    typename O::Mask lo, hi;
  };

  static inline P fmadd(const P& a, const P& b, const P& c) {
    return {O::fmadd(a.lo, b.lo, c.lo), O::fmadd(a.hi, b.hi, c.hi)};
  }
  static inline P fmsub(const P& a, const P& b, const P& c) {
    return {O::fmsub(a.lo, b.lo, c.lo), O::fmsub(a.hi, b.hi, c.hi)};
  }
  static inline P exp(const P& x) { return {O::exp(x.lo), O::exp(x.hi)}; }
  static inline P exp_neg_abs(const P& z) { return {O::exp_neg_abs(z.lo), O::exp_neg_abs(z.hi)}; }
  // Only where V has it (focal_math.h's HasFlushedExp asks).
  template <typename W = V, typename = decltype(Ops<W>::exp_neg_abs_flushed(std::declval<W>()))>
  static inline P exp_neg_abs_flushed(const P& z) {
    return {O::exp_neg_abs_flushed(z.lo), O::exp_neg_abs_flushed(z.hi)};
  }
  static inline P log(const P& x) { return {O::log(x.lo), O::log(x.hi)}; }
  static inline P log1p_unit(const P& e, const P& d, const P& inv) {
    return {O::log1p_unit(e.lo, d.lo, inv.lo), O::log1p_unit(e.hi, d.hi, inv.hi)};
  }
  static inline P abs(const P& x) { return {O::abs(x.lo), O::abs(x.hi)}; }
  static inline P relu(const P& x) { return {O::relu(x.lo), O::relu(x.hi)}; }
  static inline P min0(const P& x) { return {O::min0(x.lo), O::min0(x.hi)}; }
  static inline Mask nonneg(const P& x) { return {O::nonneg(x.lo), O::nonneg(x.hi)}; }
  static inline Mask positive(const P& x) { return {O::positive(x.lo), O::positive(x.hi)}; }
  static inline P select(const Mask& m, const P& a, const P& b) {
    return {O::select(m.lo, a.lo, b.lo), O::select(m.hi, a.hi, b.hi)};
  }
};

}  // namespace focal
