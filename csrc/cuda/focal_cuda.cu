// CUDA backend. One grid-stride kernel computes, per element, the loss and d loss / d logits with
// the shared math of focal_math.h; a reduced loss is summed per block with CUB and the block sums
// are added in a fixed order by a second one-block kernel (no atomics: bitwise reproducible).
// Nothing here synchronises with the host, so the op can be captured in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/clamp_min.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "../focal_ops.h"

namespace focal::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;

// Loss and gradient of element (row, col), alpha- and weight-scaled, not yet multiplied by `scale`.
template <typename scalar_t, TargetKind TK, GammaKind G>
__device__ __forceinline__ LossAndGrad<at::opmath_type<scalar_t>> element(
    const KernelArgs& a, const AlphaWeights<at::opmath_type<scalar_t>>& alpha, int64_t row,
    int64_t col, at::opmath_type<scalar_t> x, at::opmath_type<scalar_t> t) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  LossAndGrad<acc_t> r;
  if constexpr (TK == TargetKind::kFloat) {
    const acc_t eps = static_cast<acc_t>(a.label_smoothing);
    r = focal_target<G>(x, t * (acc_t(1) - eps) + eps / 2, gamma, alpha);
  } else {
    const int64_t id = static_cast<const int64_t*>(a.targets)[row];
    if (id == a.ignore_index) return {acc_t(0), acc_t(0)};
    if (id < -1 || id >= a.cols) {
      // An invalid class id cannot raise without a host sync: make it impossible to miss.
      const acc_t nan = static_cast<acc_t>(NAN);
      return {nan, nan};
    }
    const bool positive = id == col;
    if constexpr (TK == TargetKind::kClassId) {
      r = focal_binary<G>(x, positive, gamma, alpha);
    } else {
      const acc_t eps = static_cast<acc_t>(a.label_smoothing);
      r = focal_target<G>(x, positive ? acc_t(1) - eps / 2 : eps / 2, gamma, alpha);
    }
  }
  acc_t w = acc_t(1);
  if (a.row_weight) w = static_cast<acc_t>(static_cast<const scalar_t*>(a.row_weight)[row]);
  if (a.elem_weight) {
    w *= static_cast<acc_t>(
        static_cast<const scalar_t*>(a.elem_weight)[row * a.elem_weight_row_stride + col]);
  }
  r.loss *= w;
  r.grad *= w;
  return r;
}

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// Each thread handles packs of kVec consecutive elements (16 bytes), read and written with 128-bit
// accesses when `aligned`; the last, partial pack falls back to element accesses.
template <typename scalar_t, TargetKind TK, GammaKind G>
__global__ void __launch_bounds__(kThreads)
    focal_kernel(KernelArgs a, bool aligned, const at::opmath_type<scalar_t>* __restrict__ scale_ptr,
                 at::opmath_type<scalar_t>* __restrict__ block_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, kVec>;
  const int64_t n = a.rows * a.cols;
  const acc_t scale = *scale_ptr;
  const AlphaWeights<acc_t> alpha = make_alpha<acc_t, acc_t>(a.alpha);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  const auto* t_all = static_cast<const scalar_t*>(a.targets);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  auto* grad_all = static_cast<scalar_t*>(a.grad);

  acc_t sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kVec;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec; base < n;
       base += stride) {
    const bool vector_io = aligned && base + kVec <= n;
    P x, t, loss, grad;
    if (vector_io) {
      x = *reinterpret_cast<const P*>(x_all + base);
      if constexpr (TK == TargetKind::kFloat) t = *reinterpret_cast<const P*>(t_all + base);
    } else {
      for (int j = 0; j < kVec; ++j) {
        if (base + j < n) {
          x.v[j] = x_all[base + j];
          if constexpr (TK == TargetKind::kFloat) t.v[j] = t_all[base + j];
        }
      }
    }
    int64_t row = base / a.cols;
    int64_t col = base - row * a.cols;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (base + j < n) {
        const acc_t tj = TK == TargetKind::kFloat ? static_cast<acc_t>(t.v[j]) : acc_t(0);
        const auto r = element<scalar_t, TK, G>(a, alpha, row, col, static_cast<acc_t>(x.v[j]), tj);
        sum += r.loss;
        loss.v[j] = static_cast<scalar_t>(r.loss * scale);
        grad.v[j] = static_cast<scalar_t>(r.grad * scale);
      }
      if (++col == a.cols) {
        col = 0;
        ++row;
      }
    }
    if (vector_io) {
      if (loss_all) *reinterpret_cast<P*>(loss_all + base) = loss;
      if (grad_all) *reinterpret_cast<P*>(grad_all + base) = grad;
    } else {
      for (int j = 0; j < kVec; ++j) {
        if (base + j < n) {
          if (loss_all) loss_all[base + j] = loss.v[j];
          if (grad_all) grad_all[base + j] = grad.v[j];
        }
      }
    }
  }
  if (block_sums) {
    using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
    __shared__ typename BlockReduce::TempStorage storage;
    const acc_t block_sum = BlockReduce(storage).Sum(sum);
    if (threadIdx.x == 0) block_sums[blockIdx.x] = block_sum;
  }
}

