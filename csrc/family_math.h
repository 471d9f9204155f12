// Per-element math of the focal loss's family, shared by the CPU and CUDA kernels like focal_math.h:
//
//   FL   the focal loss (focal_math.h),
//   FL*  the variant of the focal loss paper's Appendix A: -log(sigmoid(gamma x_t + beta)) / gamma,
//   QFL  the quality focal loss of Generalized Focal Loss (Li et al., 2020):
//        |t - p|^beta * CE(x, t) with a soft quality target t,
//   VFL  the varifocal loss of VarifocalNet (Zhang et al., 2021):
//        t CE(x, t) where t > 0, alpha p^gamma CE(x, 0) where t = 0,
//
// with p = sigmoid(x) and CE(x, t) = -t log p - (1 - t) log(1 - p). Each loss is an ElementLoss
// policy with the three entry points the kernels call, all returning d loss / d x beside the loss:
//
//   soft(x, t)          any target t in [0, 1], weighted by the loss's alpha_t;
//   negative(x)         t = 0, NOT weighted: the kernels fold alpha.neg (and the scale) into one
//                       factor per vector or chunk of negatives, the bulk of dense detection;
//   binary(x, positive) t = 1 on the positive lanes, 0 on the others, weighted.
//
// Every loss is written from sigmoid_parts (one exp, one reciprocal, one log1p), so that, as for
// FL, any finite logit gives a finite loss and gradient. The negatives of QFL (p^beta softplus(x))
// and VFL (alpha p^gamma softplus(x)) are exactly focal_hard with z = x: with class-id targets
// those losses run the focal loss's fast path.
#pragma once

#include "focal_math.h"

namespace focal {

enum class LossKind { kFocal, kFocalStar, kQuality, kVarifocal };

// The loss's alpha weights of t = 1 and t = 0: FL and FL* weight positives by alpha and negatives
// by 1 - alpha (both 1 without alpha); VFL weights only its negatives, by alpha (its positives
// carry their target instead); QFL has no alpha.
template <LossKind L, typename V, typename S>
FOCAL_HOST_DEVICE AlphaWeights<V> loss_alpha(double alpha) {
  if constexpr (L == LossKind::kVarifocal) {
    return {V(S(1)), V(static_cast<S>(alpha))};
  } else if constexpr (L == LossKind::kQuality) {
    return {V(S(1)), V(S(1))};
  } else {
    return make_alpha<V, S>(alpha);
  }
}

// |d| for a value or a vector of them.
template <typename V, typename O>
FOCAL_HOST_DEVICE V magnitude(V d) {
  return O::select(O::nonneg(d), d, V(0) - d);
}

// The hyper-parameters of a launch in the math type. gamma is the focusing exponent (FL's and
// VFL's gamma, QFL's beta) or FL*'s sharpness; beta is FL*'s shift, inv_gamma and shift = beta /
// gamma are FL*'s, computed once by the caller.
template <typename V>
struct LossParams {
  V gamma;
  V beta;
  V inv_gamma;
  V shift;
};

template <LossKind L, GammaKind G, typename V, typename O = Ops<V>>
struct ElementLoss;

template <GammaKind G, typename V, typename O>
struct ElementLoss<LossKind::kFocal, G, V, O> {
  LossParams<V> p;
  AlphaWeights<V> alpha;

