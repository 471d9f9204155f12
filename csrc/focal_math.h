// Per-element math of the sigmoid focal loss and its derivative.
//
// This header is the only place where the math lives. The CUDA kernels instantiate it with scalar
// `float` / `double`; the CPU kernels instantiate it with SIMD vectors of float or double (see
// cpu/vec/simd.h), so the CPU tests exercise the formulas that run on the GPU. Only the primitives
// (exp, log1p of a number in [0, 1], ...) differ: CUDA's libm on the GPU, cpu/vec/exp_log1p.h on the CPU.
//
// Notation: x is the logit, t in [0, 1] the binary target, p = sigmoid(x), and
//   CE = -t log p - (1 - t) log(1 - p),      q = 1 - p_t = p (1 - t) + (1 - p) t,
//   FL = alpha_t * q^gamma * CE                (Lin et al., eq. 5, with torchvision's soft-target form).
// Everything is written so that no quantity is formed by cancellation: p and 1 - p are computed
// separately from exp(-|x|), log(1 + exp(-|x|)) keeps the relative accuracy of exp(-|x|) however
// small, and q^(gamma - 1) never appears, so every finite logit gives a finite loss and gradient,
// also for gamma in (0, 1) at saturation.
//
// Each vector or scalar type V supplies its primitives in Ops<V>: fmadd (a * b + c, rounded once),
// fmsub (a * b - c, rounded as fmadd(a, b, -c)),
// exp, exp_neg_abs (exp(-|z|)), log, log1p_unit (log(1 + e) for e in [0, 1]), abs, relu, min0,
// comparisons and select; optionally recip(x) and div(a, b) (else 1 / x and a / b). Every function
// below also takes the primitives as a template parameter O (default Ops<V>), so that a backend can
// trade accuracy for speed where its precision contract allows (the CUDA kernels for 16-bit data). Multiply-adds are spelled out with fmadd: the CPU kernels are compiled
// without floating-point contraction, so every instantiation (float, bfloat16, half; one vector or
// a pair) performs exactly the same roundings.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FOCAL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FOCAL_HOST_DEVICE inline
#endif

#include <cmath>
#include <type_traits>
#include <utility>

