// Large CPU buffers backed by transparent huge pages.
#pragma once

#include <ATen/core/Tensor.h>

namespace focal::cpu {

// Like at::empty(sizes, options) on the CPU, but buffers of a few MB and more are 2 MB aligned and
// advised as huge pages (MADV_HUGEPAGE), so their first write costs a handful of page faults
// instead of one per 4 KB page.
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace focal::cpu
