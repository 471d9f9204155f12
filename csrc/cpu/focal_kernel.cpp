// The vectorised CPU kernel of the focal loss. setup.py compiles this file once per instruction set,
// each time with that set's compiler flags and CPU_CAPABILITY defined (DEFAULT, AVX2, AVX512), so
// that the vector types of vec/simd.h map onto real SIMD registers; focal_cpu.cpp picks a copy at
// run time. The loop itself is rows.h, shared with the other losses of the family
// (family_kernel.cpp). This translation unit deliberately includes nothing but the vector headers,
// c10's checks and our own math.
#include <c10/util/Exception.h>

#include "focal_kernel.h"
#include "rows.h"

namespace focal::cpu::CPU_CAPABILITY {

double focal_rows(const KernelArgs& a, c10::ScalarType dtype, GammaKind gamma_kind, double scale,
                  int64_t r0, int64_t r1) {
  return with_dtype(dtype, [&](auto value) {
    using scalar_t = decltype(value);
    return with_gamma_kind(gamma_kind, [&](auto g) {
      constexpr GammaKind G = decltype(g)::value;
      constexpr LossKind L = LossKind::kFocal;
      switch (a.target_kind) {
        case TargetKind::kClassId:
          return rows_impl<scalar_t, TargetKind::kClassId, G, L>(a, scale, r0, r1);
        case TargetKind::kClassIdSmoothed:
          return rows_impl<scalar_t, TargetKind::kClassIdSmoothed, G, L>(a, scale, r0, r1);
        case TargetKind::kFloat:
          return rows_impl<scalar_t, TargetKind::kFloat, G, L>(a, scale, r0, r1);
        default:
          TORCH_CHECK(false, "the focal loss takes no scores");
      }
    });
  });
}

}  // namespace focal::cpu::CPU_CAPABILITY
