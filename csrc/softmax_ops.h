// softmax_focal_loss, shared by the backends: its schema, the plain launch description the kernels
// read, and the argument checks that guard memory.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "focal_math.h"
#include "focal_ops.h"
#include "softmax_args.h"

namespace focal {

// softmax_focal_loss: loss and, when compute_grad, d(loss)/d(logits) from one pass per row.
//   logits (N, C), (N, C, d1, ...) or (C,), contiguous, class dimension 1 (0 when 1-D); target int64
//   class ids of the logits' shape without the class dimension; weight and alpha (C,) float tensors
//   or None (weight scales each class term and the "mean" denominator, alpha only the terms);
//   normalizer a one-element tensor dividing the loss; alpha_value and scale numbers multiplying it.
//   Returns loss (the target's shape in the logits' dtype for "none", else a 0-dim float32 tensor,
//   float64 for float64 logits) and grad (the logits' shape and dtype, or an empty (0,) tensor when
//   compute_grad is false).
inline constexpr const char* kSoftmaxFocalLossSchema =
    "softmax_focal_loss(Tensor logits, Tensor target, Tensor? weight, Tensor? alpha, "
    "Tensor? normalizer, float alpha_value, float gamma, float label_smoothing, int ignore_index, "
    "str reduction, float scale, bool compute_grad) -> (Tensor, Tensor)";

struct SoftmaxCall {
  at::Tensor logits;
  at::Tensor target;
  std::optional<at::Tensor> weight;
  std::optional<at::Tensor> alpha;
  std::optional<at::Tensor> normalizer;
  double alpha_value;
  double gamma;
  double label_smoothing;
  int64_t ignore_index;
  Reduction reduction;
  double scale;
  bool compute_grad;

  int64_t class_dim() const { return logits.dim() == 1 ? 0 : 1; }
  int64_t classes() const { return logits.size(class_dim()); }
  int64_t outer() const { return logits.dim() == 1 ? 1 : logits.size(0); }
  int64_t inner() const;
  GammaKind gamma_kind() const;
  // float32 for float32/bfloat16/float16 logits, float64 for float64: the math and reduced dtype.
  at::ScalarType math_dtype() const;
  // weight * alpha in the math dtype, (C,), or an undefined tensor when neither is given.
  at::Tensor class_factor() const;
  // scale * alpha_value, divided by the normaliser when that is a CPU tensor (read and checked here).
  double host_scale() const;
  SoftmaxArgs kernel_args(const at::Tensor& class_factor, const at::Tensor& loss_out,
                          const at::Tensor& grad_out) const;
};

// Checks what the kernels rely on for memory safety (dtypes, shapes, contiguity, devices) and parses
// the reduction; the values of the numbers are validated, with messages for users, by
// focal.softmax_focal_loss.
SoftmaxCall make_softmax_call(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& alpha,
                              const std::optional<at::Tensor>& normalizer, double alpha_value,
                              double gamma, double label_smoothing, int64_t ignore_index,
                              std::string_view reduction, double scale, bool compute_grad);

}  // namespace focal
