// The operator functions of the elementwise losses (schemas in focal_ops.h), written once for every
// backend: each checks its arguments into a FocalCall and hands it to the backend's Run.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include <torch/library.h>

#include "focal_ops.h"

namespace focal {

using LossAndGradTensors = std::tuple<at::Tensor, at::Tensor>;
using RunFn = LossAndGradTensors (*)(const FocalCall&);
using OptTensor = std::optional<at::Tensor>;

template <RunFn Run>
struct LossOps {
  static std::string_view view(c10::string_view s) { return {s.data(), s.size()}; }

  static LossAndGradTensors sigmoid_focal_loss(
      const at::Tensor& logits, const at::Tensor& targets, const OptTensor& weight,
      const OptTensor& row_weight, const OptTensor& normalizer, double alpha, double gamma,
      double label_smoothing, int64_t ignore_index, c10::string_view reduction, double scale,
      bool compute_grad, const OptTensor& class_alpha, int64_t background_index) {
    return Run(make_call(logits, targets, weight, row_weight, normalizer, alpha, gamma,
                         label_smoothing, ignore_index, view(reduction), scale, compute_grad,
                         {class_alpha, background_index}));
  }

  static LossAndGradTensors sigmoid_focal_loss_star(
      const at::Tensor& logits, const at::Tensor& targets, const OptTensor& weight,
      const OptTensor& row_weight, const OptTensor& normalizer, double alpha, double gamma,
      double beta, double label_smoothing, int64_t ignore_index, c10::string_view reduction,
      double scale, bool compute_grad, const OptTensor& class_alpha, int64_t background_index) {
    return Run(make_call(logits, targets, weight, row_weight, normalizer, alpha, gamma,
                         label_smoothing, ignore_index, view(reduction), scale, compute_grad,
                         {class_alpha, background_index}, {LossKind::kFocalStar, beta, std::nullopt}));
  }

  // QFL's beta is its focusing exponent: the call's gamma.
  static LossAndGradTensors quality_focal_loss(
      const at::Tensor& logits, const at::Tensor& targets, const OptTensor& scores,
      const OptTensor& weight, const OptTensor& row_weight, const OptTensor& normalizer,
      double beta, int64_t ignore_index, c10::string_view reduction, double scale,
      bool compute_grad, int64_t background_index) {
    return Run(make_call(logits, targets, weight, row_weight, normalizer, -1.0, beta, 0.0,
                         ignore_index, view(reduction), scale, compute_grad,
                         {std::nullopt, background_index}, {LossKind::kQuality, 0.0, scores}));
  }

  static LossAndGradTensors varifocal_loss(
      const at::Tensor& logits, const at::Tensor& targets, const OptTensor& scores,
      const OptTensor& weight, const OptTensor& row_weight, const OptTensor& normalizer,
      double alpha, double gamma, int64_t ignore_index, c10::string_view reduction, double scale,
      bool compute_grad, const OptTensor& class_alpha, int64_t background_index) {
    return Run(make_call(logits, targets, weight, row_weight, normalizer, alpha, gamma, 0.0,
                         ignore_index, view(reduction), scale, compute_grad,
                         {class_alpha, background_index}, {LossKind::kVarifocal, 0.0, scores}));
  }

  // Registers the four ops on `m` (a TORCH_LIBRARY_IMPL block of the backend's dispatch key), each
  // under the name its schema gives it.
  static void register_on(torch::Library& m) {
    m.impl(op_name(kSigmoidFocalLossSchema).c_str(), &sigmoid_focal_loss);
    m.impl(op_name(kSigmoidFocalLossStarSchema).c_str(), &sigmoid_focal_loss_star);
    m.impl(op_name(kQualityFocalLossSchema).c_str(), &quality_focal_loss);
    m.impl(op_name(kVarifocalLossSchema).c_str(), &varifocal_loss);
  }
};

}  // namespace focal
