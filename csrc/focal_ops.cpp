// Operator schemas and the argument checks shared by every backend.
#include "focal_ops.h"

#include <cmath>

#include <torch/library.h>

namespace focal {

namespace {

Reduction parse_reduction(std::string_view r) {
  if (r == "none") return Reduction::kNone;
  if (r == "mean") return Reduction::kMean;
  if (r == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(false, "reduction must be 'none', 'mean' or 'sum', got '", std::string(r), "'");
}

void check_same_device(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, " is on ", t.device(),
                    " but logits are on ", logits.device());
}

}  // namespace

GammaKind FocalCall::gamma_kind() const {
  if (gamma == 0.0) return GammaKind::kZero;
  if (gamma == 1.0) return GammaKind::kOne;
  if (gamma == 2.0) return GammaKind::kTwo;
  return GammaKind::kGeneral;
}

at::ScalarType FocalCall::reduced_dtype() const {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

FocalArgs FocalCall::kernel_args(const at::Tensor& loss_out, const at::Tensor& grad_out) const {
  FocalArgs a;
  a.rows = rows();
  a.cols = cols();
  a.logits = logits.const_data_ptr();
  a.targets = targets.const_data_ptr();
  a.row_weight = row_weight ? row_weight->const_data_ptr() : nullptr;
  a.elem_weight = weight ? weight->const_data_ptr() : nullptr;
  a.elem_weight_row_stride = weight && weight->dim() == 2 ? cols() : 0;
  a.loss = loss_out.defined() ? loss_out.mutable_data_ptr() : nullptr;
  a.grad = grad_out.defined() ? grad_out.mutable_data_ptr() : nullptr;
  a.alpha = alpha;
  a.gamma = gamma;
  a.label_smoothing = label_smoothing;
  a.ignore_index = ignore_index;
  a.target_kind = !class_ids() ? TargetKind::kFloat
                  : label_smoothing > 0 ? TargetKind::kClassIdSmoothed
                                        : TargetKind::kClassId;
  return a;
}

FocalCall make_call(const at::Tensor& logits, const at::Tensor& targets,
                    const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& row_weight,
                    const std::optional<at::Tensor>& normalizer, double alpha, double gamma,
                    double label_smoothing, int64_t ignore_index, std::string_view reduction,
                    double scale, bool compute_grad) {
  TORCH_CHECK_TYPE(logits.is_floating_point(), "logits must be a floating point tensor, got ",
                   logits.scalar_type());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "logits must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be a 2D (rows, classes) tensor, got ",
                    logits.dim(), "D");
  TORCH_CHECK_VALUE(logits.is_contiguous(), "logits must be contiguous");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  check_same_device(logits, targets, "targets");
  TORCH_CHECK_VALUE(targets.is_contiguous(), "targets must be contiguous");
  if (targets.is_floating_point()) {
    TORCH_CHECK_TYPE(targets.scalar_type() == dtype, "float targets must have the logits' dtype ",
                     dtype, ", got ", targets.scalar_type());
    TORCH_CHECK_VALUE(targets.sizes() == logits.sizes(), "float targets must have the logits' shape ",
                      logits.sizes(), ", got ", targets.sizes());
  } else {
    TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "class-id targets must be int64, got ",
                     targets.scalar_type());
    TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == rows,
                      "class-id targets must have shape (", rows, ",), got ", targets.sizes());
    TORCH_CHECK_VALUE(ignore_index < -1 || ignore_index >= cols, "ignore_index ", ignore_index,
                      " collides with a class id or background (-1); classes are [0, ", cols, ")");
  }
  if (weight) {
    check_same_device(logits, *weight, "weight");
    TORCH_CHECK_TYPE(weight->scalar_type() == dtype, "weight must have the logits' dtype ", dtype,
                     ", got ", weight->scalar_type());
    const bool per_class = weight->dim() == 1 && weight->size(0) == cols;
    const bool per_element = weight->sizes() == logits.sizes();
    TORCH_CHECK_VALUE(per_class || per_element, "weight must have shape (", cols, ",) or ",
                      logits.sizes(), ", got ", weight->sizes());
    TORCH_CHECK_VALUE(weight->is_contiguous(), "weight must be contiguous");
  }
  if (row_weight) {
    check_same_device(logits, *row_weight, "row_weight");
    TORCH_CHECK_TYPE(row_weight->scalar_type() == dtype, "row_weight must have the logits' dtype ",
                     dtype, ", got ", row_weight->scalar_type());
    TORCH_CHECK_VALUE(row_weight->dim() == 1 && row_weight->size(0) == rows,
                      "row_weight must have shape (", rows, ",), got ", row_weight->sizes());
    TORCH_CHECK_VALUE(row_weight->is_contiguous(), "row_weight must be contiguous");
  }
  if (normalizer) {
    TORCH_CHECK_VALUE(normalizer->numel() == 1 && normalizer->dim() == 0,
                      "normalizer must be a 0-dim tensor, got shape ", normalizer->sizes());
    TORCH_CHECK_VALUE(normalizer->device() == logits.device() || normalizer->device().is_cpu(),
                      "normalizer is on ", normalizer->device(), " but logits are on ",
                      logits.device());
    TORCH_CHECK_TYPE(normalizer->scalar_type() != at::kBool && !normalizer->is_complex(),
                     "normalizer must be a real number tensor, got ", normalizer->scalar_type());
  }
  TORCH_CHECK_VALUE(alpha < 0 || alpha <= 1, "alpha must be in [0, 1] (or negative for none), got ",
                    alpha);
  TORCH_CHECK_VALUE(gamma >= 0 && std::isfinite(gamma), "gamma must be finite and >= 0, got ", gamma);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1,
                    "label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be finite and > 0, got ", scale);
  return FocalCall{logits, targets, weight, row_weight, normalizer, alpha, gamma, label_smoothing,
                   ignore_index, parse_reduction(reduction), scale, compute_grad};
}

}  // namespace focal

TORCH_LIBRARY(focal, m) {
  // Loss and, when compute_grad, d(loss)/d(logits) from one pass over the logits.
  //   logits (N, C); targets (N, C) in the logits' dtype or (N,) int64 class ids;
  //   weight (C,) or (N, C) and row_weight (N,) in the logits' dtype;
  //   normalizer: 0-dim tensor dividing the loss; scale: a float multiplying it;
  //   returns loss: (N, C) in the logits' dtype for "none", else a 0-dim float32 (float64) tensor;
  //           grad: (N, C) in the logits' dtype, or an empty (0,) tensor when not requested.
  m.def(
      "sigmoid_focal_loss(Tensor logits, Tensor targets, Tensor? weight, Tensor? row_weight, "
      "Tensor? normalizer, float alpha, float gamma, float label_smoothing, int ignore_index, "
      "str reduction, float scale, bool compute_grad) -> (Tensor, Tensor)");
}