// out = scale * sum(block_sums), in an order fixed by the launch shape.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_blocks_kernel(const acc_t* __restrict__ block_sums, int blocks,
                      const acc_t* __restrict__ scale_ptr, acc_t* __restrict__ out) {
  acc_t sum = 0;
  for (int i = threadIdx.x; i < blocks; i += kThreads) sum += block_sums[i];
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const acc_t total = BlockReduce(storage).Sum(sum);
  if (threadIdx.x == 0) *out = total * *scale_ptr;
}

template <typename scalar_t, TargetKind TK>
void launch_for_target(const KernelArgs& a, GammaKind g, int blocks, bool aligned,
                       const at::opmath_type<scalar_t>* scale, at::opmath_type<scalar_t>* sums,
                       cudaStream_t stream) {
#define FOCAL_LAUNCH(KIND)                                                                  \
  focal_kernel<scalar_t, TK, KIND><<<blocks, kThreads, 0, stream>>>(a, aligned, scale, sums)
  switch (g) {
    case GammaKind::kZero: FOCAL_LAUNCH(GammaKind::kZero); break;
    case GammaKind::kOne: FOCAL_LAUNCH(GammaKind::kOne); break;
    case GammaKind::kTwo: FOCAL_LAUNCH(GammaKind::kTwo); break;
    default: FOCAL_LAUNCH(GammaKind::kGeneral); break;
  }
#undef FOCAL_LAUNCH
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& row_weight, const std::optional<at::Tensor>& normalizer,
    double alpha, double gamma, double label_smoothing, int64_t ignore_index,
    c10::string_view reduction, double scale, bool compute_grad) {
  const FocalCall call =
      make_call(logits, targets, weight, row_weight, normalizer, alpha, gamma, label_smoothing,
                ignore_index, std::string_view(reduction.data(), reduction.size()), scale,
                compute_grad);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t rows = call.rows(), cols = call.cols(), numel = rows * cols;
  const auto options = logits.options();
  const auto acc_options = options.dtype(at::toOpMathType(logits.scalar_type()));
  const bool reduce = call.reduction != Reduction::kNone;

  // The factor applied to loss and gradient, kept on the device: normalizer and class-id counts
  // may only be known there.
  at::Tensor scale_t = at::full({}, call.scale, acc_options);
  if (normalizer) scale_t = at::div(scale_t, normalizer->to(acc_options, /*non_blocking=*/true));
  if (call.reduction == Reduction::kMean) {
    if (call.class_ids()) {
      // At least one element in the denominator: a batch of ignored rows contributes 0.
      const at::Tensor kept = at::ne(targets, ignore_index).sum().clamp_min(1).to(acc_options);
      scale_t = at::div(scale_t, at::mul(kept, static_cast<double>(std::max<int64_t>(cols, 1))));
    } else {
      scale_t = at::div(scale_t, static_cast<double>(numel));
    }
  }

  const at::Tensor grad = compute_grad ? at::empty(logits.sizes(), options) : at::empty({0}, options);
  at::Tensor loss = reduce ? at::empty({}, acc_options) : at::empty(logits.sizes(), options);
  if (numel == 0) {
    if (reduce) loss.fill_(call.reduction == Reduction::kMean ? call.empty_mean() : 0.0);
    return {loss, grad};
  }
  const KernelArgs args = call.kernel_args(reduce ? at::Tensor() : loss, compute_grad ? grad : at::Tensor());

  const int elems_per_thread = 16 / static_cast<int>(logits.element_size());
  const int64_t packs = (numel + elems_per_thread - 1) / elems_per_thread;
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * kBlocksPerSm;
  const int blocks = static_cast<int>(std::min<int64_t>((packs + kThreads - 1) / kThreads, max_blocks));
  const bool aligned = aligned16(args.logits) && aligned16(args.loss) && aligned16(args.grad) &&
                       (call.class_ids() || aligned16(args.targets));
  const at::Tensor block_sums = reduce ? at::empty({blocks}, acc_options) : at::Tensor();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "focal_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* scale_ptr = scale_t.const_data_ptr<acc_t>();
    acc_t* sums = reduce ? block_sums.mutable_data_ptr<acc_t>() : nullptr;
    switch (args.target_kind) {
      case TargetKind::kClassId:
        launch_for_target<scalar_t, TargetKind::kClassId>(args, call.gamma_kind(), blocks, aligned,
                                                          scale_ptr, sums, stream);
        break;
      case TargetKind::kClassIdSmoothed:
        launch_for_target<scalar_t, TargetKind::kClassIdSmoothed>(
            args, call.gamma_kind(), blocks, aligned, scale_ptr, sums, stream);
        break;
      default:
        launch_for_target<scalar_t, TargetKind::kFloat>(args, call.gamma_kind(), blocks, aligned,
                                                        scale_ptr, sums, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (reduce) {
      sum_blocks_kernel<acc_t><<<1, kThreads, 0, stream>>>(sums, blocks, scale_ptr,
                                                           loss.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, grad};
}

void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_grad(grad, grad_output);
  grad.mul_(grad_output);
}

}  // namespace

TORCH_LIBRARY_IMPL(focal, CUDA, m) {
  m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
}

}  // namespace focal::cuda
