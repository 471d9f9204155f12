#include "hugepage_alloc.h"

#include <cstdlib>
#include <mutex>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace focal::cpu {

namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(4) << 20;     // below this the default allocator is as good
constexpr size_t kCacheBytes = size_t(1) << 30;   // freed buffers kept for reuse, at most

// Freed buffers, reused by the next request of the same size: a training step allocates the same
// gradient buffer every iteration, and a reused one has no page to fault in.
class BufferCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < free_.size(); ++i) {
      if (free_[i].bytes == bytes) {
        void* ptr = free_[i].ptr;
        free_[i] = free_.back();
        free_.pop_back();
        cached_bytes_ -= bytes;
        return ptr;
      }
    }
    return nullptr;
  }

  void give(void* ptr, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= kCacheBytes) {
        free_.push_back({ptr, bytes});
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(ptr);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  std::mutex mutex_;
  std::vector<Block> free_;
  size_t cached_bytes_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
BufferCache& cache() {
  static auto* instance = new BufferCache();
  return *instance;
}

}  // namespace

at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  size_t numel = 1;
  for (const auto s : sizes) numel *= static_cast<size_t>(s);
  const size_t bytes = numel * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes >= kMinBytes) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = cache().take(rounded);
    if (ptr == nullptr && posix_memalign(&ptr, kHugePage, rounded) == 0) {
      madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: ignoring a failure is correct
    }
    if (ptr != nullptr) {
      return at::from_blob(
          ptr, sizes, [rounded](void* p) { cache().give(p, rounded); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace focal::cpu