  FOCAL_HOST_DEVICE LossAndGrad<V> soft(V x, V t) const { return focal_target<G, V, O>(x, t, p.gamma, alpha); }
  FOCAL_HOST_DEVICE LossAndGrad<V> negative(V x) const { return focal_hard<G, V, O>(x, p.gamma); }
  FOCAL_HOST_DEVICE LossAndGrad<V> binary(V x, typename Ops<V>::Mask positive) const {
    return focal_binary<G, V, O>(x, positive, p.gamma, alpha);
  }
};

// FL* = softplus(z) / gamma with z = -(gamma x + beta) for a positive and z = gamma x - beta for
// a negative; dFL*/dx = -sigmoid(z) and +sigmoid(z) (Appendix B: y (p*_t - 1)). softplus(z) / gamma
// is computed as relu(z) / gamma + log(1 + exp(-|z|)) / gamma with relu(z) / gamma = relu(-(x +
// shift)) or relu(x - shift), so that gamma x overflowing (|x| near the float maximum) leaves the
// loss finite. A soft target mixes both linearly, as the binary cross entropy does.
template <GammaKind G, typename V, typename O>
struct ElementLoss<LossKind::kFocalStar, G, V, O> {
  LossParams<V> p;
  AlphaWeights<V> alpha;

  // softplus(z) / gamma and sigmoid(z) for z = gamma x - beta (negative) or -(gamma x + beta).
  FOCAL_HOST_DEVICE LossAndGrad<V> side(V x, bool positive) const {
    const V z = positive ? O::fmadd(V(0) - p.gamma, x, V(0) - p.beta) : O::fmadd(p.gamma, x, V(0) - p.beta);
    const V linear = positive ? V(0) - (x + p.shift) : x - p.shift;
    const SigmoidParts<V> s = sigmoid_parts<V, O>(z);
    return {O::fmadd(s.log1p_e, p.inv_gamma, O::relu(linear)), s.sig};
  }
  FOCAL_HOST_DEVICE LossAndGrad<V> negative(V x) const { return side(x, false); }
  FOCAL_HOST_DEVICE LossAndGrad<V> binary(V x, typename Ops<V>::Mask positive) const {
    const V z = O::select(positive, O::fmadd(V(0) - p.gamma, x, V(0) - p.beta), O::fmadd(p.gamma, x, V(0) - p.beta));
    const V linear = O::select(positive, V(0) - (x + p.shift), x - p.shift);
    const SigmoidParts<V> s = sigmoid_parts<V, O>(z);
    LossAndGrad<V> r;
    r.loss = O::fmadd(s.log1p_e, p.inv_gamma, O::relu(linear)) * O::select(positive, alpha.pos, alpha.neg);
    r.grad = s.sig * O::select(positive, V(0) - alpha.pos, alpha.neg);
    return r;
  }
  FOCAL_HOST_DEVICE LossAndGrad<V> soft(V x, V t) const {
    const LossAndGrad<V> pos = side(x, true), neg = side(x, false);
    const V u = V(1) - t;
    // Each side only where its share is non-zero: a hard target never multiplies the other side,
    // which may be infinite at the largest logits, by 0.
    const V zero(0);
    const V loss = O::select(O::positive(t), t * pos.loss, zero) + O::select(O::positive(u), u * neg.loss, zero);
    const V grad = u * neg.grad - t * pos.grad;
    const V a = alpha.at(t);
    return {loss * a, grad * a};
  }
};

// QFL = |d|^beta CE(x, t) with d = p - t, and
//   dQFL/dx = |d|^beta d + beta |d|^(beta - 1) sign(d) p (1 - p) CE
//           = |d|^beta d + beta (|d|^beta / d) p (1 - p) CE,
// where |d|^beta / d = sign(d) |d|^(beta - 1) is bounded for beta >= 1 and taken as 0 at d = 0 (the
// derivative there for beta > 1; for beta < 1 there is none). d is formed as p (1 - t) - (1 - p) t
// from sigmoid's two halves, exact for t in {0, 1}. The negative (t = 0) is focal_hard.
template <GammaKind G, typename V, typename O>
struct ElementLoss<LossKind::kQuality, G, V, O> {
  LossParams<V> p;
  AlphaWeights<V> alpha;  // both 1, times a row weight

