// Which copy of the CPU kernels runs here (setup.py compiles one per instruction set).
#pragma once

#include <string>

#include <ATen/Version.h>

namespace focal::cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

// ATen's CPU capability (so ATEN_CPU_CAPABILITY=default|avx2|avx512 selects our copy too), capped
// at the best copy compiled.
inline Isa isa_for_this_cpu() {
  const std::string capability = at::get_cpu_capability();
#if defined(FOCAL_HAVE_AVX512)
  if (capability == "AVX512") return Isa::kAvx512;
#endif
#if defined(FOCAL_HAVE_AVX2)
  if (capability == "AVX512" || capability == "AVX2") return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "AVX512" : isa == Isa::kAvx2 ? "AVX2" : "DEFAULT";
}

}  // namespace focal::cpu
