// The argument checks shared by every backend (the schemas are in focal_ops.h, registered by
// module.cpp).
#include "focal_ops.h"

#include <algorithm>
#include <cmath>

#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/stack.h>

namespace focal {

Reduction parse_reduction(std::string_view r) {
  if (r == "none") return Reduction::kNone;
  if (r == "mean") return Reduction::kMean;
  if (r == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(false, "reduction must be 'none', 'mean' or 'sum', got '", std::string(r), "'");
}

GammaKind gamma_kind_of(double gamma) {
  if (gamma == 0.0) return GammaKind::kZero;
  if (gamma == 1.0) return GammaKind::kOne;
  if (gamma == 2.0) return GammaKind::kTwo;
  return GammaKind::kGeneral;
}

void check_logits_dtype(const at::Tensor& logits) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "logits must be float32, float64, float16 or bfloat16, got ", dtype);
}

void check_normalizer(const at::Tensor& logits, const at::Tensor& normalizer) {
  TORCH_CHECK_VALUE(normalizer.numel() == 1, "normalizer must have one element, got shape ",
                    normalizer.sizes());
  TORCH_CHECK_VALUE(normalizer.device() == logits.device() || normalizer.device().is_cpu(),
                    "normalizer is on ", normalizer.device(), " but logits are on ", logits.device());
  TORCH_CHECK_TYPE(normalizer.scalar_type() != at::kBool && !normalizer.is_complex(),
                   "normalizer must be a real number tensor, got ", normalizer.scalar_type());
}

double divide_by_host_normalizer(double factor, const std::optional<at::Tensor>& normalizer) {
  if (!normalizer || !normalizer->device().is_cpu()) return factor;
  const double value = normalizer->item<double>();
  TORCH_CHECK_VALUE(value > 0 && std::isfinite(value), "normalizer must be a finite number > 0, got ",
                    value);
  return factor / value;
}

at::Tensor reduced_loss_tensor(double value, const at::TensorOptions& options) {
  at::Tensor loss = at::empty({}, options);
  if (loss.scalar_type() == at::kDouble) {
    *loss.mutable_data_ptr<double>() = value;
  } else {
    *loss.mutable_data_ptr<float>() = static_cast<float>(value);
  }
  return loss;
}

namespace {

void check_same_device(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, " is on ", t.device(),
                    " but logits are on ", logits.device());
}

