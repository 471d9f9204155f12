// The CPU kernel's loop over rows, for every loss of the family (family_math.h), target form and
// gamma: included by focal_kernel.cpp (the focal loss) and family_kernel.cpp (FL*, QFL, VFL), each
// compiled once per instruction set with CPU_CAPABILITY defined (see setup.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <c10/util/Exception.h>

#include "../family_math.h"
#include "../kernel_args.h"
#include "focal_kernel.h"
#include "id_runs.h"
#include "vec/simd.h"

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must name the instruction set this file is compiled for"
#endif

namespace focal::cpu::CPU_CAPABILITY {

// Rows [r0, r1) of `a` for the loss L, targets TK and gamma G: see RowsFn (focal_kernel.h).
template <typename scalar_t, TargetKind TK, GammaKind G, LossKind L>
double rows_impl(const KernelArgs& a, double scale_d, int64_t r0, int64_t r1) {
  using S = simd::SimdFor<scalar_t>;
  using V = typename S::V;
  using acc_t = typename S::acc_t;
  using O = Ops<V>;
  constexpr int64_t kLanes = S::kLanes;

  const int64_t C = a.cols;
  if constexpr (TK == TargetKind::kClassId) {
    // Plain class ids in rows of at least a vector: runs of rows (id_runs.h).
    if (a.elem_weight == nullptr && a.class_alpha == nullptr && C >= kLanes) {
      return id_runs_impl<scalar_t, G, L>(a, scale_d, r0, r1);
    }
  }
  const V scale(static_cast<acc_t>(scale_d));
  using Loss = ElementLoss<L, G, V>;
  const Loss base = make_loss<L, G, V, acc_t>(a.alpha, a.gamma, a.beta);
  const AlphaWeights<V> alpha = base.alpha;
  const acc_t eps = static_cast<acc_t>(a.label_smoothing);
  const V t_pos(acc_t(1) - eps / 2), t_neg(eps / 2);

  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  const auto* t_all = static_cast<const scalar_t*>(a.targets);
  const auto* ids = static_cast<const int64_t*>(a.targets);
  const auto* scores = static_cast<const scalar_t*>(a.scores);
  const auto* row_w = static_cast<const scalar_t*>(a.row_weight);
  const auto* elem_w = static_cast<const scalar_t*>(a.elem_weight);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  auto* grad_all = static_cast<scalar_t*>(a.grad);
  // With a tensor alpha, each class's alpha weights of t = 1 (row 0) and t = 0 (row 1).
  const auto* class_alpha = static_cast<const acc_t*>(a.class_alpha);
  using SA = simd::SimdFor<acc_t>;  // loads of the math type, into the same vectors

  // Float targets need no row structure unless weights have one: the block is then cut into flat
  // spans of kFlatSpan elements regardless of rows.
  const bool flat = TK == TargetKind::kFloat && row_w == nullptr && class_alpha == nullptr &&
                    (elem_w == nullptr || a.elem_weight_row_stride == C);
  const int64_t block_len = (r1 - r0) * C;
  const int64_t spans = flat ? (block_len + kFlatSpan - 1) / kFlatSpan : r1 - r0;
  // The sum: each lane of `acc` adds up in acc_t the terms of about kFlatSpan elements at most, then
  // is flushed into a double. One float accumulator over a whole block (16384 elements, 2048 terms
  // per AVX2 lane) lost up to 3e-5 of the sum where large terms came first; a flush costs one
  // horizontal add per row or span.
  const int64_t spans_per_flush = flat ? 1 : std::max<int64_t>(1, kFlatSpan / std::max<int64_t>(C, 1));
  double total = 0;

  V acc(acc_t(0));
  for (int64_t s = 0; s < spans; ++s) {
    if (s > 0 && s % spans_per_flush == 0 && !loss_all) {
      total += static_cast<double>(S::sum(acc));
      acc = V(acc_t(0));
    }
    const int64_t r = r0 + s;  // the row, when spans are rows
    const int64_t off = flat ? r0 * C + s * kFlatSpan : r * C;
    const int64_t span_len = flat ? std::min(kFlatSpan, block_len - s * kFlatSpan) : C;
    int64_t label = -1;
    if constexpr (TK != TargetKind::kFloat) {
      if (ids[r] == a.ignore_index) {
        if (loss_all) std::fill_n(loss_all + off, C, scalar_t(0));
        if (grad_all) std::fill_n(grad_all + off, C, scalar_t(0));
        continue;
      }
      label = ids[r] == a.background_index ? -1 : ids[r];
    }
    // A row weight is folded into the alpha weights: one multiply per row instead of per vector.
    const V row_factor(row_w ? static_cast<acc_t>(row_w[r]) : acc_t(1));
    const AlphaWeights<V> row_alpha = row_w ? alpha.scaled(row_factor) : alpha;
    const Loss loss{base.p, row_alpha};
    // The positive's target with class ids and scores (only read for a positive row).
    V score(acc_t(1));
    if constexpr (TK == TargetKind::kClassIdScore) {
      if (label >= 0) score = V(static_cast<acc_t>(scores[r]));
    }
    const scalar_t* ew = elem_w ? elem_w + (flat ? off : r * a.elem_weight_row_stride) : nullptr;
    // What multiplies the loss (written out with reduction "none", else summed) and the gradient:
    // the scale, and for a class-id vector without a positive lane also alpha's negative weight,
    // which that vector's math (ElementLoss::negative) leaves out.
    const V loss_w = loss_all ? scale : V(acc_t(1));
    const V grad_w = scale;
    const V neg_loss_w = loss_w * row_alpha.neg;
    const V neg_grad_w = grad_w * row_alpha.neg;

    // Weights, output and sum of the loss and gradient of elements [c, c + n), n <= kLanes.
    const auto finish = [&](int64_t c, int64_t n, LossAndGrad<V> out, const V& lw, const V& gw)
                            FOCAL_ALWAYS_INLINE {
      if (ew) {
        const V w = S::load(ew + c, n);
        out.loss = out.loss * w;
        out.grad = out.grad * w;
      }
      if (loss_all) {
        S::store(loss_all + off + c, n, out.loss * lw);
      } else {
        acc = O::fmadd(n == kLanes ? out.loss : S::zero_unless(S::first(n), out.loss), lw, acc);
      }
      if (grad_all) S::store(grad_all + off + c, n, out.grad * gw);
    };

    // Elements [c, c + n) of this span, n <= kLanes.
    const auto step = [&](int64_t c, int64_t n) FOCAL_ALWAYS_INLINE {
      const V x = S::load(x_all + off + c, n);
      LossAndGrad<V> out;
      V lw = loss_w, gw = grad_w;
      // This vector's alpha weights: the row's, or with a tensor alpha its classes' (times the
      // row's weight).
      Loss vec_loss = loss;
      V vec_neg_loss_w = neg_loss_w, vec_neg_grad_w = neg_grad_w;
      if (class_alpha != nullptr) {
        vec_loss.alpha = {SA::load(class_alpha + c, n) * row_factor, SA::load(class_alpha + C + c, n) * row_factor};
        vec_neg_loss_w = loss_w * vec_loss.alpha.neg;
        vec_neg_grad_w = grad_w * vec_loss.alpha.neg;
      }
      if constexpr (TK == TargetKind::kFloat) {
        V t = S::load(t_all + off + c, n);
        if (eps != acc_t(0)) t = O::fmadd(t, V(acc_t(1) - eps), V(eps / 2));
        out = vec_loss.soft(x, t);
      } else if constexpr (TK == TargetKind::kClassId || TK == TargetKind::kClassIdScore) {
        const int64_t positive_lane = label - c;
        if (static_cast<uint64_t>(positive_lane) >= static_cast<uint64_t>(kLanes)) {
          out = vec_loss.negative(x);  // every lane a negative: most vectors of a batch
          lw = vec_neg_loss_w;
          gw = vec_neg_grad_w;
        } else if constexpr (TK == TargetKind::kClassId) {
          out = vec_loss.binary(x, S::lane(positive_lane));
        } else {
          out = vec_loss.soft(x, O::select(S::lane(positive_lane), score, V(acc_t(0))));
        }
      } else {
        const auto positive = S::lane(label - c);
        out = vec_loss.soft(x, O::select(positive, t_pos, t_neg));
      }
      finish(c, n, out, lw, gw);
    };

    // Two vectors at a time, as one simd::Pair, where both take the same math: float targets, and
    // class-id vectors that hold negatives only. Each is then finished as step() would.
    using P = simd::Pair<V>;
    const auto load_pair = [&](const scalar_t* p) FOCAL_ALWAYS_INLINE {
      return P{S::load(p, kLanes), S::load(p + kLanes, kLanes)};
    };
    const auto finish_pair = [&](int64_t c, const LossAndGrad<P>& out, const V& lw, const V& gw)
                                 FOCAL_ALWAYS_INLINE {
      finish(c, kLanes, {out.loss.lo, out.grad.lo}, lw, gw);
      finish(c + kLanes, kLanes, {out.loss.hi, out.grad.hi}, lw, gw);
    };
    const ElementLoss<L, G, P> pair_loss = simd::paired(loss);
    // (With a tensor alpha, every vector has weights of its own: one at a time.)
    int64_t c = 0;
    const int64_t pair_len = class_alpha == nullptr ? span_len : 0;
    if constexpr (TK == TargetKind::kClassId || TK == TargetKind::kClassIdScore) {
      for (; c + 2 * kLanes <= pair_len; c += 2 * kLanes) {
        if (static_cast<uint64_t>(label - c) < static_cast<uint64_t>(2 * kLanes)) {
          step(c, kLanes);
          step(c + kLanes, kLanes);
        } else {
          finish_pair(c, pair_loss.negative(load_pair(x_all + off + c)), neg_loss_w, neg_grad_w);
        }
      }
    } else if constexpr (TK == TargetKind::kFloat) {
      for (; c + 2 * kLanes <= pair_len; c += 2 * kLanes) {
        P t = load_pair(t_all + off + c);
        if (eps != acc_t(0)) t = Ops<P>::fmadd(t, P(acc_t(1) - eps), P(eps / 2));
        finish_pair(c, pair_loss.soft(load_pair(x_all + off + c), t), loss_w, grad_w);
      }
    }
    for (; c + kLanes <= span_len; c += kLanes) step(c, kLanes);
    if (c < span_len) step(c, span_len - c);
  }
  return total + static_cast<double>(S::sum(acc));
}

// Rows of the focal loss's target forms (float targets, class ids, class ids with label smoothing)
// for the loss L: the focal loss's and FL*'s.
template <typename scalar_t, GammaKind G, LossKind L>
double hard_target_rows(const KernelArgs& a, double scale, int64_t r0, int64_t r1) {
  switch (a.target_kind) {
    case TargetKind::kClassId:
      return rows_impl<scalar_t, TargetKind::kClassId, G, L>(a, scale, r0, r1);
    case TargetKind::kClassIdSmoothed:
      return rows_impl<scalar_t, TargetKind::kClassIdSmoothed, G, L>(a, scale, r0, r1);
    case TargetKind::kFloat:
      return rows_impl<scalar_t, TargetKind::kFloat, G, L>(a, scale, r0, r1);
    default:
      TORCH_CHECK(false, "this loss takes float targets or class ids, without scores");
  }
}

// Calls f(scalar_t{}) with a value of the logits' dtype.
template <typename F>
double with_dtype(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Double: return f(double{});
    case c10::ScalarType::BFloat16: return f(c10::BFloat16{});
    case c10::ScalarType::Half: return f(c10::Half{});
    default: return f(float{});
  }
}

}  // namespace focal::cpu::CPU_CAPABILITY
