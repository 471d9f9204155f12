// The argument checks of softmax_focal_loss shared by every backend (the schema is in
// softmax_ops.h, registered by module.cpp).
#include "softmax_ops.h"

#include <vector>

#include <c10/util/accumulate.h>

namespace focal {

namespace {

void check_class_vector(const at::Tensor& logits, const at::Tensor& t, int64_t classes,
                        const char* name) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, " is on ", t.device(),
                    " but logits are on ", logits.device());
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating point tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == classes, name, " must have shape (", classes,
                    ",), got ", t.sizes());
}

}  // namespace

int64_t SoftmaxCall::inner() const {
  return logits.dim() <= 2 ? 1 : c10::multiply_integers(logits.sizes().slice(2));
}

GammaKind SoftmaxCall::gamma_kind() const { return gamma_kind_of(gamma); }

at::ScalarType SoftmaxCall::math_dtype() const {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor SoftmaxCall::class_factor() const {
  at::Tensor factor;
  if (weight) factor = weight->to(math_dtype());
  if (alpha) factor = factor.defined() ? factor.mul(alpha->to(math_dtype())) : alpha->to(math_dtype());
  return factor.defined() ? factor.contiguous() : factor;
}

double SoftmaxCall::host_scale() const {
  return divide_by_host_normalizer(scale * alpha_value, normalizer);
}

SoftmaxArgs SoftmaxCall::kernel_args(const at::Tensor& class_factor, const at::Tensor& loss_out,
                                     const at::Tensor& grad_out) const {
  SoftmaxArgs a;
  a.outer = outer();
  a.classes = classes();
  a.inner = inner();
  a.logits = logits.const_data_ptr();
  a.target = target.const_data_ptr<int64_t>();
  a.class_factor = class_factor.defined() ? class_factor.const_data_ptr() : nullptr;
  a.loss = loss_out.defined() ? loss_out.mutable_data_ptr() : nullptr;
  a.grad = grad_out.defined() ? grad_out.mutable_data_ptr() : nullptr;
  a.gamma = gamma;
  a.label_smoothing = label_smoothing;
  a.ignore_index = ignore_index;
  return a;
}

SoftmaxCall make_softmax_call(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& alpha,
                              const std::optional<at::Tensor>& normalizer, double alpha_value,
                              double gamma, double label_smoothing, int64_t ignore_index,
                              std::string_view reduction, double scale, bool compute_grad) {
  check_logits_dtype(logits);
  TORCH_CHECK_VALUE(logits.dim() >= 1, "logits must have a class dimension: (C,), (N, C) or "
                    "(N, C, d1, ...), got a 0-dim tensor");
  TORCH_CHECK_VALUE(logits.is_contiguous(), "logits must be contiguous");
  const int64_t class_dim = logits.dim() == 1 ? 0 : 1;
  std::vector<int64_t> target_shape(logits.sizes().begin(), logits.sizes().end());
  target_shape.erase(target_shape.begin() + class_dim);
  TORCH_CHECK_VALUE(target.device() == logits.device(), "target is on ", target.device(),
                    " but logits are on ", logits.device());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target must hold int64 class ids, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef(target_shape),
                    "target must have the logits' shape without the class dimension, ",
                    at::IntArrayRef(target_shape), ", got ", target.sizes());
  TORCH_CHECK_VALUE(target.is_contiguous(), "target must be contiguous");
  const int64_t classes = logits.size(class_dim);
  if (weight) check_class_vector(logits, *weight, classes, "weight");
  if (alpha) check_class_vector(logits, *alpha, classes, "alpha");
  if (normalizer) check_normalizer(logits, *normalizer);
  return SoftmaxCall{logits, target, weight, alpha, normalizer, alpha_value, gamma,
                     label_smoothing, ignore_index, parse_reduction(reduction), scale,
                     compute_grad};
}

}  // namespace focal
