// Runs csrc/cuda's focal_kernel (float32 logits and targets, gamma 2, loss and gradient written
// out, block sums) on the emulation, over buffers allocated to their exact size: once 16-byte
// aligned and once at a 4-byte offset. The program of the test that checks that the sanitizers
// catch a broken kernel (tests/test_cuda_emulated.py): built as is it must run clean; with
// -DFOCAL_EMU_BREAK_TAIL AddressSanitizer must report the overflow of the last, partial pack; with
// -DFOCAL_EMU_BREAK_ALIGN UBSan must report a misaligned 128-bit access. No torch library is
// involved, so it builds fast.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <new>

#include "focal_kernels.cuh"

namespace {

using focal::KernelArgs;
using focal::TargetKind;

// `count` floats starting `offset` floats past a 16-byte boundary; the allocation ends exactly at
// the last of them.
struct Buffer {
  Buffer(int64_t count, int offset) {
    const size_t bytes = (count + offset) * sizeof(float);
    base = static_cast<float*>(::operator new[](bytes, std::align_val_t(16)));
    data = base + offset;
  }
  ~Buffer() { ::operator delete[](base, std::align_val_t(16)); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* base;
  float* data;
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Returns the block sums' total, which must be finite.
double run(int offset) {
  constexpr int64_t rows = 7, cols = 5, n = rows * cols;  // 35 = 8 packs of 4 and 3 more
  Buffer x(n, offset), t(n, offset), loss(n, offset), grad(n, offset), sums(1, 0);
  for (int64_t i = 0; i < n; ++i) {
    x.data[i] = 0.25f * static_cast<float>(i % 11) - 1.0f;
    t.data[i] = static_cast<float>(i % 3 == 0);
  }
  KernelArgs a;
  a.rows = rows;
  a.cols = cols;
  a.logits = x.data;
  a.targets = t.data;
  a.loss = loss.data;
  a.grad = grad.data;
  a.target_kind = TargetKind::kFloat;
  const bool aligned = aligned16(x.data) && aligned16(t.data) && aligned16(loss.data) &&
                       aligned16(grad.data);
  using focal::GammaKind, focal::LossKind;
  focal_emu::launch(&focal::cuda::focal_kernel<float, TargetKind::kFloat, GammaKind::kTwo, LossKind::kFocal>,
                    dim3(1), dim3(focal::cuda::kThreads), a, aligned, focal::cuda::ScaleArgs{},
                    sums.data);
  return sums.data[0];
}

}  // namespace

int main() {
  for (const int offset : {0, 1}) {
    const double total = run(offset);
    std::printf("offset %d: block sum %.9g\n", offset, total);
    if (!std::isfinite(total) || total <= 0) return 1;
  }
  return 0;
}
