// Launches of the loss kernels (focal_kernels.cuh) for FL*, QFL and VFL, compiled in their own
// file (family_cuda.cu) so that the focal loss's kernels and theirs compile in parallel.
#pragma once

#include <c10/core/ScalarType.h>

#include "../kernel_args.h"
#include "focal_kernels.cuh"
#include "host_runtime.cuh"

namespace focal::cuda {

// Launches the kernel of args.loss_kind (not kFocal) over `blocks` blocks: focal_ids_kernel when
// `ids_kernel` (QFL / VFL, class ids and scores, see focal_cuda.cu), else focal_kernel. `block_sums`
// (the dtype's math type, or nullptr) receives the per-block sums of a reduced loss.
void launch_family_kernel(const KernelArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                          bool ids_kernel, bool aligned, const ScaleArgs& s, void* block_sums,
                          int blocks, rt::Stream stream);

}  // namespace focal::cuda
