// The vectorised CPU kernel of the focal loss. setup.py compiles this file once per instruction set,
// each time with that set's compiler flags and CPU_CAPABILITY defined (DEFAULT, AVX2, AVX512), so
// that the vector types of vec/simd.h map onto real SIMD registers; focal_cpu.cpp picks a copy at
// run time. The loop itself is rows.h, shared with the other losses of the family
// (family_kernel.cpp). This translation unit deliberately includes nothing but the vector headers,
// c10's checks and our own math.
#include "focal_kernel.h"
#include "rows.h"

namespace focal::cpu::CPU_CAPABILITY {

double focal_rows(const KernelArgs& a, c10::ScalarType dtype, GammaKind gamma_kind, double scale,
                  int64_t r0, int64_t r1) {
  return with_dtype(dtype, [&](auto value) {
    using scalar_t = decltype(value);
    return with_gamma_kind(gamma_kind, [&](auto g) {
      return hard_target_rows<scalar_t, decltype(g)::value, LossKind::kFocal>(a, scale, r0, r1);
    });
  });
}

}  // namespace focal::cpu::CPU_CAPABILITY
