// Large CPU buffers backed by transparent huge pages, with a small cache of freed ones.
#pragma once

#include <ATen/core/Tensor.h>

namespace focal::cpu {

// Like at::empty(sizes, options) on the CPU. A buffer of 4 MB or more gets a mapping of its own,
// 2 MB aligned and advised as huge pages (MADV_HUGEPAGE), so that its first write costs a handful
// of page faults instead of one per 4 KB page. Once freed, it may serve the next request of the same
// size without any page fault; hugepage_alloc.cpp says how few are kept and when they are returned.
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options);

// Returns every cached buffer to the operating system. Registered as the operator
// focal::empty_cache() (torch.ops.focal.empty_cache(), focal.empty_cache() in Python).
void empty_cache();

}  // namespace focal::cpu
