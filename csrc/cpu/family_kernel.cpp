// The vectorised CPU kernels of FL*, the quality focal loss and the varifocal loss: the loop of
// rows.h, compiled once per instruction set like focal_kernel.cpp (a file of its own so that the
// two compile in parallel). Only the target forms each loss takes are instantiated: FL* those of
// the focal loss; QFL and VFL float targets or class ids with scores. FL*'s gamma is a plain factor,
// not an exponent: one instantiation serves every value.
#include <c10/util/Exception.h>

#include "focal_kernel.h"
#include "rows.h"

namespace focal::cpu::CPU_CAPABILITY {
namespace {

template <typename scalar_t, LossKind L, GammaKind G>
double quality_rows(const KernelArgs& a, double scale, int64_t r0, int64_t r1) {
  switch (a.target_kind) {
    case TargetKind::kClassIdScore:
      return rows_impl<scalar_t, TargetKind::kClassIdScore, G, L>(a, scale, r0, r1);
    case TargetKind::kFloat:
      return rows_impl<scalar_t, TargetKind::kFloat, G, L>(a, scale, r0, r1);
    default:
      TORCH_CHECK(false, "the quality losses take float targets or class ids with scores");
  }
}

}  // namespace

double family_rows(const KernelArgs& a, c10::ScalarType dtype, GammaKind gamma_kind, double scale,
                   int64_t r0, int64_t r1) {
  return with_dtype(dtype, [&](auto value) -> double {
    using scalar_t = decltype(value);
    if (a.loss_kind == LossKind::kFocalStar) {
      return hard_target_rows<scalar_t, GammaKind::kGeneral, LossKind::kFocalStar>(a, scale, r0, r1);
    }
    return with_gamma_kind(gamma_kind, [&](auto g) -> double {
      constexpr GammaKind G = decltype(g)::value;
      if (a.loss_kind == LossKind::kQuality) {
        return quality_rows<scalar_t, LossKind::kQuality, G>(a, scale, r0, r1);
      }
      TORCH_CHECK(a.loss_kind == LossKind::kVarifocal, "family_rows: not a loss of the family");
      return quality_rows<scalar_t, LossKind::kVarifocal, G>(a, scale, r0, r1);
    });
  });
}

}  // namespace focal::cpu::CPU_CAPABILITY
