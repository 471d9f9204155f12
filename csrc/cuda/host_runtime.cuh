// What the host code of the CUDA backend uses from the CUDA runtime and ATen's CUDA layer: device
// guard, stream, device size, output allocation, kernel launch and where a tensor lives. In the
// test-only emulated build (-DFOCAL_CUDA_EMULATION) the same names come from
// tests/cuda_emulation/cuda_emulation.h (README.md). Keep this file the only place in the .cu files'
// host code that tells the two apart; register_cuda.cpp is the other, for the dispatch key.
#pragma once

#include <optional>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include "../focal_ops.h"  // divide_by_host_normalizer
#include "kernel_runtime.cuh"

// The narrowest headers that declare what is used below: ATen/cuda/CUDAContext.h and at::empty's
// header pull in ATen/Context.h, which costs each .cu file about 10 s more in nvcc's front ends.
#if !defined(FOCAL_CUDA_EMULATION)
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#else
#include <ATen/EmptyTensor.h>
#endif

namespace focal::cuda::rt {

#if !defined(FOCAL_CUDA_EMULATION)

using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = cudaStream_t;

inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// A new uninitialised tensor: ATen's CUDA allocation itself, which at::empty dispatches to.
inline at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::Tensor(at::detail::empty_cuda(sizes, options));
}

inline int multiprocessor_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// The current device's compute capability, {major, minor}.
inline std::pair<int, int> compute_capability() {
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  return {p->major, p->minor};
}

// True when the host may read the tensor without waiting for the GPU.
inline bool resides_on_host(const at::Tensor& t) { return t.device().is_cpu(); }

// Blocks of `threads` threads of `kernel` that one SM of the current device holds at once (at
// least 1): what its registers and shared memory allow.
template <typename... Params>
int resident_blocks(void (*kernel)(Params...), int threads) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
  return blocks > 0 ? blocks : 1;
}

// kernel<<<blocks, threads, 0, stream>>>(args...), with the launch checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int blocks, int threads, Stream stream, Args&&... args) {
  kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#else  // the emulation

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
using Stream = std::nullptr_t;

inline Stream current_stream() { return nullptr; }
inline at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::Tensor(at::detail::empty_cpu(sizes, options));
}
inline int multiprocessor_count() { return focal_emu::kMultiprocessors; }
inline std::pair<int, int> compute_capability() { return {9, 0}; }  // an H100's, for the table
template <typename... Params>
int resident_blocks(void (*)(Params...), int) {
  return focal_emu::kResidentBlocks;
}
inline bool resides_on_host(const at::Tensor& t) {
  return t.device().is_cpu() && !focal_emu::scalars_on_device();
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int blocks, int threads, Stream, Args&&... args) {
  focal_emu::launch(kernel, dim3(blocks), dim3(threads), std::forward<Args>(args)...);
}

#endif

// The number `one_value` holds (its first element), as pointer and dtype tag for a kernel to read.
// Dtypes without a tag are converted to float64 into `converted`, which must outlive the launch.
inline ScalarRef scalar_ref(const at::Tensor& one_value, at::Tensor& converted) {
  const at::Tensor* t = &one_value;
  ScalarTag tag;
  switch (one_value.scalar_type()) {
    case at::kDouble: tag = ScalarTag::kDouble; break;
    case at::kFloat: tag = ScalarTag::kFloat; break;
    case at::kHalf: tag = ScalarTag::kHalf; break;
    case at::kBFloat16: tag = ScalarTag::kBFloat16; break;
    case at::kLong: tag = ScalarTag::kLong; break;
    case at::kInt: tag = ScalarTag::kInt; break;
    case at::kShort: tag = ScalarTag::kShort; break;
    case at::kChar: tag = ScalarTag::kChar; break;
    case at::kByte: tag = ScalarTag::kByte; break;
    default:
      converted = one_value.as_strided({}, {}).to(at::kDouble);  // the first element only
      t = &converted;
      tag = ScalarTag::kDouble;
  }
  return {t->const_data_ptr(), tag};
}

// The scale a kernel takes (ScaleArgs, SoftmaxScale): `factor` divided by `normalizer` when that
// lives on the host (read and checked here), else `factor` and the normaliser left in device memory
// for the kernels to read, converted into `converted` (which must outlive the launch) if need be.
template <typename Scale>
Scale scale_by_normalizer(double factor, const std::optional<at::Tensor>& normalizer, at::Tensor& converted) {
  Scale s;
  if (normalizer && !resides_on_host(*normalizer)) {
    s.factor = factor;
    s.normalizer = scalar_ref(*normalizer, converted);
  } else {
    s.factor = divide_by_host_normalizer(factor, normalizer);
  }
  return s;
}

}  // namespace focal::cuda::rt
