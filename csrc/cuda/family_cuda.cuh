// Launches of the loss kernels (focal_kernels.cuh) for FL*, QFL and VFL, compiled in their own
// file (family_cuda.cu) so that the focal loss's kernels and theirs compile in parallel.
#pragma once

#include <c10/core/ScalarType.h>

#include "../kernel_args.h"
#include "focal_kernels.cuh"
#include "host_runtime.cuh"

namespace focal::cuda {

// Launches focal_kernel for args.loss_kind (not kFocal) over `blocks` blocks. `block_sums` (the
// dtype's math type, or nullptr) receives the per-block sums of a reduced loss.
void launch_family_kernel(const KernelArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                          bool aligned, const ScaleArgs& s, void* block_sums, int blocks,
                          rt::Stream stream);

// Launches focal_ids_kernel for QFL or VFL with class ids and scores (focal_cuda.cu says when) in
// the default launch shape (float64's own for float64 data) over `blocks` blocks; `tile_sums`
// receives the per-tile sums.
void launch_family_ids_kernel(const KernelArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                              RowWalk walk, const ScaleArgs& s, void* tile_sums, int blocks,
                              rt::Stream stream);

}  // namespace focal::cuda
