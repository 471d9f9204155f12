// Shared by the backends: argument checks and the translation of op arguments into FocalArgs.
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "focal_args.h"
#include "focal_math.h"

namespace focal {

enum class Reduction { kNone, kMean, kSum };

// The op's arguments, checked once, in the order of the schema in focal_ops.cpp.
struct FocalCall {
  at::Tensor logits;
  at::Tensor targets;
  std::optional<at::Tensor> weight;
  std::optional<at::Tensor> row_weight;
  std::optional<at::Tensor> normalizer;
  double alpha;
  double gamma;
  double label_smoothing;
  int64_t ignore_index;
  Reduction reduction;
  double scale;
  bool compute_grad;

  bool class_ids() const { return !targets.is_floating_point(); }
  int64_t rows() const { return logits.size(0); }
  int64_t cols() const { return logits.size(1); }
  GammaKind gamma_kind() const;
  // Kernel arguments pointing into this call's tensors and the given outputs (either may be undefined).
  FocalArgs kernel_args(const at::Tensor& loss_out, const at::Tensor& grad_out) const;
  // dtype of a reduced loss: float32 for float32/bfloat16/float16 inputs, float64 for float64.
  at::ScalarType reduced_dtype() const;
};

// Validates every argument (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE with messages naming the problem).
FocalCall make_call(const at::Tensor& logits, const at::Tensor& targets,
                    const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& row_weight,
                    const std::optional<at::Tensor>& normalizer, double alpha, double gamma,
                    double label_smoothing, int64_t ignore_index, std::string_view reduction,
                    double scale, bool compute_grad);

}  // namespace focal
