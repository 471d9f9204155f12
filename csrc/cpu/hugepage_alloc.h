// Large CPU buffers backed by transparent huge pages.
#pragma once

#include <ATen/core/Tensor.h>

namespace focal::cpu {

// Like at::empty(sizes, options) on the CPU, but buffers of a few MB and more are 2 MB aligned and
// advised as huge pages (MADV_HUGEPAGE), so their first write costs a handful of page faults
// instead of one per 4 KB page, and freed ones are kept (up to 1 GiB) for the next request of the
// same size, which then costs no page fault at all.
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace focal::cpu
