// The vectorised CPU kernel of the softmax focal loss, compiled once per instruction set like
// focal_kernel.cpp (setup.py's ISA_SOURCES); softmax_cpu.cpp picks a copy at run time.
//
// Two layouts. Rows (inner == 1, logits (N, C)): the lanes of a vector are consecutive classes of
// one row; three short passes over the row, which stays in L1: its maximum, its exp sum, then the
// gradient. Positions (inner > 1, segmentation logits (N, C, H, W)): the lanes are consecutive
// positions of one image, whose classes lie `inner` apart, so every pass is a run of contiguous
// loads and each lane is its own row: no horizontal reduction at all.
#include <algorithm>
#include <cstring>
#include <limits>

#include <c10/util/Exception.h>

#include "../softmax_math.h"
#include "softmax_kernel.h"
#include "vec/simd.h"

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must name the instruction set this file is compiled for"
#endif

namespace focal::cpu::CPU_CAPABILITY {
namespace {

template <typename scalar_t>
struct Types {
  using S = simd::SimdFor<scalar_t>;       // loads and stores of the data
  using V = typename S::V;
  using acc_t = typename S::acc_t;
  using SA = simd::SimdFor<acc_t>;         // loads and stores of the same vectors in the math type
  using O = Ops<V>;
  static constexpr int64_t kLanes = S::kLanes;
};

// Up to how many classes a kernel keeps exp(z) between the sum and the gradient, saving one exp per
// element: 16 KB of stack for a float32 row, or for 256 classes of a vector of positions.
constexpr int64_t kCachedRowClasses = 4096;
constexpr int64_t kCachedClasses = 256;

// The (smoothed) target distribution: q_target for the target class, q_other for the rest.
template <typename acc_t>
struct Smoothing {
  acc_t q_target, q_other;
  Smoothing(double eps, int64_t classes)
      : q_target(static_cast<acc_t>(1.0 - eps + eps / static_cast<double>(classes))),
        q_other(static_cast<acc_t>(eps / static_cast<double>(classes))) {}
};

// ---- Rows: logits (N, C) ---------------------------------------------------------------------

template <typename scalar_t, GammaKind G, bool kSmooth>
double rows_impl(const SoftmaxArgs& a, double scale_d, int64_t r0, int64_t r1) {
  using T = Types<scalar_t>;
  using S = typename T::S;
  using SA = typename T::SA;
  using V = typename T::V;
  using O = typename T::O;
  using acc_t = typename T::acc_t;
  using OS = Ops<acc_t>;
  constexpr int64_t kLanes = T::kLanes;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();

  const int64_t C = a.classes;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const Smoothing<acc_t> q(a.label_smoothing, C);
  const auto* factor = static_cast<const acc_t*>(a.class_factor);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  auto* grad_all = static_cast<scalar_t*>(a.grad);

  // exp(z) of the current row, kept from the sum for the gradient (no smoothing).
  V cache_storage[kCachedRowClasses / kLanes];
  V* cache = !kSmooth && grad_all && C <= kCachedRowClasses ? cache_storage : nullptr;

  double total = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t id = a.target[r];
    const scalar_t* x = x_all + r * C;
    scalar_t* grad = grad_all ? grad_all + r * C : nullptr;
    if (id == a.ignore_index) {
      if (loss_all) loss_all[r] = scalar_t(0);
      if (grad) std::fill_n(grad, C, scalar_t(0));
      continue;
    }

    V vmax(lowest);
    for (int64_t c = 0; c < C; c += kLanes) {
      const int64_t n = std::min(kLanes, C - c);
      V v = S::load(x + c, n);
      if (n < kLanes) v = O::select(S::first(n), v, V(lowest));
      vmax = softmax_max<V, O>(vmax, v);
    }
    alignas(64) acc_t lanes[kLanes];
    SA::store(lanes, kLanes, vmax);
    acc_t m = lanes[0];
    for (int64_t i = 1; i < kLanes; ++i) m = softmax_max<acc_t, OS>(m, lanes[i]);
    const V vm(m);

    SoftmaxSums<V> sums;
    for (int64_t c = 0; c < C; c += kLanes) {
      const int64_t n = std::min(kLanes, C - c);
      const V z = S::load(x + c, n) - vm;
      V e;
      if (n == kLanes) {
        e = softmax_accumulate<V, O>(sums, z);
      } else {
        SoftmaxSums<V> tail;
        e = softmax_accumulate<V, O>(tail, z);
        sums.below = sums.below + S::zero_unless(S::first(n), tail.below);
        sums.ties = sums.ties + S::zero_unless(S::first(n), tail.ties);
      }
      if (cache) cache[c / kLanes] = e;
    }
    const SoftmaxRow<acc_t> row = softmax_row<acc_t, OS>(
        m, static_cast<acc_t>(S::sum(sums.below)), static_cast<acc_t>(S::sum(sums.ties)));

    if constexpr (!kSmooth) {
      // Only the target's term: the loss a_y f(log p_y), and the gradient t_y (delta_jy - p_j).
      const SoftmaxProb<acc_t> py = softmax_prob<acc_t, OS>(row, static_cast<acc_t>(x[id]));
      const FocalTerm<acc_t> term = softmax_focal_term<G, acc_t, OS>(py, gamma);
      const acc_t fy = factor ? factor[id] : acc_t(1);
      const acc_t loss = fy * term.value;
      if (loss_all) loss_all[r] = static_cast<scalar_t>(loss * scale);
      else total += static_cast<double>(loss);
      if (grad) {
        const acc_t t_y = fy * term.slope;
        const V k((acc_t(0) - t_y) * row.inv_total * scale);  // -p_j t_y = exp(z_j) (-t_y / T)
        for (int64_t c = 0; c < C; c += kLanes) {
          const int64_t n = std::min(kLanes, C - c);
          const V e = cache ? cache[c / kLanes] : O::exp(S::load(x + c, n) - vm);
          S::store(grad + c, n, e * k);
        }
        grad[id] = static_cast<scalar_t>(t_y * py.one_minus_p * scale);  // without cancellation
      }
    } else {
      // Every class has a term: a pass for the loss and S = sum_c t_c, one for the gradient.
      const SoftmaxRow<V> vrow{vm, V(row.others), V(row.log_total), V(row.inv_total)};
      const V vgamma(gamma);
      const auto class_terms = [&](int64_t c, int64_t n, SoftmaxProb<V>& prob, V& qa)
                                   FOCAL_ALWAYS_INLINE {
        prob = softmax_prob<V, O>(vrow, S::load(x + c, n));
        qa = O::select(S::lane(id - c), V(q.q_target), V(q.q_other));
        if (factor) qa = qa * SA::load(factor + c, n);
        return softmax_focal_term<G, V, O>(prob, vgamma);
      };
      V loss_acc(acc_t(0)), slope_acc(acc_t(0));
      for (int64_t c = 0; c < C; c += kLanes) {
        const int64_t n = std::min(kLanes, C - c);
        SoftmaxProb<V> prob;
        V qa;
        const FocalTerm<V> term = class_terms(c, n, prob, qa);
        loss_acc = loss_acc + S::zero_unless(S::first(n), qa * term.value);
        slope_acc = slope_acc + S::zero_unless(S::first(n), qa * term.slope);
      }
      const acc_t loss = static_cast<acc_t>(S::sum(loss_acc));
      if (loss_all) loss_all[r] = static_cast<scalar_t>(loss * scale);
      else total += static_cast<double>(loss);
      if (grad) {
        const V sum_t(static_cast<acc_t>(S::sum(slope_acc)));
        const V vscale(scale);
        for (int64_t c = 0; c < C; c += kLanes) {
          const int64_t n = std::min(kLanes, C - c);
          SoftmaxProb<V> prob;
          V qa;
          const FocalTerm<V> term = class_terms(c, n, prob, qa);
          S::store(grad + c, n, softmax_grad<V, O>(prob, qa * term.slope, sum_t) * vscale);
        }
      }
    }
  }
  return total;
}

// ---- Positions: logits (N, C, inner) -----------------------------------------------------------

template <typename scalar_t, GammaKind G, bool kSmooth>
double positions_impl(const SoftmaxArgs& a, double scale_d, int64_t n0, int64_t n1, int64_t p0,
                      int64_t p1) {
  using T = Types<scalar_t>;
  using S = typename T::S;
  using SA = typename T::SA;
  using V = typename T::V;
  using O = typename T::O;
  using acc_t = typename T::acc_t;
  constexpr int64_t kLanes = T::kLanes;

  const int64_t C = a.classes, inner = a.inner;
  const V scale(static_cast<acc_t>(scale_d));
  const V gamma(static_cast<acc_t>(a.gamma));
  const Smoothing<acc_t> q(a.label_smoothing, C);
  const auto* factor = static_cast<const acc_t*>(a.class_factor);
  const V zero(acc_t(0));

  // exp(z) of every class of the current vector, kept from the sum for the gradient (no smoothing).
  V cache_storage[kCachedClasses];
  V* cache = !kSmooth && a.grad && C <= kCachedClasses ? cache_storage : nullptr;

  V acc(acc_t(0));
  for (int64_t b = n0; b < n1; ++b) {
    const auto* x = static_cast<const scalar_t*>(a.logits) + b * C * inner;
    const int64_t* ids = a.target + b * inner;
    auto* loss_out = a.loss ? static_cast<scalar_t*>(a.loss) + b * inner : nullptr;
    auto* grad = a.grad ? static_cast<scalar_t*>(a.grad) + b * C * inner : nullptr;
    for (int64_t p = p0; p < p1; p += kLanes) {
      const int64_t n = std::min(kLanes, p1 - p);
      // Per lane: the class id as a number (-1 when ignored), whether kept, the target's logit
      // and class factor.
      alignas(64) acc_t id_lanes[kLanes], kept_lanes[kLanes], x_target[kLanes], f_target[kLanes];
      int64_t target_lanes[kLanes];
      int64_t kept_count = 0;
      for (int64_t i = 0; i < kLanes; ++i) {
        const int64_t id = i < n ? ids[p + i] : a.ignore_index;
        const bool kept = id != a.ignore_index;
        kept_count += kept;
        target_lanes[i] = id;
        id_lanes[i] = kept ? static_cast<acc_t>(id) : acc_t(-1);
        kept_lanes[i] = kept ? acc_t(1) : acc_t(0);
        x_target[i] = kept ? static_cast<acc_t>(x[id * inner + p + i]) : acc_t(0);
        f_target[i] = kept && factor ? factor[id] : acc_t(1);
      }
      if (kept_count == 0) {
        if (loss_out) S::store(loss_out + p, n, zero);
        if (grad) {
          for (int64_t c = 0; c < C; ++c) S::store(grad + c * inner + p, n, zero);
        }
        continue;
      }
      const V id_v = SA::load(id_lanes, kLanes);
      const auto kept = O::positive(SA::load(kept_lanes, kLanes));
      // Lanes whose class is c: (id - c)^2 <= 0, exact for class ids below 2^24 (the driver's limit).
      const auto is_target = [&](int64_t c) FOCAL_ALWAYS_INLINE {
        const V d = id_v - V(static_cast<acc_t>(c));
        return O::nonneg(zero - d * d);
      };

      V vmax = S::load(x + p, n);
      for (int64_t c = 1; c < C; ++c) vmax = softmax_max<V, O>(vmax, S::load(x + c * inner + p, n));
      SoftmaxSums<V> sums;
      for (int64_t c = 0; c < C; ++c) {
        const V e = softmax_accumulate<V, O>(sums, S::load(x + c * inner + p, n) - vmax);
        if (cache) cache[c] = e;
      }
      const SoftmaxRow<V> row = softmax_row<V, O>(vmax, sums.below, sums.ties);

      V loss(acc_t(0));
      if constexpr (!kSmooth) {
        const SoftmaxProb<V> py = softmax_prob<V, O>(row, SA::load(x_target, kLanes));
        const FocalTerm<V> term = softmax_focal_term<G, V, O>(py, gamma);
        const V fy = SA::load(f_target, kLanes);
        loss = O::select(kept, fy * term.value, zero);
        if (grad) {
          const V t_y = fy * term.slope;
          const V k = (zero - t_y) * row.inv_total * scale;
          // -p_j t_y for every class; an ignored lane is 0 (even for NaN logits), and the targets'
          // t_y (1 - p_y) are stored after, one per lane.
          const bool all_kept = kept_count == n;
          for (int64_t c = 0; c < C; ++c) {
            const V e = cache ? cache[c] : O::exp(S::load(x + c * inner + p, n) - vmax);
            const V g = e * k;
            S::store(grad + c * inner + p, n, all_kept ? g : O::select(kept, g, zero));
          }
          alignas(64) acc_t at_target[kLanes];
          SA::store(at_target, kLanes, t_y * py.one_minus_p * scale);
          for (int64_t i = 0; i < n; ++i) {
            if (kept_lanes[i] != acc_t(0)) {
              grad[target_lanes[i] * inner + p + i] = static_cast<scalar_t>(at_target[i]);
            }
          }
        }
      } else {
        const auto class_terms = [&](int64_t c, SoftmaxProb<V>& prob, V& qa) FOCAL_ALWAYS_INLINE {
          prob = softmax_prob<V, O>(row, S::load(x + c * inner + p, n));
          qa = O::select(is_target(c), V(q.q_target), V(q.q_other));
          if (factor) qa = qa * V(factor[c]);
          return softmax_focal_term<G, V, O>(prob, gamma);
        };
        V sum_t(acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          SoftmaxProb<V> prob;
          V qa;
          const FocalTerm<V> term = class_terms(c, prob, qa);
          loss = O::fmadd(qa, term.value, loss);
          sum_t = O::fmadd(qa, term.slope, sum_t);
        }
        loss = O::select(kept, loss, zero);
        if (grad) {
          for (int64_t c = 0; c < C; ++c) {
            SoftmaxProb<V> prob;
            V qa;
            const FocalTerm<V> term = class_terms(c, prob, qa);
            const V g = softmax_grad<V, O>(prob, qa * term.slope, sum_t) * scale;
            S::store(grad + c * inner + p, n, O::select(kept, g, zero));
          }
        }
      }
      if (loss_out) S::store(loss_out + p, n, loss * scale);
      else acc = acc + S::zero_unless(S::first(n), loss);
    }
  }
  return S::sum(acc);
}

template <typename scalar_t, GammaKind G, bool kSmooth>
double block_impl(const SoftmaxArgs& a, double scale, int64_t n0, int64_t n1, int64_t p0,
                  int64_t p1) {
  if (a.inner == 1) return rows_impl<scalar_t, G, kSmooth>(a, scale, n0, n1);
  return positions_impl<scalar_t, G, kSmooth>(a, scale, n0, n1, p0, p1);
}

template <typename scalar_t, bool kSmooth>
double dispatch_gamma(const SoftmaxArgs& a, GammaKind g, double scale, int64_t n0, int64_t n1,
                      int64_t p0, int64_t p1) {
  return with_gamma_kind(g, [&](auto gamma) {
    return block_impl<scalar_t, decltype(gamma)::value, kSmooth>(a, scale, n0, n1, p0, p1);
  });
}

template <typename scalar_t>
double dispatch_smoothing(const SoftmaxArgs& a, GammaKind g, double scale, int64_t n0, int64_t n1,
                          int64_t p0, int64_t p1) {
  if (a.label_smoothing > 0) return dispatch_gamma<scalar_t, true>(a, g, scale, n0, n1, p0, p1);
  return dispatch_gamma<scalar_t, false>(a, g, scale, n0, n1, p0, p1);
}

}  // namespace

double softmax_block(const SoftmaxArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                     double scale, int64_t outer_begin, int64_t outer_end, int64_t inner_begin,
                     int64_t inner_end) {
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    return dispatch_smoothing<scalar_t>(args, gamma_kind, scale, outer_begin, outer_end,
                                        inner_begin, inner_end);
  };
  switch (dtype) {
    case c10::ScalarType::Double: return run(double{});
    case c10::ScalarType::BFloat16: return run(c10::BFloat16{});
    case c10::ScalarType::Half: return run(c10::Half{});
    default: return run(float{});
  }
}

}  // namespace focal::cpu::CPU_CAPABILITY
