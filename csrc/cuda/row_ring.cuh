// Rows streamed through shared memory by a warp or a block (the softmax focal loss's row kernels'
// "ring" variant, softmax_kernels.cuh): copies that hold no register while in flight (cp.async),
// so that a thread keeps many bytes in flight under a small register cap.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernel_runtime.cuh"
#include "tile_sums.cuh"  // kWarp

namespace focal::cuda {

struct alignas(16) Bytes16 {
  uint32_t w[4];
};

// A run of contiguous rows (a tile's) streamed through kSteps * kThreads * 16 bytes of shared
// memory by kThreads threads (a warp, or a block): from the 16-byte block that holds the run's
// first logit, in steps of kThreads * 16 bytes, each thread's 16 of a step one cp.async (zeros past
// the run's end, which is never read past) and each step its own group of copies. Step k lands in
// slot k mod kSteps. A round (the rows used together) of at most kRoundBytes starts in some step a
// and ends in step a + kSpan at most, so with the steps up to a + kSteps - 1 requested, waiting
// until at most kPending groups are in flight lands all of it, and the slot that step
// a + kSteps - 1 refills held step a - 1, which a barrier before the requests has every thread done
// with. The threads take part in every call alike.
template <int kThreads, int kSteps_, int kSpan_>
struct RowRing {
  static constexpr int kSteps = kSteps_;
  static constexpr int kSpan = kSpan_;                 // steps a round reaches past its first
  static constexpr uint32_t kStepBytes = kThreads * 16;
  static constexpr uint32_t kBytes = kSteps * kStepBytes;
  static constexpr int64_t kRoundBytes = int64_t{kSpan} * kStepBytes;
  static constexpr int kPending = kSteps - 1 - kSpan;  // groups in flight while a round is used
  static_assert((kBytes & (kBytes - 1)) == 0 && kPending >= 1, "a ring of a power of two bytes, ahead of its round");

  Bytes16* slots;              // kSteps * kThreads blocks
  const char* from = nullptr;  // the 16-byte block of the run's first logit
  uint32_t length = 0;         // the run's bytes from `from` (the host keeps the run's under 2^31)
  uint32_t next = 0;           // the step to request next

  __device__ __forceinline__ explicit RowRing(Bytes16* slots_) : slots(slots_) {}

  __device__ __forceinline__ static void sync() {
    if constexpr (kThreads == kWarp) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  }
  // Step `next`'s copy of this thread, if the run has its bytes, and a group either way.
  __device__ __forceinline__ void request() {
    const uint32_t thread = threadIdx.x % kThreads;
    const uint32_t offset = next * kStepBytes + thread * 16u;
    if (offset < length) {
      const uint32_t left = length - offset;
      async_copy_head(&slots[(next % kSteps) * kThreads + thread], from + offset, left < 16u ? left : 16u);
    }
    async_commit();
    ++next;
  }
  // A run's bytes [begin, end) begin to stream; returns how far into the ring's bytes `begin` is.
  __device__ __forceinline__ uint32_t start(const char* begin, const char* end) {
    const auto skew = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(begin) % 16u);
    from = begin - skew;
    length = static_cast<uint32_t>(end - from);
    next = 0;
    sync();  // every thread is done with the last run's slots
#pragma unroll
    for (int k = 0; k < kSteps; ++k) request();
    return skew;
  }
  // The round whose bytes begin `offset` bytes from `from`: later steps requested, its own landed
  // and seen by every thread.
  __device__ __forceinline__ void reach(uint32_t offset) {
    sync();  // every thread is done with the last round's slots
    const uint32_t first = offset / kStepBytes;
#pragma unroll
    for (int k = 0; k < kSpan; ++k) {
      if (next < first + kSteps) request();
    }
    async_wait<kPending>();
    sync();  // every thread's copies seen by every thread
  }
  // The T `offset` bytes from `from` (a requested step that has landed), read where it is called:
  // each pass reads the ring again rather than hold a row in registers.
  template <typename T>
  __device__ __forceinline__ T at(uint32_t offset) const {
    static_assert(sizeof(T) == 2 || sizeof(T) == 4, "the ring holds 16- and 32-bit logits");
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
    const char* p = reinterpret_cast<const char*>(slots) + offset % kBytes;
    Bits bits;
#if defined(FOCAL_CUDA_EMULATION)
    memcpy(&bits, p, sizeof(T));
#else
    bits = *reinterpret_cast<const volatile Bits*>(p);
#endif
    T v;
    memcpy(&v, &bits, sizeof(T));
    return v;
  }
};

// A row's logits in a ring, x[c] for its class c.
template <typename scalar_t, typename Ring>
struct RingRow {
  const Ring* ring;
  uint32_t offset;  // the row's first byte from ring->from
  template <typename Index>
  __device__ __forceinline__ scalar_t operator[](Index c) const {
    return ring->template at<scalar_t>(offset + static_cast<uint32_t>(c) * static_cast<uint32_t>(sizeof(scalar_t)));
  }
};

}  // namespace focal::cuda
