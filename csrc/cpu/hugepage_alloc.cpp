// Huge-page buffers for the CPU op's outputs, and the few freed ones kept for reuse.
//
// Why a cache at all: a training step asks for a gradient buffer of the same shape every iteration,
// and a reused buffer has no page to fault in. Why so small: every buffer kept is memory the process
// holds for nothing. Detection training with varying image sizes asks for a new size almost every
// step; keeping all freed sizes grew such a process by a gigabyte. So at most two buffers are kept
// (the gradient of one shape, plus the loss of that shape with reduction "none", or two shapes in
// flight together), a request that none of them fits releases them, and empty_cache() releases
// them on demand.
#include "hugepage_alloc.h"

#include <cstdint>
#include <mutex>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace focal::cpu {

namespace {

#if defined(__linux__) && defined(MADV_HUGEPAGE)

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(4) << 20;  // below this the default allocator is as good
constexpr size_t kMaxCached = 2;

struct Block {
  void* ptr;
  size_t bytes;
};

// A mapping of its own rather than malloc: munmap hands the memory back at once, whereas glibc
// raises its mmap threshold after such a free and keeps later buffers of that size in its heap.
void* map_huge(size_t bytes) {
  // mmap aligns to 4 KB only: map one huge page more, then unmap the unaligned head and the rest.
  const size_t span = bytes + kHugePage;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = aligned + bytes;
  if (start + span > end) munmap(reinterpret_cast<void*>(end), start + span - end);
  madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);  // advisory: a failure is harmless
  return reinterpret_cast<void*>(aligned);
}

void unmap(const Block& b) { munmap(b.ptr, b.bytes); }

class BufferCache {
 public:
  // A cached buffer of exactly `bytes`, or nullptr. A miss means the shape changed: the cached
  // buffers are released before the caller maps a new one, so the old and the new never add up.
  void* take(size_t bytes) {
    std::vector<Block> stale;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].bytes == bytes) {
          void* ptr = free_[i].ptr;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          return ptr;
        }
      }
      stale.swap(free_);
    }
    for (const Block& b : stale) unmap(b);
    return nullptr;
  }

  // Keeps a freed buffer; beyond kMaxCached, the one freed longest ago is released.
  void give(void* ptr, size_t bytes) {
    Block evicted{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back({ptr, bytes});
      if (free_.size() > kMaxCached) {
        evicted = free_.front();
        free_.erase(free_.begin());
      }
    }
    if (evicted.ptr != nullptr) unmap(evicted);
  }

  void clear() {
    std::vector<Block> stale;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stale.swap(free_);
    }
    for (const Block& b : stale) unmap(b);
  }

 private:
  std::mutex mutex_;
  std::vector<Block> free_;  // oldest first
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
BufferCache& cache() {
  static auto* instance = new BufferCache();
  return *instance;
}

#endif  // __linux__ && MADV_HUGEPAGE

}  // namespace

at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes >= kMinBytes) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = cache().take(rounded);
    if (ptr == nullptr) ptr = map_huge(rounded);
    if (ptr != nullptr) {
      return at::from_blob(
          ptr, sizes, [rounded](void* p) { cache().give(p, rounded); }, options);
    }
  }
#endif
  // Small buffers, other systems, and a failed mapping (at::empty then reports the lack of memory).
  return at::empty(sizes, options);
}

void empty_cache() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  cache().clear();
#endif
}

// Declared here rather than with the loss's schemas: the operator exists only for this cache, has
// no tensor argument, and so one catch-all kernel serves every backend.
TORCH_LIBRARY_FRAGMENT(focal, m) { m.def("empty_cache() -> ()", &empty_cache); }

}  // namespace focal::cpu
