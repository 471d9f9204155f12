// The vectorised CPU kernel. setup.py compiles this file once per instruction set, each time with
// that set's compiler flags and CPU_CAPABILITY defined (DEFAULT, AVX2, AVX512), so that ATen's
// Vectorized<T> maps onto real SIMD registers; focal_cpu.cpp picks a copy at run time.
// This translation unit deliberately includes nothing but the vector headers and our own math.
#include <algorithm>

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "focal_kernel.h"
#include "vec_ops.h"

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must name the instruction set this file is compiled for"
#endif

namespace focal::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Loads and stores of `scalar_t` as one vector of its math type: bfloat16 and half take half a
// vector of their own and widen it to float (one float vector at a time keeps register pressure
// and row tails as for float).
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static constexpr int kVecs = 1;
  static constexpr int64_t kStep = Vec::size();

  static inline void load(const scalar_t* p, int64_t n, Vec (&out)[kVecs]) {
    if constexpr (kReduced) {
      if (n == kStep) {
        at::vec::load_to_float<scalar_t>(p, out[0]);
      } else {
        out[0] = std::get<0>(at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, n)));
      }
    } else {
      out[0] = n == kStep ? Vec::loadu(p) : Vec::loadu(p, n);
    }
  }

  static inline void store(scalar_t* p, int64_t n, const Vec (&v)[kVecs]) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[0]).store(p, n);
    } else {
      v[0].store(p, n);
    }
  }
};

template <typename scalar_t, TargetKind TK, GammaKind G>
double rows_impl(const FocalArgs& a, double scale_d, int64_t r0, int64_t r1) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using O = Ops<Vec>;
  constexpr int K = IO::kVecs;
  constexpr int64_t kStep = IO::kStep;
  constexpr int64_t kLanes = Vec::size();

  const int64_t C = a.cols;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const Vec gamma(static_cast<acc_t>(a.gamma));
  const AlphaWeights<Vec> alpha = make_alpha<Vec, acc_t>(a.alpha);
  const acc_t eps = static_cast<acc_t>(a.label_smoothing);
  const Vec t_pos(acc_t(1) - eps / 2), t_neg(eps / 2);
  const Vec lane = Vec::arange(acc_t(0), acc_t(1));

  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  const auto* t_all = static_cast<const scalar_t*>(a.targets);
  const auto* ids = static_cast<const int64_t*>(a.targets);
  const auto* row_w = static_cast<const scalar_t*>(a.row_weight);
  const auto* elem_w = static_cast<const scalar_t*>(a.elem_weight);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  auto* grad_all = static_cast<scalar_t*>(a.grad);

  // Float targets need no row structure unless weights have one: the block is then one flat span.
  const bool flat = TK == TargetKind::kFloat && row_w == nullptr &&
                    (elem_w == nullptr || a.elem_weight_row_stride == C);
  const int64_t spans = flat ? 1 : r1 - r0;
  const int64_t span_len = flat ? (r1 - r0) * C : C;

  Vec acc(acc_t(0));
  for (int64_t s = 0; s < spans; ++s) {
    const int64_t r = r0 + s;
    const int64_t off = r * C;
    acc_t label = -1;
    if constexpr (TK != TargetKind::kFloat) {
      if (ids[r] == a.ignore_index) {
        if (loss_all) std::fill_n(loss_all + off, C, scalar_t(0));
        if (grad_all) std::fill_n(grad_all + off, C, scalar_t(0));
        continue;
      }
      label = static_cast<acc_t>(ids[r]);
    }
    // A row weight is folded into the alpha weights: one multiply per row instead of per vector.
    const AlphaWeights<Vec> row_alpha =
        row_w ? alpha.scaled(Vec(static_cast<acc_t>(row_w[r]))) : alpha;
    const scalar_t* ew = elem_w ? elem_w + r * a.elem_weight_row_stride : nullptr;

    for (int64_t c = 0; c < span_len; c += kStep) {
      const int64_t n = std::min(kStep, span_len - c);
      Vec x[K], t[K], w[K], loss[K], grad[K];
      IO::load(x_all + off + c, n, x);
      if constexpr (TK == TargetKind::kFloat) IO::load(t_all + off + c, n, t);
      if (ew) IO::load(ew + c, n, w);
      for (int k = 0; k < K; ++k) {
        if (k * kLanes >= n) {  // a half-width tail of bfloat16 / half rows: skip the empty half
          loss[k] = grad[k] = Vec(acc_t(0));
          continue;
        }
        LossAndGrad<Vec> r_;
        if constexpr (TK == TargetKind::kFloat) {
          const Vec tk = eps != acc_t(0) ? t[k] * Vec(acc_t(1) - eps) + Vec(eps / 2) : t[k];
          r_ = focal_target<G>(x[k], tk, gamma, row_alpha);
        } else {
          const auto pos = lane == Vec(label - static_cast<acc_t>(c + k * kLanes));
          if constexpr (TK == TargetKind::kClassId) {
            r_ = focal_binary<G>(x[k], pos, gamma, row_alpha);
          } else {
            r_ = focal_target<G>(x[k], O::select(pos, t_pos, t_neg), gamma, row_alpha);
          }
        }
        loss[k] = ew ? r_.loss * w[k] : r_.loss;
        grad[k] = (ew ? r_.grad * w[k] : r_.grad) * Vec(scale);
      }
      if (loss_all) {
        for (int k = 0; k < K; ++k) loss[k] = loss[k] * Vec(scale);
        IO::store(loss_all + off + c, n, loss);
      } else if (n == kStep) {
        for (int k = 0; k < K; ++k) acc = acc + loss[k];
      } else {
        for (int k = 0; k < K; ++k) {
          const auto valid = lane < Vec(static_cast<acc_t>(n - k * kLanes));
          acc = acc + O::select(valid, loss[k], Vec(acc_t(0)));
        }
      }
      if (grad_all) IO::store(grad_all + off + c, n, grad);
    }
  }
  alignas(64) acc_t lanes[kLanes];
  acc.store(lanes);
  double total = 0;
  for (int64_t i = 0; i < kLanes; ++i) total += lanes[i];
  return total;
}

