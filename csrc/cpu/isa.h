// Which copy of the CPU kernels runs here (setup.py compiles one per instruction set).
#pragma once

#include <string>

#include <ATen/Version.h>
#include <c10/util/Exception.h>

namespace focal::cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "AVX512" : isa == Isa::kAvx2 ? "AVX2" : "DEFAULT";
}

// ATen's CPU capability (so ATEN_CPU_CAPABILITY=default|avx2|avx512 selects our copy too), capped
// at the best copy compiled. A build for one machine (FOCAL_CPU_ISAS=native) may have no DEFAULT
// copy; a CPU below its instruction set is refused here rather than run into an illegal instruction
// (focal's Python entry refuses it first, with the rebuild command: _extension.cpu_kernel_error).
inline Isa isa_for_this_cpu() {
  const std::string capability = at::get_cpu_capability();
#if defined(FOCAL_HAVE_AVX512)
  if (capability == "AVX512") return Isa::kAvx512;
#endif
#if defined(FOCAL_HAVE_AVX2)
  if (capability == "AVX512" || capability == "AVX2") return Isa::kAvx2;
#endif
#if !defined(FOCAL_HAVE_DEFAULT)
  TORCH_CHECK(false, "focal's CPU kernels were compiled for one machine's instruction set only "
              "(FOCAL_CPU_ISAS=native), which this CPU (ATen capability ", capability,
              ") cannot run: rebuild focal without FOCAL_CPU_ISAS");
#endif
  return Isa::kDefault;
}

}  // namespace focal::cpu
