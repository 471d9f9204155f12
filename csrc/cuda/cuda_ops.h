// The CUDA backend's operator functions, defined by the .cu files and registered by
// register_cuda.cpp. They sit behind this plain declaration so that no .cu file includes
// torch/library.h: nvcc runs each file through three front ends (cudafe++, cicc and the host
// compiler), and torch's registration headers cost each of them as much as the kernels' host code.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "../focal_ops.h"

namespace focal::cuda {

// Loss and gradient of any elementwise loss of the family, from checked arguments (focal_cuda.cu).
std::tuple<at::Tensor, at::Tensor> run_elementwise_loss(const FocalCall& call);

// The softmax_focal_loss op (softmax_cuda.cu); arguments as its schema, softmax_ops.h.
std::tuple<at::Tensor, at::Tensor> softmax_focal_loss(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& normalizer,
    double alpha_value, double gamma, double label_smoothing, int64_t ignore_index,
    c10::string_view reduction, double scale, bool compute_grad);

// The fcos_box_losses op (box_cuda.cu); arguments as its schema, box_ops.h.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fcos_box_losses(
    const at::Tensor& codes, const at::Tensor& ctrness, const at::Tensor& anchors,
    const at::Tensor& gt_boxes, const at::Tensor& matched, const std::optional<at::Tensor>& normalizer,
    bool normalize_by_size);

// The scale_grad_ op (scale_grad_cuda.cu): grad *= grad_output.
void scale_grad(const at::Tensor& grad, const at::Tensor& grad_output);

}  // namespace focal::cuda
