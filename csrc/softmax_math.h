// Per-row and per-element math of the softmax focal loss and its derivative.
//
// Like focal_math.h (whose Ops primitives and GammaKind this header reuses), this is the only place
// the math lives: the CUDA kernels instantiate it with scalar float / double, the CPU kernels with
// SIMD vectors (cpu/vec/simd.h), whose lanes are either the classes of one row or, for segmentation
// logits (N, C, H, W), the positions of one image.
//
// Notation, for one element (a row of C logits x_c, target class y):
//   m = max_c x_c,  z_c = x_c - m <= 0,  s = sum of exp(z_c) over every class but one maximal one,
//   T = 1 + s = sum_c exp(z_c),  log p_c = z_c - log1p(s),  p_c = exp(z_c) / T.
//   f(l) = -(1 - e^l)^gamma l, so the focal term of class c is f(log p_c) = (1 - p_c)^gamma (-log p_c).
//   Loss = sum_c q_c a_c f(log p_c) with q the (smoothed) target distribution and a_c = weight_c alpha_c;
//   d Loss / d x_j = sum_c q_c a_c f'(log p_c) (delta_jc - p_j) = t_j (1 - p_j) - p_j (S - t_j),
//   with t_c = q_c a_c f'(log p_c) and S = sum_c t_c.
// Nothing is formed by cancellation: log1p(s) keeps log p of a near-certain class (and so 1 - p) to
// full relative accuracy, 1 - p of a maximal class is s / T (the other classes' sum), every other
// class has p <= 1/2, and f' is written as -(1 - p)^gamma (1 + gamma p r) with r = -log p / (1 - p)
// in [1, inf) (r -> 1 as p -> 1), so (1 - p)^(gamma - 1) never appears: finite for every gamma >= 0
// at any finite logits, including 0 < gamma < 1 at p -> 1. Without label smoothing t is zero but
// for the target, so the gradient of every other class is -p_j t_y, and the target's t_y (1 - p_y).
// NaN anywhere in a row makes its sum NaN, and so every output of that row.
#pragma once

#include <limits>

#include "focal_math.h"

namespace focal {

// Whether the primitives O define max_keep_nan(bound, x) (the CPU vector types do).
template <typename O, typename V, typename = void>
struct HasMaxKeepNan : std::false_type {};
template <typename O, typename V>
struct HasMaxKeepNan<O, V, std::void_t<decltype(O::max_keep_nan(std::declval<V>(), std::declval<V>()))>>
    : std::true_type {};

// The larger of a running maximum and x, for the first pass over a row. It need not propagate NaN:
// a NaN logit makes the row's exp sum NaN in the second pass whatever maximum is subtracted.
template <typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE V softmax_max(V running, V x) {
  if constexpr (HasMaxKeepNan<O, V>::value) {
    return O::max_keep_nan(running, x);
  } else {
    return O::select(O::positive(x - running), x, running);
  }
}

// The second pass's running sums: exp(z) of the classes below the maximum, and the number of
// classes at it (z = 0), kept apart so that a sum near 1 loses none of the small terms' bits.
template <typename V>
struct SoftmaxSums {
  V below;  // sum of exp(z_c) over z_c < 0 (NaN once any z is NaN)
  V ties;   // number of z_c == 0

  FOCAL_HOST_DEVICE SoftmaxSums() : below(0), ties(0) {}
};

// Adds class z = x - max to the sums; returns exp(z), which a kernel may keep for the gradient.
template <typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE V softmax_accumulate(SoftmaxSums<V>& sums, V z) {
  const auto at_max = O::nonneg(z);  // false for NaN, whose exp then enters `below`
  const V e = O::exp(z);
  sums.below = sums.below + O::select(at_max, V(0), e);
  sums.ties = sums.ties + O::select(at_max, V(1), V(0));
  return e;
}

// What every class of a row needs from the row.
template <typename V>
struct SoftmaxRow {
  V max;        // m
  V others;     // s: the classes' exp sum but for one maximal class
  V log_total;  // log T = log1p(s)
  V inv_total;  // 1 / T
};

// The row from its maximum and its second pass's sums.
template <typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE SoftmaxRow<V> softmax_row(V max, V below, V ties) {
  const V one(1);
  SoftmaxRow<V> row;
  row.max = max;
  row.others = below + (ties - one);
  const V total = one + row.others;
  row.inv_total = reciprocal<O>(total);
  // log1p(s) for any s >= 0: total - 1 is exact, so the first-order term restores what rounding
  // 1 + s lost (as focal_math.h's log1p_unit, there for s <= 1).
  row.log_total = O::log(total) + (row.others - (total - one)) * row.inv_total;
  return row;
}

// A class's probability, its complement and its log.
template <typename V>
struct SoftmaxProb {
  V p;
  V one_minus_p;
  V log_p;
};

template <typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE SoftmaxProb<V> softmax_prob(const SoftmaxRow<V>& row, V x) {
  const V z = x - row.max;
  SoftmaxProb<V> r;
  r.p = O::exp(z) * row.inv_total;
  r.log_p = z - row.log_total;
  // A maximal class (z = 0) from the others' sum; any other has p <= 1/2.
  r.one_minus_p = O::select(O::nonneg(z), row.others * row.inv_total, V(1) - r.p);
  return r;
}

// f(log p) = (1 - p)^gamma (-log p) and f'(log p) = -(1 - p)^gamma (1 + gamma p r),
// r = -log p / (1 - p) (the integer gammas without the quotient).
template <typename V>
struct FocalTerm {
  V value;  // f
  V slope;  // f'
};

template <GammaKind G, typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE FocalTerm<V> softmax_focal_term(const SoftmaxProb<V>& c, V gamma) {
  const V neg_log_p = V(0) - c.log_p;
  FocalTerm<V> t;
  if constexpr (G == GammaKind::kZero) {
    t.value = neg_log_p;
    t.slope = V(-1);
  } else if constexpr (G == GammaKind::kOne) {
    t.value = c.one_minus_p * neg_log_p;
    t.slope = V(0) - O::fmadd(c.p, neg_log_p, c.one_minus_p);
  } else if constexpr (G == GammaKind::kTwo) {
    const V w = c.one_minus_p * c.one_minus_p;
    t.value = w * neg_log_p;
    t.slope = V(0) - O::fmadd(V(2) * c.p * c.one_minus_p, neg_log_p, w);
  } else {
    const auto some = O::positive(c.one_minus_p);
    const V w = O::select(some, O::exp(gamma * O::log(c.one_minus_p)), V(0));
    const V r = O::select(some, divide<O>(neg_log_p, c.one_minus_p), V(1));
    t.value = w * neg_log_p;
    t.slope = V(0) - w * O::fmadd(gamma * c.p, r, V(1));
  }
  return t;
}

// d Loss / d x_j = t_j (1 - p_j) - p_j (S - t_j), with t_j this class's q_j a_j f' and S their row
// sum (S - t_j is exactly 0 without smoothing: then every t but the target's is 0).
template <typename V, typename O = Ops<V>>
FOCAL_HOST_DEVICE V softmax_grad(const SoftmaxProb<V>& c, V t, V sum_t) {
  return O::fmadd(t, c.one_minus_p, V(0) - c.p * (sum_t - t));
}

}  // namespace focal