namespace focal {

// gamma is dispatched once per launch: the common integer values avoid a pow (exp + log).
enum class GammaKind { kZero, kOne, kTwo, kGeneral };

// The gammas whose outputs all carry q^gamma with gamma >= 1: sigmoid_parts' kTinyExpUnseen holds.
template <GammaKind G>
inline constexpr bool kTinyExpUnseenFor = G == GammaKind::kOne || G == GammaKind::kTwo;

// Calls f(std::integral_constant<GammaKind, G>{}) with the compile-time G of a launch's gamma kind
// and returns its result: how the host code of both backends turns gamma into a template argument.
template <typename F>
decltype(auto) with_gamma_kind(GammaKind g, F&& f) {
  switch (g) {
    case GammaKind::kZero: return f(std::integral_constant<GammaKind, GammaKind::kZero>{});
    case GammaKind::kOne: return f(std::integral_constant<GammaKind, GammaKind::kOne>{});
    case GammaKind::kTwo: return f(std::integral_constant<GammaKind, GammaKind::kTwo>{});
    default: return f(std::integral_constant<GammaKind, GammaKind::kGeneral>{});
  }
}

// Scalar primitives. Vector types provide a specialisation with the same members.
template <typename V>
struct Ops;

template <>
struct Ops<float> {
  using Mask = bool;
  static FOCAL_HOST_DEVICE float exp(float x) { return ::expf(x); }
  static FOCAL_HOST_DEVICE float log(float x) { return ::logf(x); }
  static FOCAL_HOST_DEVICE float fmadd(float a, float b, float c) { return ::fmaf(a, b, c); }
  static FOCAL_HOST_DEVICE float fmsub(float a, float b, float c) { return ::fmaf(a, b, -c); }
  static FOCAL_HOST_DEVICE float exp_neg_abs(float z) { return ::expf(-::fabsf(z)); }
  // log(1 + e) for e in [0, 1], given d = 1 + e (rounded) and inv = 1 / d: d - 1 is exact, so the
  // first-order term restores the bits of e lost when rounding 1 + e (and gives exactly e once
  // 1 + e rounds to 1).
  static FOCAL_HOST_DEVICE float log1p_unit(float e, float d, float inv) {
    return ::logf(d) + (e - (d - 1.f)) * inv;
  }
  static FOCAL_HOST_DEVICE float abs(float x) { return ::fabsf(x); }
  static FOCAL_HOST_DEVICE float relu(float x) { return x > 0.f ? x : 0.f; }
  static FOCAL_HOST_DEVICE float min0(float x) { return x < 0.f ? x : 0.f; }
  static FOCAL_HOST_DEVICE Mask nonneg(float x) { return x >= 0.f; }
  static FOCAL_HOST_DEVICE Mask positive(float x) { return x > 0.f; }
  static FOCAL_HOST_DEVICE float select(Mask m, float a, float b) { return m ? a : b; }
};

template <>
struct Ops<double> {
  using Mask = bool;
  static FOCAL_HOST_DEVICE double exp(double x) { return ::exp(x); }
  static FOCAL_HOST_DEVICE double log(double x) { return ::log(x); }
  static FOCAL_HOST_DEVICE double fmadd(double a, double b, double c) { return ::fma(a, b, c); }
  static FOCAL_HOST_DEVICE double fmsub(double a, double b, double c) { return ::fma(a, b, -c); }
  static FOCAL_HOST_DEVICE double exp_neg_abs(double z) { return ::exp(-::fabs(z)); }
  static FOCAL_HOST_DEVICE double log1p_unit(double e, double d, double inv) {  // as for float
    return ::log(d) + (e - (d - 1.)) * inv;
  }
  static FOCAL_HOST_DEVICE double abs(double x) { return ::fabs(x); }
  static FOCAL_HOST_DEVICE double relu(double x) { return x > 0. ? x : 0.; }
  static FOCAL_HOST_DEVICE double min0(double x) { return x < 0. ? x : 0.; }
  static FOCAL_HOST_DEVICE Mask nonneg(double x) { return x >= 0.; }
  static FOCAL_HOST_DEVICE Mask positive(double x) { return x > 0.; }
  static FOCAL_HOST_DEVICE double select(Mask m, double a, double b) { return m ? a : b; }
};

// Whether the primitives O define recip(x), respectively div(a, b) (C++17: torch builds
// extensions with -std=c++17 in older releases).
template <typename O, typename V, typename = void>
struct HasRecip : std::false_type {};
template <typename O, typename V>
struct HasRecip<O, V, std::void_t<decltype(O::recip(std::declval<V>()))>> : std::true_type {};
template <typename O, typename V, typename = void>
struct HasDiv : std::false_type {};
template <typename O, typename V>
struct HasDiv<O, V, std::void_t<decltype(O::div(std::declval<V>(), std::declval<V>()))>>
    : std::true_type {};

// 1 / x and a / b through the primitives when they define them.
template <typename O, typename V>
FOCAL_HOST_DEVICE V reciprocal(V x) {
  if constexpr (HasRecip<O, V>::value) {
    return O::recip(x);
  } else {
    return V(1) / x;
  }
}

template <typename O, typename V>
FOCAL_HOST_DEVICE V divide(V a, V b) {
  if constexpr (HasDiv<O, V>::value) {
    return O::div(a, b);
  } else {
    return a / b;
  }
}

// Whether the primitives O define exp_neg_abs_flushed(z): exp(-|z|) exact down to the smallest
// normal float (about |z| = 87.3) and in part below it, 0 from |z| = 87.7 on, where it is cheaper
// than exp_neg_abs (AVX2: one power-of-two factor instead of two).
template <typename O, typename V, typename = void>
struct HasFlushedExp : std::false_type {};
template <typename O, typename V>
struct HasFlushedExp<O, V, std::void_t<decltype(O::exp_neg_abs_flushed(std::declval<V>()))>>
    : std::true_type {};

// sigmoid(z), sigmoid(-z) and log1p(exp(-|z|)) from one exp, one reciprocal and one log1p.
template <typename V>
struct SigmoidParts {
  V sig;       // sigmoid(z)
  V sig_neg;   // sigmoid(-z) = 1 - sigmoid(z), without the cancellation
  V log1p_e;   // log(1 + exp(-|z|)), so softplus(z) = relu(z) + log1p_e
};

//
// kTinyExpUnseen: the caller's outputs are all multiplied by q^gamma with gamma >= 1 (q the
// sigmoid of the wrong side, below), so that e = exp(-|z|) below the smallest normal float changes
// none of them: it only moves sigmoid(-|z|), sigmoid(|z|) - 1 and log1p(e) by less than 2^-126,
// and where such a change is not lost in rounding, q is below about 1e-30 and every output below
// the smallest float32. The primitives' flushed exp may then stand in for the exact one.
template <typename V, typename O = Ops<V>, bool kTinyExpUnseen = false>
FOCAL_HOST_DEVICE SigmoidParts<V> sigmoid_parts(V z) {
  const V one(1);
  V e;  // exp(-|z|), in [0, 1]
  if constexpr (kTinyExpUnseen && HasFlushedExp<O, V>::value) {
    e = O::exp_neg_abs_flushed(z);
  } else {
    e = O::exp_neg_abs(z);
  }
  const V d = one + e;
  const V inv = reciprocal<O>(d);      // sigmoid(|z|)
  const V small = e * inv;         // sigmoid(-|z|)
  const auto z_nonneg = O::nonneg(z);
  SigmoidParts<V> s;
  s.sig = O::select(z_nonneg, inv, small);
  s.sig_neg = O::select(z_nonneg, small, inv);
  s.log1p_e = O::log1p_unit(e, d, inv);
  return s;
}

// The binary cross-entropy of logit x and target t in [0, 1] (u = 1 - t) from x's sigmoid parts,
// u relu(x) + t relu(-x) + log(1 + exp(-|x|)), as (x >= 0 ? u : t) |x| + log(1 + exp(-|x|)): one of
// relu(x) and relu(-x) is 0, so this is the same number, rounded once, for every x (infinities
// included) in two operations where the two relus and their products take five.
template <typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE V soft_cross_entropy(V x, V t, V u, const SigmoidParts<V>& s) {
  return O::fmadd(O::select(O::nonneg(x), u, t), O::abs(x), s.log1p_e);
}

// q^gamma from q and log q (log q only evaluated for the general case).
template <GammaKind G, typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE V modulating_factor(V q, V log_q, V gamma) {
  if constexpr (G == GammaKind::kZero) {
    return V(1);
  } else if constexpr (G == GammaKind::kOne) {
    return q;
  } else if constexpr (G == GammaKind::kTwo) {
    return q * q;
  } else {
    return O::exp(gamma * log_q);
  }
}

// gamma, a constant for the kinds that fix it (the host picks kOne and kTwo for exactly 1 and 2):
// no register holds it in the kernels.
template <GammaKind G, typename V>
FOCAL_HOST_DEVICE V gamma_of(V gamma) {
  if constexpr (G == GammaKind::kOne) {
    return V(1);
  } else if constexpr (G == GammaKind::kTwo) {
    return V(2);
  } else {
    return gamma;
  }
}

template <typename V>
struct LossAndGrad {
  V loss;
  V grad;  // d loss / d (the argument the function was called with)
};

// Hard targets, seen from the wrong side: z = x for a negative (t = 0), z = -x for a positive.
// Then p_t = sigmoid(-z), q = sigmoid(z), CE = softplus(z) and
//   FL(z) = CE * q^gamma,   dFL/dz = q^gamma * (q + gamma * CE * sigmoid(-z))
// which is the paper's Appendix B derivative, dFL/dx = y (1-p_t)^gamma (gamma p_t log p_t + p_t - 1),
// rewritten without log(p_t) * (1 - p_t)^(gamma - 1) terms. alpha_t is applied by the caller, who
// may pass the sigmoid parts of z when it has them.
template <GammaKind G, typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE LossAndGrad<V> focal_hard(V z, const SigmoidParts<V>& s, V gamma) {
  const V ce = O::relu(z) + s.log1p_e;
  V log_q(0);
  if constexpr (G == GammaKind::kGeneral) {
    log_q = O::min0(z) - s.log1p_e;  // log sigmoid(z), exact for every z
  }
  const V w = modulating_factor<G, V, O>(s.sig, log_q, gamma);
  LossAndGrad<V> r;
  r.loss = ce * w;
  if constexpr (G == GammaKind::kZero) {
    r.grad = s.sig;
  } else {
    // ce * sigmoid(-z) first: both factors are bounded together, while gamma * ce alone can
    // overflow at the largest logits.
    r.grad = w * O::fmadd(gamma_of<G>(gamma), ce * s.sig_neg, s.sig);
  }
  return r;
}

// Whether the primitives O define hard_parts(z): z's sigmoid parts for focal_hard alone, whose
// sigmoid(-z) is only ever added to a multiple of sigmoid(z) (q + gamma CE sigmoid(-z) above, with
// both terms positive, CE <= |z| + 1 and q >= 1/2 wherever sigmoid(-z) <= 1/2) and so may carry an
// absolute error of an ulp of 1 rather than a relative one; sig and log1p_e stay relatively exact.
template <typename O, typename V, typename = void>
struct HasHardParts : std::false_type {};
template <typename O, typename V>
struct HasHardParts<O, V, std::void_t<decltype(O::hard_parts(std::declval<V>()))>> : std::true_type {};

template <GammaKind G, typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE LossAndGrad<V> focal_hard(V z, V gamma) {
  if constexpr (HasHardParts<O, V>::value) {
    return focal_hard<G, V, O>(z, O::hard_parts(z), gamma);
  } else {
    return focal_hard<G, V, O>(z, sigmoid_parts<V, O, kTinyExpUnseenFor<G>>(z), gamma);
  }
}

// Soft target t in [0, 1] (torchvision's definition, exact for t in {0, 1} too):
//   dFL/dx = q^gamma * ((p - t) + gamma * (1 - 2t) * CE * p (1 - p) / q)
// where p (1 - p) / q lies in [0, 2] for every t, so the quotient is well conditioned; at q = 0 it
// is multiplied by q^gamma = 0 and is set to 0. For gamma 1 and 2 the q cancels and there is no
// quotient at all: dFL/dx = q^(gamma - 1) * (gamma (1 - 2t) CE p (1 - p) + q (p - t)), with
// p (1 - p) = 0 wherever q = 0. alpha_t is applied by the caller.
template <GammaKind G, typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE LossAndGrad<V> focal_soft(V x, V t, V gamma) {
  const V one(1);
  const SigmoidParts<V> s = sigmoid_parts<V, O, kTinyExpUnseenFor<G>>(x);
  const V u = one - t;
  const V ce = soft_cross_entropy<V, O>(x, t, u, s);
  const V sig_neg_t = s.sig_neg * t;
  const V q = O::fmadd(s.sig, u, sig_neg_t);
  const auto q_positive = O::positive(q);
  V log_q(0);
  if constexpr (G == GammaKind::kGeneral) {
    log_q = O::log(q);
  }
  V w = modulating_factor<G, V, O>(q, log_q, gamma);
  if constexpr (G == GammaKind::kGeneral) {
    w = O::select(q_positive, w, V(0));  // 0^gamma with gamma > 0 (gamma == 0 is kZero)
  }
  const V p_minus_t = O::fmsub(s.sig, u, sig_neg_t);
  LossAndGrad<V> r;
  r.loss = ce * w;
  if constexpr (G == GammaKind::kZero) {
    r.grad = p_minus_t;
  } else if constexpr (G == GammaKind::kGeneral) {
    const V ratio = O::select(q_positive, divide<O>(s.sig * s.sig_neg, q), V(0));
    r.grad = w * O::fmadd(gamma * (u - t), ce * ratio, p_minus_t);  // ce * ratio first, as above
  } else {
    // ce * p (1 - p) is bounded (p (1 - p) falls as exp(-|x|) where CE grows as |x|). gamma is 1
    // or 2 here: gamma (1 - 2t) = gamma - 2 gamma t, rounded once.
    constexpr float kGamma = G == GammaKind::kOne ? 1.f : 2.f;
    const V gamma_1_2t = O::fmadd(t, V(-2 * kGamma), V(kGamma));
    const V inner = O::fmadd(gamma_1_2t, ce * (s.sig * s.sig_neg), q * p_minus_t);
    r.grad = G == GammaKind::kOne ? inner : q * inner;
  }
  return r;
}

// alpha_t = alpha t + (1 - alpha)(1 - t): the weights of t = 1 and t = 0, built once per launch in
// the math type (both 1 without alpha weighting). Kernels may fold other per-row factors into them.
template <typename V>
struct AlphaWeights {
  V pos;  // alpha
  V neg;  // 1 - alpha

