// CPU backend of softmax_focal_loss: class-id validation and the "mean" denominator, outputs, and
// the parallel loop over fixed work items. The per-element work runs in softmax_kernel.cpp,
// compiled once per instruction set; this file picks the copy.
#include <algorithm>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../softmax_ops.h"
#include "hugepage_alloc.h"
#include "isa.h"
#include "softmax_kernel.h"

namespace focal::cpu {
namespace {

// Elements (logits) per parallel work item. Items are fixed by the shape alone and their partial
// sums are added in order, so a reduced loss is bitwise identical for any number of threads.
constexpr int64_t kBlockElements = 16384;
// Positions of one segmentation item: a multiple of every vector width.
constexpr int64_t kPositionQuantum = 64;

SoftmaxBlockFn select_kernel() {
  static const SoftmaxBlockFn kernel = []() -> SoftmaxBlockFn {
    switch (isa_for_this_cpu()) {
#if defined(FOCAL_HAVE_AVX512)
      case Isa::kAvx512: return &AVX512::softmax_block;
#endif
#if defined(FOCAL_HAVE_AVX2)
      case Isa::kAvx2: return &AVX2::softmax_block;
#endif
#if defined(FOCAL_HAVE_DEFAULT)
      default: return &DEFAULT::softmax_block;
#else
      default: TORCH_INTERNAL_ASSERT(false, "isa_for_this_cpu() picked a copy that was not compiled");
#endif
    }
  }();
  return kernel;
}

// Checks every class id and returns the denominator of "mean": the sum of weight[id] over the
// elements that are not ignored (their number without a weight), 1 when every one is ignored.
double checked_mean_denominator(const SoftmaxCall& call) {
  const at::Tensor ids_tensor = call.target;
  const int64_t* ids = ids_tensor.const_data_ptr<int64_t>();
  const int64_t count = ids_tensor.numel(), classes = call.classes();
  at::Tensor weight;
  if (call.weight) weight = call.weight->to(at::kDouble).contiguous();
  const double* w = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
  double total = 0;
  int64_t kept = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t id = ids[i];
    if (id == call.ignore_index) continue;
    TORCH_CHECK_VALUE(id >= 0 && id < classes, "target class id ", id, " at flat position ", i,
                      " is out of range: expected a class in [0, ", classes,
                      ") or ignore_index (", call.ignore_index, ")");
    total += w ? w[id] : 1.0;
    ++kept;
  }
  return kept > 0 ? total : 1.0;
}

std::tuple<at::Tensor, at::Tensor> softmax_focal_loss_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& normalizer,
    double alpha_value, double gamma, double label_smoothing, int64_t ignore_index,
    c10::string_view reduction, double scale, bool compute_grad) {
  const SoftmaxCall call = make_softmax_call(
      logits, target, weight, alpha, normalizer, alpha_value, gamma, label_smoothing, ignore_index,
      std::string_view(reduction.data(), reduction.size()), scale, compute_grad);
  const int64_t outer = call.outer(), classes = call.classes(), inner = call.inner();
  // The segmentation kernel compares class ids as float32 numbers.
  TORCH_CHECK_VALUE(inner == 1 || classes <= (int64_t{1} << 24), "softmax_focal_loss takes at most 2^24 "
                    "classes when logits have dimensions after the class dimension, got ", classes);

  const double denominator = checked_mean_denominator(call);
  double total_scale = call.host_scale();
  if (call.reduction == Reduction::kMean) total_scale /= denominator;

  const auto options = logits.options();
  const at::Tensor grad =
      compute_grad ? empty_huge(logits.sizes(), options) : at::empty({0}, options);
  at::Tensor loss;
  if (call.reduction == Reduction::kNone) loss = at::empty(target.sizes(), options);
  const at::Tensor factor = call.class_factor();
  const SoftmaxArgs args = call.kernel_args(factor, loss, compute_grad ? grad : at::Tensor());

  // Work items: blocks of rows, or of positions of one image.
  const int64_t safe_classes = std::max<int64_t>(classes, 1);
  const int64_t item_rows = inner == 1 ? std::max<int64_t>(1, kBlockElements / safe_classes) : 1;
  const int64_t item_positions =
      inner == 1 ? 1
                 : std::max(kPositionQuantum,
                            kBlockElements / safe_classes / kPositionQuantum * kPositionQuantum);
  const int64_t per_outer = (inner + item_positions - 1) / item_positions;
  const int64_t items = outer * classes * inner == 0 ? 0
                        : inner == 1                 ? (outer + item_rows - 1) / item_rows
                                                     : outer * per_outer;
  std::vector<double> partial(items, 0.0);
  const SoftmaxBlockFn kernel = select_kernel();
  const GammaKind gamma_kind = call.gamma_kind();
  const auto dtype = logits.scalar_type();
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (inner == 1) {
        const int64_t r0 = i * item_rows;
        partial[i] = kernel(args, dtype, gamma_kind, total_scale, r0,
                            std::min(outer, r0 + item_rows), 0, 1);
      } else {
        const int64_t b = i / per_outer, p0 = (i % per_outer) * item_positions;
        partial[i] = kernel(args, dtype, gamma_kind, total_scale, b, b + 1, p0,
                            std::min(inner, p0 + item_positions));
      }
    }
  });

  if (call.reduction == Reduction::kNone) {
    if (classes == 0 && loss.numel() > 0) loss.zero_();  // no class to read: nothing but ignored ids
  } else {
    double sum = 0;
    for (const double p : partial) sum += p;
    loss = reduced_loss_tensor(sum * total_scale, options.dtype(call.math_dtype()));
  }
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(focal, CPU, m) { m.impl("softmax_focal_loss", &softmax_focal_loss_cpu); }

}  // namespace focal::cpu
