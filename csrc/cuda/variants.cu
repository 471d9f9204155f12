// The per-architecture table of kernel variants and its environment overrides (variants.h).
#include "variants.h"

#include <cstdlib>
#include <string>
#include <string_view>

#include <c10/util/Exception.h>

#include "host_runtime.cuh"

namespace focal::cuda {
namespace {

// The variants per GPU architecture, as `make gpu-tune` measures them: {major, minor, launch shape
// of the roofline kernels, the softmax's thread-per-element kernel's variant (classes per load or
// ring), registers or ring for its row kernels}. An architecture not listed takes 0, 0 and 0.
struct ArchEntry {
  int major, minor;
  int shape;
  int softmax;
  int softmax_rows;
};
constexpr ArchEntry kArchVariants[] = {
    {8, 0, 0, 0, 0},  // A100: not yet measured
    {8, 9, 0, 0, 0},  // L4, RTX 40: not yet measured
    {9, 0, 0, 0, 0},  // H100, H200: not yet measured
};

}  // namespace

ArchVariants arch_variants() {
  const auto [major, minor] = rt::compute_capability();
  for (const ArchEntry& a : kArchVariants) {
    if (a.major == major && a.minor == minor) return {a.shape, a.softmax, a.softmax_rows};
  }
  return {};
}

int variant_index(const VariantFamily& family, int table_value) {
  if (const char* name = std::getenv(family.env); name != nullptr && *name != '\0') {
    std::string known;
    for (int i = 0; i < family.count; ++i) {
      if (std::string_view(name) == family.names[i]) return i;
      known += std::string(i == 0 ? "" : ", ") + family.names[i];
    }
    TORCH_CHECK(false, family.env, "=", name, " is not a variant of focal's CUDA kernels (", known, ")");
  }
  return table_value;
}

int64_t max_blocks(int64_t blocks_per_sm) {
  if (const char* grid = std::getenv("FOCAL_CUDA_GRID"); grid != nullptr && *grid != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(grid, &end, 10);
    TORCH_CHECK(*end == '\0' && v >= 1 && v <= (1 << 30), "FOCAL_CUDA_GRID=", grid,
                " is not a number of blocks >= 1");
    return v;
  }
  return rt::multiprocessor_count() * blocks_per_sm;
}

}  // namespace focal::cuda
