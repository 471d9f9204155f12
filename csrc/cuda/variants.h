// Which compiled variant of the CUDA kernels a launch takes, and on how many blocks: one table per
// GPU architecture (variants.cu), as `make gpu-tune` (benchmarks/gpu_tune.py) measures it, and the
// environment variables that override it for the tuner and the tests. Results never depend on the
// choice (the kernels sum in an order fixed by the data: tile_sums.cuh), only the time does.
#pragma once

#include <cstdint>

namespace focal::cuda {

// The table's entry for the current device's architecture: a variant of each family, by index.
struct ArchVariants {
  int shape = 0;    // the roofline kernels' launch shape (kLaunchShapeNames, focal_kernels.cuh)
  int softmax = 0;  // the softmax's thread-per-element kernel: classes per load or ring (kSoftmaxVariantNames, softmax_kernels.cuh)
  int softmax_rows = 0;  // the softmax's row kernels: registers or ring (kRowVariantNames, ditto)
};
ArchVariants arch_variants();

// A family of variants: the environment variable that names one, and the names by index.
struct VariantFamily {
  const char* env;
  const char* const* names;
  int count;
};

// The variant `family.env` names if it is set (an error for a name not in the family), else
// `table_value`. Read at every call.
int variant_index(const VariantFamily& family, int table_value);

// The most blocks a launch may take: FOCAL_CUDA_GRID if set, else one wave of `blocks_per_sm`.
int64_t max_blocks(int64_t blocks_per_sm);

}  // namespace focal::cuda