template <typename scalar_t, TargetKind TK>
double dispatch_gamma(const FocalArgs& a, GammaKind g, double scale, int64_t r0, int64_t r1) {
  switch (g) {
    case GammaKind::kZero: return rows_impl<scalar_t, TK, GammaKind::kZero>(a, scale, r0, r1);
    case GammaKind::kOne: return rows_impl<scalar_t, TK, GammaKind::kOne>(a, scale, r0, r1);
    case GammaKind::kTwo: return rows_impl<scalar_t, TK, GammaKind::kTwo>(a, scale, r0, r1);
    default: return rows_impl<scalar_t, TK, GammaKind::kGeneral>(a, scale, r0, r1);
  }
}

template <typename scalar_t>
double dispatch_target(const FocalArgs& a, GammaKind g, double scale, int64_t r0, int64_t r1) {
  switch (a.target_kind) {
    case TargetKind::kClassId: return dispatch_gamma<scalar_t, TargetKind::kClassId>(a, g, scale, r0, r1);
    case TargetKind::kClassIdSmoothed:
      return dispatch_gamma<scalar_t, TargetKind::kClassIdSmoothed>(a, g, scale, r0, r1);
    default: return dispatch_gamma<scalar_t, TargetKind::kFloat>(a, g, scale, r0, r1);
  }
}

}  // namespace

double focal_rows(const FocalArgs& args, c10::ScalarType dtype, GammaKind gamma_kind, double scale,
                  int64_t row_begin, int64_t row_end) {
  switch (dtype) {
    case c10::ScalarType::Double:
      return dispatch_target<double>(args, gamma_kind, scale, row_begin, row_end);
    case c10::ScalarType::BFloat16:
      return dispatch_target<c10::BFloat16>(args, gamma_kind, scale, row_begin, row_end);
    case c10::ScalarType::Half:
      return dispatch_target<c10::Half>(args, gamma_kind, scale, row_begin, row_end);
    default:
      return dispatch_target<float>(args, gamma_kind, scale, row_begin, row_end);
  }
}

}  // namespace focal::cpu::CPU_CAPABILITY
