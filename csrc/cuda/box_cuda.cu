// CUDA backend of fcos_box_losses: one thread per location (box_location, shared with the CPU
// backend), each writing its gradients and its two loss terms; the terms are then summed by ATen,
// in a fixed order. Registered by register_cuda.cpp. Compiled by nvcc, and for tests as host C++
// against the emulation (host_runtime.cuh, README.md).
#include <optional>
#include <tuple>

#include <ATen/Dispatch.h>

#include "../box_ops.h"
#include "cuda_ops.h"
#include "focal_kernels.cuh"
#include "host_runtime.cuh"

namespace focal::cuda {
namespace {

// terms: (2, count), the GIoU terms then the centerness terms. A normaliser in device memory is read
// here (the host never waits for it); one that is not finite and > 0 makes every term NaN.
template <typename code_t, typename box_t>
__global__ void __launch_bounds__(kThreads)
    box_kernel(BoxArgs args, ScaleArgs scale_args, int64_t count, double* terms) {
  const double scale = resolve_scale(scale_args);
  int64_t touched = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < count; i += stride) {
    double t[2];
    box_location<code_t, box_t>(args, i, scale, t);
    terms[i] = t[0];
    terms[count + i] = t[1];
    ++touched;
  }
  trace_elements(touched);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fcos_box_losses(
    const at::Tensor& codes, const at::Tensor& ctrness, const at::Tensor& anchors,
    const at::Tensor& gt_boxes, const at::Tensor& matched, const std::optional<at::Tensor>& normalizer,
    bool normalize_by_size) {
  const BoxCall call = make_box_call(codes, ctrness, anchors, gt_boxes, matched, normalizer, normalize_by_size);
  const rt::DeviceGuard device_guard(call.codes.device());
  const at::TensorOptions math = call.codes.options().dtype(call.math_dtype());
  const at::Tensor grad_codes = rt::empty(call.codes.sizes(), math);
  const at::Tensor grad_ctrness = rt::empty(call.ctrness.sizes(), math);
  const int64_t count = call.images() * call.locations();
  const at::Tensor terms = rt::empty({2, count}, call.codes.options().dtype(at::kDouble));
  if (count > 0) {
    const BoxArgs args = box_args(call, grad_codes, grad_ctrness);
    at::Tensor converted;
    const ScaleArgs scale = rt::scale_by_normalizer<ScaleArgs>(1.0, call.normalizer, converted);
    const int blocks = grid_blocks(count, int64_t{rt::multiprocessor_count()} * 4);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.codes.scalar_type(), "fcos_box_losses", [&] {
      using code_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(call.anchors.scalar_type(), "fcos_box_losses", [&] {
        rt::launch(&box_kernel<code_t, scalar_t>, blocks, kThreads, rt::current_stream(), args, scale,
                   count, terms.mutable_data_ptr<double>());
      });
    });
  }
  return {terms[0].sum().to(call.math_dtype()), terms[1].sum().to(call.math_dtype()), grad_codes,
          grad_ctrness};
}

}  // namespace focal::cuda
