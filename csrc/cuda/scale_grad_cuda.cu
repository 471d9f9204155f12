// CUDA backend of scale_grad_: grad *= grad_output, in place. When grad_output is one value (the
// gradient of a reduced loss, or of loss.sum()), a kernel reads it on the device and every thread
// leaves at once when it is 1: loss.backward() then costs one tiny launch and no pass over grad,
// and the host never waits for the GPU. Registered by register_cuda.cpp. Compiled by nvcc, and for
// tests as host C++ against the emulation (host_runtime.cuh, README.md).
#include <cstdint>

#include <ATen/Dispatch.h>

#include "../focal_ops.h"
#include "cuda_ops.h"
#include "focal_kernels.cuh"
#include "host_runtime.cuh"

namespace focal::cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    scale_kernel(scalar_t* __restrict__ grad, int64_t n, ScalarRef factor) {
  using acc_t = at::opmath_type<scalar_t>;
  // Rounded to grad's dtype first, then multiplied in the math type, as ATen's grad.mul_(t) with a
  // one-value CUDA tensor t: a factor that rounds to 1 leaves grad bitwise unchanged either way.
  const scalar_t f = static_cast<scalar_t>(load(factor));
  if (f == scalar_t(1)) return;
  const acc_t f_acc = static_cast<acc_t>(f);
  int64_t touched = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * f_acc);
    ++touched;
  }
  trace_elements(touched);
}

bool has_kernel(const at::Tensor& grad) {
  const auto t = grad.scalar_type();
  return grad.is_contiguous() &&
         (t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16);
}

}  // namespace

void scale_grad(const at::Tensor& grad, const at::Tensor& grad_output) {
  const bool one_value = check_scale_grad(grad, grad_output);
  const rt::DeviceGuard device_guard(grad.device());
  if (!one_value || !has_kernel(grad)) {
    grad.mul_(grad_output);
    return;
  }
  if (grad.numel() == 0) return;
  // The one value, as a 0-dim view (grad_output may be expanded: every stride 0).
  const at::Tensor value = grad_output.as_strided({}, {});
  if (rt::resides_on_host(value)) {
    // A CPU scalar: reading it costs nothing.
    if (value.item<double>() != 1.0) grad.mul_(value);
    return;
  }
  at::Tensor converted;
  const ScalarRef factor = rt::scalar_ref(value, converted);
  const int64_t multiprocessors = rt::multiprocessor_count();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "focal_scale_grad", [&] {
    const int blocks = grid_blocks(grad.numel(), multiprocessors * kBlocksPerSm<scalar_t>);
    rt::launch(&scale_kernel<scalar_t>, blocks, kThreads, rt::current_stream(),
               grad.mutable_data_ptr<scalar_t>(), grad.numel(), factor);
  });
}

}  // namespace focal::cuda