  FOCAL_HOST_DEVICE LossAndGrad<V> negative(V x) const { return focal_hard<G, V, O>(x, p.gamma); }
  FOCAL_HOST_DEVICE LossAndGrad<V> soft(V x, V t) const {
    const SigmoidParts<V> s = sigmoid_parts<V, O>(x);
    const V u = V(1) - t;
    const V ce = soft_cross_entropy<V, O>(x, t, u, s);
    const V d = O::fmadd(s.sig, u, V(0) - s.sig_neg * t);
    const V a = magnitude<V, O>(d);
    V log_a(0);
    if constexpr (G == GammaKind::kGeneral) log_a = O::log(a);
    V w = modulating_factor<G, V, O>(a, log_a, p.gamma);
    if constexpr (G == GammaKind::kGeneral) w = O::select(O::positive(a), w, V(0));
    LossAndGrad<V> r;
    r.loss = ce * w;
    if constexpr (G == GammaKind::kZero) {
      r.grad = d;
    } else {
      V ratio = d;  // |d|^beta / d, which is d itself for beta = 2
      if constexpr (G != GammaKind::kTwo) ratio = O::select(O::positive(a), divide<O>(w, d), V(0));
      // p (1 - p) CE in two parts, the small half of p (1 - p) with the ratio (large for beta < 1)
      // and the other with CE: at saturated logits p (1 - p) CE alone would underflow where the
      // product with the ratio does not.
      const typename Ops<V>::Mask right = O::positive(x);
      const V small = O::select(right, s.sig_neg, s.sig), large = O::select(right, s.sig, s.sig_neg);
      r.grad = O::fmadd(p.gamma * (ratio * small), large * ce, w * d);
    }
    const V at = alpha.at(t);
    r.loss = r.loss * at;
    r.grad = r.grad * at;
    return r;
  }
  FOCAL_HOST_DEVICE LossAndGrad<V> binary(V x, typename Ops<V>::Mask positive) const {
    return soft(x, O::select(positive, V(1), V(0)));
  }
};

// VFL = t CE(x, t), d/dx = t (p - t) where t > 0; alpha focal_hard(x) where t = 0.
template <GammaKind G, typename V, typename O>
struct ElementLoss<LossKind::kVarifocal, G, V, O> {
  LossParams<V> p;
  AlphaWeights<V> alpha;  // pos: 1, neg: alpha (times a row weight)

  FOCAL_HOST_DEVICE LossAndGrad<V> negative(V x) const { return focal_hard<G, V, O>(x, p.gamma); }
  FOCAL_HOST_DEVICE LossAndGrad<V> soft(V x, V t) const {
    const SigmoidParts<V> s = sigmoid_parts<V, O>(x);
    const LossAndGrad<V> neg = focal_hard<G, V, O>(x, s, p.gamma);
    const V u = V(1) - t;
    const V ce = soft_cross_entropy<V, O>(x, t, u, s);
    const V d = O::fmadd(s.sig, u, V(0) - s.sig_neg * t);
    const auto positive = O::positive(t);
    LossAndGrad<V> r;
    r.loss = O::select(positive, (t * ce) * alpha.pos, neg.loss * alpha.neg);
    r.grad = O::select(positive, (t * d) * alpha.pos, neg.grad * alpha.neg);
    return r;
  }
  FOCAL_HOST_DEVICE LossAndGrad<V> binary(V x, typename Ops<V>::Mask positive) const {
    return soft(x, O::select(positive, V(1), V(0)));
  }
};

// The policy of a launch: the hyper-parameters (double, as the op takes them) in the math type S,
// broadcast to V.
template <LossKind L, GammaKind G, typename V, typename S, typename O = Ops<V>>
FOCAL_HOST_DEVICE ElementLoss<L, G, V, O> make_loss(double alpha, double gamma, double beta) {
  const double inv = L == LossKind::kFocalStar ? 1.0 / gamma : 0.0;
  LossParams<V> p{V(static_cast<S>(gamma)), V(static_cast<S>(beta)), V(static_cast<S>(inv)),
                  V(static_cast<S>(beta * inv))};
  return {p, loss_alpha<L, V, S>(alpha)};
}

}  // namespace focal