  FOCAL_HOST_DEVICE V at(V t) const { return Ops<V>::fmadd(pos - neg, t, neg); }
  FOCAL_HOST_DEVICE AlphaWeights scaled(V factor) const { return {pos * factor, neg * factor}; }
};

// alpha < 0 means no alpha weighting.
template <typename V, typename S>
FOCAL_HOST_DEVICE AlphaWeights<V> make_alpha(double alpha) {
  if (alpha < 0.0) return {V(S(1)), V(S(1))};
  return {V(static_cast<S>(alpha)), V(static_cast<S>(1.0 - alpha))};
}

// The two entry points used by the kernels; both return alpha-weighted d loss / d x.

// Hard target given as a mask: positive lanes have t = 1, the others t = 0.
template <GammaKind G, typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE LossAndGrad<V> focal_binary(V x, typename Ops<V>::Mask positive, V gamma,
                                              const AlphaWeights<V>& alpha) {
  const LossAndGrad<V> r = focal_hard<G, V, O>(O::select(positive, V(0) - x, x), gamma);
  LossAndGrad<V> out;
  out.loss = r.loss * O::select(positive, alpha.pos, alpha.neg);
  out.grad = r.grad * O::select(positive, V(0) - alpha.pos, alpha.neg);  // dz/dx = -1 if positive
  return out;
}

// Any target t in [0, 1].
template <GammaKind G, typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE LossAndGrad<V> focal_target(V x, V t, V gamma, const AlphaWeights<V>& alpha) {
  LossAndGrad<V> out = focal_soft<G, V, O>(x, t, gamma);
  const V a = alpha.at(t);
  out.loss = out.loss * a;
  out.grad = out.grad * a;
  return out;
}

}  // namespace focal
