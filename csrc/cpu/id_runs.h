// The CPU kernel's loop for class-id targets, over runs of rows rather than row by row: included by
// rows.h, which sends it the class ids without label smoothing, scores, per-element weights or a
// tensor alpha, in rows of at least one vector.
//
// Row by row, every row of C classes ends in a partial vector (C = 80 or 91: 10 or 11 full
// vectors and a masked one of 0 or 3 lanes, each computed in full) and starts a new pair of
// vectors. But a row without its positive is the same math as the next one: the negatives' loss,
// with the same alpha and row weight. So the rows of a run (consecutive rows that are not ignored
// and share one row weight) are taken as one flat stretch of elements, two vectors at a time across
// row boundaries; only the vector holding a row's positive takes the binary math, and only a run's
// last vector is partial.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../family_math.h"
#include "../kernel_args.h"
#include "focal_kernel.h"
#include "vec/simd.h"

namespace focal::cpu::CPU_CAPABILITY {

// Rows [r0, r1) of `a` (class ids) for the loss L and gamma G: as rows_impl, whose preconditions
// rows.h checks before calling it.
template <typename scalar_t, GammaKind G, LossKind L>
double id_runs_impl(const KernelArgs& a, double scale_d, int64_t r0, int64_t r1) {
  using S = simd::SimdFor<scalar_t>;
  using V = typename S::V;
  using acc_t = typename S::acc_t;
  using O = Ops<V>;
  using P = simd::Pair<V>;
  constexpr int64_t kLanes = S::kLanes;

  const int64_t C = a.cols;
  const V scale(static_cast<acc_t>(scale_d));
  using Loss = ElementLoss<L, G, V>;
  const Loss base = make_loss<L, G, V, acc_t>(a.alpha, a.gamma, a.beta);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  const auto* ids = static_cast<const int64_t*>(a.targets);
  const auto* row_w = static_cast<const scalar_t*>(a.row_weight);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  auto* grad_all = static_cast<scalar_t*>(a.grad);
  const V loss_w = loss_all ? scale : V(acc_t(1));
  const V grad_w = scale;

  double total = 0;
  V acc(acc_t(0));
  int64_t unflushed = 0;  // elements added to acc since its last flush
  const auto flush_if_due = [&]() FOCAL_ALWAYS_INLINE {
    if (unflushed >= kFlatSpan && !loss_all) {
      total += static_cast<double>(S::sum(acc));
      acc = V(acc_t(0));
      unflushed = 0;
    }
  };
  // Weights, output and sum of elements [e, e + n), n <= kLanes (flat indices), as rows_impl's.
  const auto finish = [&](int64_t e, int64_t n, const LossAndGrad<V>& out, const V& lw, const V& gw)
                          FOCAL_ALWAYS_INLINE {
    if (loss_all) {
      S::store(loss_all + e, n, out.loss * lw);
    } else {
      acc = O::fmadd(n == kLanes ? out.loss : S::zero_unless(S::first(n), out.loss), lw, acc);
    }
    if (grad_all) S::store(grad_all + e, n, out.grad * gw);
    unflushed += n;
  };
  // Two rows weigh alike when their weights have the same bits (0 and -0 do not: the sign of a
  // zero gradient would change).
  const auto same_weight = [&](int64_t r, int64_t s) {
    return row_w == nullptr || std::memcmp(row_w + r, row_w + s, sizeof(scalar_t)) == 0;
  };

  int64_t r = r0;
  while (r < r1) {
    if (ids[r] == a.ignore_index) {
      if (loss_all) std::fill_n(loss_all + r * C, C, scalar_t(0));
      if (grad_all) std::fill_n(grad_all + r * C, C, scalar_t(0));
      ++r;
      continue;
    }
    // A run from row `first`: the rows after it that are not ignored and weigh as it does.
    const int64_t first = r;
    const V row_factor(row_w ? static_cast<acc_t>(row_w[first]) : acc_t(1));
    const AlphaWeights<V> alpha = row_w ? base.alpha.scaled(row_factor) : base.alpha;
    const Loss loss{base.p, alpha};
    const ElementLoss<L, G, P> pair_loss = simd::paired(loss);
    // Negatives carry alpha's negative weight in these factors, not in their math.
    const V neg_loss_w = loss_w * alpha.neg;
    const V neg_grad_w = grad_w * alpha.neg;

    int64_t e = first * C;  // the run's elements before e are done
    // Elements [e, end), all negatives: two vectors at a time, then one, then a partial one.
    const auto negatives = [&](int64_t end) FOCAL_ALWAYS_INLINE {
      for (; e + 2 * kLanes <= end; e += 2 * kLanes) {
        const LossAndGrad<P> out =
            pair_loss.negative(P{S::load(x_all + e, kLanes), S::load(x_all + e + kLanes, kLanes)});
        finish(e, kLanes, {out.loss.lo, out.grad.lo}, neg_loss_w, neg_grad_w);
        finish(e + kLanes, kLanes, {out.loss.hi, out.grad.hi}, neg_loss_w, neg_grad_w);
        flush_if_due();
      }
      for (; e < end; e += kLanes) {
        const int64_t n = std::min(kLanes, end - e);
        finish(e, n, loss.negative(S::load(x_all + e, n)), neg_loss_w, neg_grad_w);
      }
      e = end;
      flush_if_due();
    };
    for (; r < r1 && ids[r] != a.ignore_index && same_weight(r, first); ++r) {
      const int64_t id = ids[r];
      if (id == a.background_index || id < 0 || id >= C) continue;  // background (the host refuses other ids)
      // The row's positive, in the vector that starts a whole number of vectors past e; that
      // vector ends at the latest with the row.
      const int64_t positive = r * C + id;
      const int64_t start = e + (positive - e) / kLanes * kLanes;
      negatives(start);
      const int64_t n = std::min(kLanes, (r + 1) * C - start);
      finish(start, n, loss.binary(S::load(x_all + start, n), S::lane(positive - start)), loss_w, grad_w);
      e = start + n;
    }
    negatives(r * C);
  }
  return total + static_cast<double>(S::sum(acc));
}

}  // namespace focal::cpu::CPU_CAPABILITY