void check_dtype_and_layout(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  check_same_device(logits, t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == logits.scalar_type(), name, " must have the logits' dtype ",
                   logits.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

at::IntArrayRef row_shape(const at::Tensor& logits) {
  return logits.dim() == 0 ? logits.sizes() : logits.sizes().slice(0, logits.dim() - 1);
}

}  // namespace

GammaKind FocalCall::gamma_kind() const { return gamma_kind_of(gamma); }

at::ScalarType FocalCall::reduced_dtype() const {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

double FocalCall::empty_mean() const { return class_ids() ? 0.0 : NAN; }

double FocalCall::host_scale() const { return divide_by_host_normalizer(scale, normalizer); }

std::optional<at::Tensor> FocalCall::device_normalizer() const {
  if (normalizer && !normalizer->device().is_cpu()) return normalizer;
  return std::nullopt;
}

KernelArgs FocalCall::kernel_args(const at::Tensor& loss_out, const at::Tensor& grad_out) const {
  KernelArgs a;
  a.rows = rows();
  a.cols = cols();
  a.logits = logits.const_data_ptr();
  a.targets = targets.const_data_ptr();
  a.scores = scores ? scores->const_data_ptr() : nullptr;
  a.row_weight = row_weight ? row_weight->const_data_ptr() : nullptr;
  a.elem_weight = weight ? weight->const_data_ptr() : nullptr;
  a.elem_weight_row_stride = weight && weight->numel() != cols() ? cols() : 0;
  a.loss = loss_out.defined() ? loss_out.mutable_data_ptr() : nullptr;
  a.grad = grad_out.defined() ? grad_out.mutable_data_ptr() : nullptr;
  a.alpha = alpha;
  a.gamma = gamma;
  a.label_smoothing = label_smoothing;
  a.ignore_index = ignore_index;
  a.background_index = background_index;
  a.class_alpha = class_alpha ? class_alpha->const_data_ptr() : nullptr;
  a.beta = beta;
  a.loss_kind = loss_kind;
  a.target_kind = !class_ids()           ? TargetKind::kFloat
                  : scores               ? TargetKind::kClassIdScore
                  : label_smoothing > 0  ? TargetKind::kClassIdSmoothed
                                         : TargetKind::kClassId;
  return a;
}

FocalCall make_call(const at::Tensor& logits, const at::Tensor& targets,
                    const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& row_weight,
                    const std::optional<at::Tensor>& normalizer, double alpha, double gamma,
                    double label_smoothing, int64_t ignore_index, std::string_view reduction,
                    double scale, bool compute_grad, const LabelSpec& labels,
                    const LossSpec& spec) {
  check_logits_dtype(logits);
  TORCH_CHECK_VALUE(logits.is_contiguous(), "logits must be contiguous");
  const int64_t classes = logits.dim() == 0 ? 1 : logits.size(-1);
  if (targets.is_floating_point()) {
    check_dtype_and_layout(logits, targets, "float targets");
    TORCH_CHECK_VALUE(targets.sizes() == logits.sizes(), "float targets must have the logits' shape ",
                      logits.sizes(), ", got ", targets.sizes());
  } else {
    check_same_device(logits, targets, "targets");
    TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "class-id targets must be int64, got ",
                     targets.scalar_type());
    TORCH_CHECK_VALUE(logits.dim() >= 1 && targets.sizes() == row_shape(logits),
                      "class-id targets must have the shape logits.shape[:-1] = ", row_shape(logits),
                      ", got ", targets.sizes());
    TORCH_CHECK_VALUE(targets.is_contiguous(), "targets must be contiguous");
    // The kernels tell ignored rows, background rows and classes apart by these values alone.
    const int64_t background = labels.background_index;
    TORCH_CHECK_VALUE(background < 0 || background >= classes, "background_index ", background,
                      " collides with a class id; classes are [0, ", classes, ")");
    TORCH_CHECK_VALUE((ignore_index < 0 || ignore_index >= classes) && ignore_index != background,
                      "ignore_index ", ignore_index, " collides with a class id or with background_index (",
                      background, "); classes are [0, ", classes, ")");
  }
  const bool quality = spec.kind == LossKind::kQuality || spec.kind == LossKind::kVarifocal;
  if (spec.scores) {
    TORCH_CHECK_VALUE(quality && !targets.is_floating_point(),
                      "scores go with the class-id targets of the quality losses (QFL, VFL)");
    check_dtype_and_layout(logits, *spec.scores, "scores");
    TORCH_CHECK_VALUE(spec.scores->sizes() == row_shape(logits),
                      "scores must have the shape logits.shape[:-1] = ", row_shape(logits), ", got ",
                      spec.scores->sizes());
  } else {
    TORCH_CHECK_VALUE(!quality || targets.is_floating_point(),
                      "class-id targets of the quality losses (QFL, VFL) need scores");
  }
  TORCH_CHECK_VALUE(!quality || label_smoothing == 0.0, "the quality losses take no label smoothing");
  // FL* divides by gamma: the one hyper-parameter whose bad value the kernels could not survive
  // with a meaningful number (the others are validated with users' messages in Python).
  TORCH_CHECK_VALUE(spec.kind != LossKind::kFocalStar || (gamma > 0 && std::isfinite(gamma)),
                    "FL* divides by gamma, which must be a finite number > 0, got ", gamma);
  if (weight) {
    check_dtype_and_layout(logits, *weight, "weight");
    const bool per_class = weight->dim() == 1 && weight->size(0) == classes;
    TORCH_CHECK_VALUE(per_class || weight->sizes() == logits.sizes(), "weight must have shape (",
                      classes, ",) or ", logits.sizes(), ", got ", weight->sizes());
  }
  if (row_weight) {
    check_dtype_and_layout(logits, *row_weight, "row_weight");
    TORCH_CHECK_VALUE(logits.dim() >= 1 && row_weight->sizes() == row_shape(logits),
                      "row_weight must have the shape logits.shape[:-1] = ", row_shape(logits),
                      ", got ", row_weight->sizes());
  }
  if (normalizer) check_normalizer(logits, *normalizer);
  std::optional<at::Tensor> alpha_table;
  if (labels.class_alpha) {
    const at::Tensor& a = *labels.class_alpha;
    TORCH_CHECK_VALUE(spec.kind != LossKind::kQuality, "QFL takes no alpha");
    check_same_device(logits, a, "class_alpha");
    TORCH_CHECK_TYPE(a.is_floating_point(), "class_alpha must be a floating point tensor, got ",
                     a.scalar_type());
    TORCH_CHECK_VALUE(a.dim() == 1 && a.size(0) == classes, "class_alpha must have shape (", classes,
                      ",), got ", a.sizes());
    if (a.device().is_cpu()) {  // read where that costs no device sync
      const bool valid = spec.kind == LossKind::kVarifocal
                             ? (a.ge(0.0).logical_and(a.isfinite())).all().item<bool>()
                             : (a.ge(0.0).logical_and(a.le(1.0))).all().item<bool>();
      TORCH_CHECK_VALUE(valid, "class_alpha values must be ",
                        spec.kind == LossKind::kVarifocal ? "finite and >= 0" : "in [0, 1]");
    }
    // Each class's alpha weights of t = 1 and t = 0, as loss_alpha makes them from one alpha:
    // formed in double and rounded once, so that a constant tensor gives the scalar's bits.
    const at::Tensor v = a.to(at::kDouble);
    const at::Tensor table = spec.kind == LossKind::kVarifocal ? at::stack({at::ones_like(v), v})
                                                               : at::stack({v, v.neg().add(1.0)});
    alpha_table = table.to(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  }
  // With a tensor alpha the number weighs nothing (VFL's alpha is its negatives' weight, FL's and
  // FL*'s alpha < 0 turns alpha off): the kernels apply each class's weights instead.
  if (alpha_table) alpha = spec.kind == LossKind::kVarifocal ? 1.0 : -1.0;
  return FocalCall{logits, targets, spec.scores, weight, row_weight, normalizer, alpha, gamma,
                   label_smoothing, ignore_index, labels.background_index, alpha_table,
                   parse_reduction(reduction), scale, compute_grad, spec.kind, spec.beta};
}

bool check_scale_grad(const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(grad_output.device() == grad.device() ||
                        (grad_output.device().is_cpu() && grad_output.dim() == 0),
                    "grad_output is on ", grad_output.device(), " but grad is on ", grad.device());
  TORCH_CHECK_VALUE(grad_output.dim() <= grad.dim() || grad_output.numel() == 1,
                    "grad_output of shape ", grad_output.sizes(), " does not broadcast to ",
                    grad.sizes());
  const auto strides = grad_output.strides();
  return grad_output.numel() == 1 ||
         (grad_output.numel() > 0 && std::all_of(strides.begin(), strides.end(),
                                                 [](int64_t s) { return s == 0; }));
}

}  // namespace focal
