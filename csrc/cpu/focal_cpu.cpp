// CPU backend: class-id validation, output allocation and the parallel loop. The per-row work runs
// in focal_kernel.cpp, compiled once per instruction set; this file picks the copy.
#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../focal_ops.h"
#include "../loss_ops.h"
#include "focal_kernel.h"
#include "hugepage_alloc.h"
#include "isa.h"

namespace focal::cpu {
namespace {

// Elements per parallel work item. Work items are fixed by the shape alone, and their partial sums
// are added in order, so a reduced loss is bitwise identical for any number of threads.
constexpr int64_t kBlockElements = 16384;

// Index 0: the focal loss's kernel, 1: the other losses'.
const std::array<RowsFn, 2>& kernels_for_this_cpu() {
  static const std::array<RowsFn, 2> kernels = []() -> std::array<RowsFn, 2> {
    switch (isa_for_this_cpu()) {
#if defined(FOCAL_HAVE_AVX512)
      case Isa::kAvx512: return {&AVX512::focal_rows, &AVX512::family_rows};
#endif
#if defined(FOCAL_HAVE_AVX2)
      case Isa::kAvx2: return {&AVX2::focal_rows, &AVX2::family_rows};
#endif
#if defined(FOCAL_HAVE_DEFAULT)
      default: return {&DEFAULT::focal_rows, &DEFAULT::family_rows};
#else
      default: TORCH_INTERNAL_ASSERT(false, "isa_for_this_cpu() picked a copy that was not compiled");
#endif
    }
  }();
  return kernels;
}

RowsFn select_kernel(LossKind loss) { return kernels_for_this_cpu()[loss == LossKind::kFocal ? 0 : 1]; }

// Checks every class id and counts the rows that are not ignored.
int64_t count_kept_rows(const FocalCall& call) {
  const int64_t* ids = call.targets.const_data_ptr<int64_t>();
  const int64_t cols = call.cols();
  int64_t kept = 0;
  for (int64_t r = 0; r < call.rows(); ++r) {
    const int64_t id = ids[r];
    if (id == call.ignore_index) continue;
    TORCH_CHECK_VALUE((id >= 0 && id < cols) || id == call.background_index, "class id ", id, " at row ", r,
                      " is out of range: expected a class in [0, ", cols, "), background_index (",
                      call.background_index, ") or ignore_index (", call.ignore_index, ")");
    ++kept;
  }
  return kept;
}

// Loss and gradient of any elementwise loss of the family, from checked arguments.
std::tuple<at::Tensor, at::Tensor> run(const FocalCall& call) {
  const at::Tensor& logits = call.logits;
  const bool compute_grad = call.compute_grad;
  const int64_t rows = call.rows(), cols = call.cols();

  const int64_t kept_rows = call.class_ids() ? count_kept_rows(call) : rows;
  double total_scale = call.host_scale();
  if (call.reduction == Reduction::kMean) {
    // Class ids: at least one element in the denominator, so a batch of ignored rows contributes 0.
    // Float targets: as torch.mean, the mean of no elements is NaN.
    const int64_t kept = kept_rows * cols;
    total_scale /= static_cast<double>(call.class_ids() ? std::max<int64_t>(kept, 1) : kept);
  }

  const auto options = logits.options();
  const at::Tensor grad = compute_grad ? empty_huge(logits.sizes(), options) : at::empty({0}, options);
  at::Tensor loss;
  if (call.reduction == Reduction::kNone) loss = empty_huge(logits.sizes(), options);
  const KernelArgs args = call.kernel_args(loss, compute_grad ? grad : at::Tensor());

  const int64_t block_rows = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(cols, 1));
  const int64_t blocks = rows == 0 || cols == 0 ? 0 : (rows + block_rows - 1) / block_rows;
  std::vector<double> partial(blocks, 0.0);
  const RowsFn kernel = select_kernel(call.loss_kind);
  const GammaKind gamma_kind = call.gamma_kind();
  const auto dtype = logits.scalar_type();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block_rows, r1 = std::min(rows, r0 + block_rows);
      partial[b] = kernel(args, dtype, gamma_kind, total_scale, r0, r1);
    }
  });

  if (call.reduction != Reduction::kNone) {
    double sum = 0;
    for (const double p : partial) sum += p;
    const double value =
        call.reduction == Reduction::kMean && rows * cols == 0 ? call.empty_mean() : sum * total_scale;
    loss = reduced_loss_tensor(value, options.dtype(call.reduced_dtype()));
  }
  return {loss, grad};
}

void scale_grad_cpu(const at::Tensor& grad, const at::Tensor& grad_output) {
  if (!check_scale_grad(grad, grad_output)) {
    grad.mul_(grad_output);
    return;
  }
  // One value broadcast over grad: read on the host (free for a CPU tensor), and 1 needs no pass.
  const at::Scalar value = grad_output.reshape(-1)[0].item();
  if (value.toDouble() != 1.0) grad.mul_(value);
}

}  // namespace

TORCH_LIBRARY_IMPL(focal, CPU, m) {
  LossOps<&run>::register_on(m);
  m.impl("scale_grad_", &scale_grad_cpu);
}

}  // namespace focal::cpu
