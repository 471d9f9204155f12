// CUDA backend of softmax_focal_loss: kernels and host code. The math is csrc/softmax_math.h with
// scalar float (float64 for float64 data) and libm's primitives.
//
// Two kernels, by layout:
// - softmax_elements_kernel: one thread per element (n, position), its classes `inner` apart, so
//   neighbouring threads read neighbouring addresses in every pass: segmentation logits
//   (N, C, H, W), and rows of at most kThreadRowClasses classes, where a row is short enough for
//   one thread (the three passes then hit L1);
// - softmax_rows_kernel: one block per row (grid-stride), for longer rows: the row's maximum and
//   exp sum by cub::BlockReduce, each thread striding over the row's classes.
// A reduced loss is summed per block and the block sums are added in a fixed order by a one-block
// kernel: no atomics, bitwise reproducible. The "mean" denominator and a normaliser in device memory
// are read by the kernels, so the host never waits for the GPU. Registered by register_cuda.cpp.
// Compiled by nvcc, and for tests as host C++ against the emulation (kernel_runtime.cuh, README.md).
#include <cfloat>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../softmax_math.h"
#include "../softmax_ops.h"
#include "cuda_ops.h"
#include "host_runtime.cuh"
#include "kernel_runtime.cuh"

namespace focal::cuda {
namespace {

constexpr int kSoftmaxThreads = 128;
constexpr int kSoftmaxBlocksPerSm = 8;
// Rows up to this many classes take one thread each.
constexpr int64_t kThreadRowClasses = 32;

// The factor of every loss and gradient element, in double: factor / normaliser / denominator,
// where the last two may live in device memory.
struct SoftmaxScale {
  double factor = 1.0;                 // scale * alpha, divided by a normaliser the host read
  ScalarRef normalizer;                // a normaliser in device memory, or absent
  const double* denominator = nullptr;  // the "mean" denominator in device memory, or absent
};

__device__ __forceinline__ double resolve(const SoftmaxScale& s) {
  double f = s.factor;
  if (s.normalizer.ptr != nullptr) {
    const double v = load(s.normalizer);
    // The host cannot check a value it never reads: an invalid normaliser poisons the result.
    f = v > 0.0 && v <= DBL_MAX ? f / v : static_cast<double>(NAN);
  }
  if (s.denominator != nullptr) f /= *s.denominator;
  return f;
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return softmax_max<T, Ops<T>>(a, b);
  }
};

// *out = the sum of weight[id] over the elements whose id is not ignore_index (their number
// without a weight), or 1 when there is none. An out-of-range id has no weight: NaN.
template <typename weight_t>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_denominator_kernel(const int64_t* __restrict__ ids, int64_t count, int64_t classes,
                               int64_t ignore_index, const weight_t* __restrict__ weight,
                               double* __restrict__ out) {
  double total = 0;
  double kept = 0;
  for (int64_t i = threadIdx.x; i < count; i += kSoftmaxThreads) {
    const int64_t id = ids[i];
    if (id == ignore_index) continue;
    kept += 1;
    if (id < 0 || id >= classes) {
      total += static_cast<double>(NAN);
    } else {
      total += weight ? static_cast<double>(weight[id]) : 1.0;
    }
  }
  using BlockReduce = cub::BlockReduce<double, kSoftmaxThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const double sum = BlockReduce(storage).Sum(total);
  __syncthreads();
  const double kept_sum = BlockReduce(storage).Sum(kept);
  if (threadIdx.x == 0) *out = kept_sum > 0 ? sum : 1.0;
}

// q_c a_c for class c of an element of class `id`.
template <typename acc_t>
__device__ __forceinline__ acc_t class_weight(const SoftmaxArgs& a, int64_t c, int64_t id, acc_t q_target,
                                             acc_t q_other) {
  const acc_t q = c == id ? q_target : q_other;
  const auto* factor = static_cast<const acc_t*>(a.class_factor);
  return factor ? q * factor[c] : q;
}

template <typename scalar_t, GammaKind G, bool kSmooth>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_elements_kernel(SoftmaxArgs a, SoftmaxScale s, at::opmath_type<scalar_t>* __restrict__ block_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using O = Ops<acc_t>;
  const acc_t scale = static_cast<acc_t>(resolve(s));
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const int64_t C = a.classes, inner = a.inner, elements = a.outer * a.inner;
  const acc_t q_other = static_cast<acc_t>(a.label_smoothing / static_cast<double>(C));
  const acc_t q_target = static_cast<acc_t>(1.0 - a.label_smoothing) + q_other;
  const auto* factor = static_cast<const acc_t*>(a.class_factor);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  auto* grad_all = static_cast<scalar_t*>(a.grad);
  auto* loss_all = static_cast<scalar_t*>(a.loss);

  acc_t sum = 0;
  int64_t touched = 0;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kSoftmaxThreads + threadIdx.x; e < elements;
       e += static_cast<int64_t>(gridDim.x) * kSoftmaxThreads) {
    const int64_t n = e / inner, pos = e - n * inner;
    const scalar_t* x = x_all + n * C * inner + pos;
    scalar_t* grad = grad_all ? grad_all + n * C * inner + pos : nullptr;
    const int64_t id = a.target[e];
    touched += C;
    if (id == a.ignore_index) {
      if (loss_all) loss_all[e] = scalar_t(0);
      if (grad) {
        for (int64_t c = 0; c < C; ++c) grad[c * inner] = scalar_t(0);
      }
      continue;
    }
    const bool valid = id >= 0 && id < C;  // else NaN: checking would need a host sync
    acc_t m = static_cast<acc_t>(x[0]);
    for (int64_t c = 1; c < C; ++c) m = softmax_max<acc_t, O>(m, static_cast<acc_t>(x[c * inner]));
    SoftmaxSums<acc_t> sums;
    for (int64_t c = 0; c < C; ++c) softmax_accumulate<acc_t, O>(sums, static_cast<acc_t>(x[c * inner]) - m);
    if (!valid) sums.below = static_cast<acc_t>(NAN);
    const SoftmaxRow<acc_t> row = softmax_row<acc_t, O>(m, sums.below, sums.ties);

    acc_t loss = 0;
    if constexpr (!kSmooth) {
      const SoftmaxProb<acc_t> py = softmax_prob<acc_t, O>(row, valid ? static_cast<acc_t>(x[id * inner]) : m);
      const FocalTerm<acc_t> term = softmax_focal_term<G, acc_t, O>(py, gamma);
      const acc_t fy = factor && valid ? factor[id] : acc_t(1);
      loss = fy * term.value;
      if (grad) {
        const acc_t t_y = fy * term.slope;
        const acc_t k = -t_y * row.inv_total * scale;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t g = c == id ? t_y * py.one_minus_p * scale
                                  : O::exp(static_cast<acc_t>(x[c * inner]) - m) * k;
          grad[c * inner] = static_cast<scalar_t>(g);
        }
      }
    } else {
      acc_t sum_t = 0;
      for (int64_t c = 0; c < C; ++c) {
        const SoftmaxProb<acc_t> prob = softmax_prob<acc_t, O>(row, static_cast<acc_t>(x[c * inner]));
        const FocalTerm<acc_t> term = softmax_focal_term<G, acc_t, O>(prob, gamma);
        const acc_t qa = class_weight<acc_t>(a, c, id, q_target, q_other);
        loss = O::fmadd(qa, term.value, loss);
        sum_t = O::fmadd(qa, term.slope, sum_t);
      }
      if (grad) {
        for (int64_t c = 0; c < C; ++c) {
          const SoftmaxProb<acc_t> prob = softmax_prob<acc_t, O>(row, static_cast<acc_t>(x[c * inner]));
          const FocalTerm<acc_t> term = softmax_focal_term<G, acc_t, O>(prob, gamma);
          const acc_t t = class_weight<acc_t>(a, c, id, q_target, q_other) * term.slope;
          grad[c * inner] = static_cast<scalar_t>(softmax_grad<acc_t, O>(prob, t, sum_t) * scale);
        }
      }
    }
    if (loss_all) loss_all[e] = static_cast<scalar_t>(loss * scale);
    else sum = add_rn(sum, loss);
  }
  trace_elements(touched);
  if (block_sums != nullptr) {
    using BlockReduce = cub::BlockReduce<acc_t, kSoftmaxThreads>;
    __shared__ typename BlockReduce::TempStorage storage;
    const acc_t total = BlockReduce(storage).Sum(sum);
    if (threadIdx.x == 0) block_sums[blockIdx.x] = total;
  }
}

template <typename scalar_t, GammaKind G, bool kSmooth>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_rows_kernel(SoftmaxArgs a, SoftmaxScale s, at::opmath_type<scalar_t>* __restrict__ block_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using O = Ops<acc_t>;
  using BlockReduce = cub::BlockReduce<acc_t, kSoftmaxThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  __shared__ acc_t broadcast[2];
  const acc_t scale = static_cast<acc_t>(resolve(s));
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const int64_t C = a.classes;
  const acc_t q_other = static_cast<acc_t>(a.label_smoothing / static_cast<double>(C));
  const acc_t q_target = static_cast<acc_t>(1.0 - a.label_smoothing) + q_other;
  const auto* factor = static_cast<const acc_t*>(a.class_factor);
  const int tid = threadIdx.x;

  // Every thread of the block reduces `value`; all of them get the result.
  const auto block_sum = [&](acc_t value) {
    const acc_t total = BlockReduce(storage).Sum(value);
    if (tid == 0) broadcast[0] = total;
    __syncthreads();
    const acc_t result = broadcast[0];
    __syncthreads();
    return result;
  };

  acc_t sum = 0;  // thread 0's: the block's rows' losses, in row order
  int64_t touched = 0;
  for (int64_t r = blockIdx.x; r < a.outer; r += gridDim.x) {
    const scalar_t* x = static_cast<const scalar_t*>(a.logits) + r * C;
    scalar_t* grad = a.grad ? static_cast<scalar_t*>(a.grad) + r * C : nullptr;
    const int64_t id = a.target[r];
    if (tid < C) touched += (C - 1 - tid) / kSoftmaxThreads + 1;
    if (id == a.ignore_index) {  // the same branch for the whole block
      if (a.loss && tid == 0) static_cast<scalar_t*>(a.loss)[r] = scalar_t(0);
      if (grad) {
        for (int64_t c = tid; c < C; c += kSoftmaxThreads) grad[c] = scalar_t(0);
      }
      continue;
    }
    const bool valid = id >= 0 && id < C;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = tid; c < C; c += kSoftmaxThreads) m = softmax_max<acc_t, O>(m, static_cast<acc_t>(x[c]));
    m = BlockReduce(storage).Reduce(m, MaxOp{});
    if (tid == 0) broadcast[1] = m;
    __syncthreads();
    m = broadcast[1];
    __syncthreads();
    SoftmaxSums<acc_t> sums;
    for (int64_t c = tid; c < C; c += kSoftmaxThreads) {
      softmax_accumulate<acc_t, O>(sums, static_cast<acc_t>(x[c]) - m);
    }
    const acc_t below = block_sum(sums.below);
    const acc_t ties = block_sum(sums.ties);
    const SoftmaxRow<acc_t> row =
        softmax_row<acc_t, O>(m, valid ? below : static_cast<acc_t>(NAN), ties);

    acc_t loss;
    if constexpr (!kSmooth) {
      const SoftmaxProb<acc_t> py = softmax_prob<acc_t, O>(row, valid ? static_cast<acc_t>(x[id]) : m);
      const FocalTerm<acc_t> term = softmax_focal_term<G, acc_t, O>(py, gamma);
      const acc_t fy = factor && valid ? factor[id] : acc_t(1);
      loss = fy * term.value;
      if (grad) {
        const acc_t t_y = fy * term.slope;
        const acc_t k = -t_y * row.inv_total * scale;
        for (int64_t c = tid; c < C; c += kSoftmaxThreads) {
          const acc_t g = c == id ? t_y * py.one_minus_p * scale : O::exp(static_cast<acc_t>(x[c]) - m) * k;
          grad[c] = static_cast<scalar_t>(g);
        }
      }
    } else {
      acc_t part_loss = 0, part_t = 0;
      for (int64_t c = tid; c < C; c += kSoftmaxThreads) {
        const SoftmaxProb<acc_t> prob = softmax_prob<acc_t, O>(row, static_cast<acc_t>(x[c]));
        const FocalTerm<acc_t> term = softmax_focal_term<G, acc_t, O>(prob, gamma);
        const acc_t qa = class_weight<acc_t>(a, c, id, q_target, q_other);
        part_loss = O::fmadd(qa, term.value, part_loss);
        part_t = O::fmadd(qa, term.slope, part_t);
      }
      loss = block_sum(part_loss);
      const acc_t sum_t = block_sum(part_t);
      if (grad) {
        for (int64_t c = tid; c < C; c += kSoftmaxThreads) {
          const SoftmaxProb<acc_t> prob = softmax_prob<acc_t, O>(row, static_cast<acc_t>(x[c]));
          const FocalTerm<acc_t> term = softmax_focal_term<G, acc_t, O>(prob, gamma);
          const acc_t t = class_weight<acc_t>(a, c, id, q_target, q_other) * term.slope;
          grad[c] = static_cast<scalar_t>(softmax_grad<acc_t, O>(prob, t, sum_t) * scale);
        }
      }
    }
    if (tid == 0) {
      if (a.loss) static_cast<scalar_t*>(a.loss)[r] = static_cast<scalar_t>(loss * scale);
      else sum = add_rn(sum, loss);
    }
  }
  trace_elements(touched);
  if (block_sums != nullptr && tid == 0) block_sums[blockIdx.x] = sum;
}

// *out = scale * (sum of block_sums), in an order fixed by `blocks`.
template <typename acc_t>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_sum_blocks_kernel(const acc_t* __restrict__ block_sums, int blocks, SoftmaxScale s,
                              acc_t* __restrict__ out) {
  acc_t sum = 0;
  for (int i = threadIdx.x; i < blocks; i += kSoftmaxThreads) sum = add_rn(sum, block_sums[i]);
  using BlockReduce = cub::BlockReduce<acc_t, kSoftmaxThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const acc_t total = BlockReduce(storage).Sum(sum);
  if (threadIdx.x == 0) *out = static_cast<acc_t>(static_cast<double>(total) * resolve(s));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> softmax_focal_loss(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& normalizer,
    double alpha_value, double gamma, double label_smoothing, int64_t ignore_index,
    c10::string_view reduction, double scale, bool compute_grad) {
  const SoftmaxCall call = make_softmax_call(
      logits, target, weight, alpha, normalizer, alpha_value, gamma, label_smoothing, ignore_index,
      std::string_view(reduction.data(), reduction.size()), scale, compute_grad);
  const rt::DeviceGuard device_guard(logits.device());
  const auto options = logits.options();
  const bool reduce = call.reduction != Reduction::kNone;
  const int64_t elements = call.outer() * call.inner();

  SoftmaxScale s;
  at::Tensor normalizer_converted;
  if (call.normalizer && !rt::resides_on_host(*call.normalizer)) {
    s.factor = call.scale * call.alpha_value;
    s.normalizer = rt::scalar_ref(*call.normalizer, normalizer_converted);
  } else {
    s.factor = call.host_scale();  // reads and checks a CPU normaliser
  }

  const at::Tensor grad = compute_grad ? rt::empty(logits.sizes(), options) : rt::empty({0}, options);
  at::Tensor loss = reduce ? rt::empty({}, options.dtype(call.math_dtype())) : rt::empty(target.sizes(), options);
  if (elements == 0) {
    if (reduce) loss.fill_(0.0);
    return {loss, grad};
  }
  const rt::Stream stream = rt::current_stream();
  at::Tensor denominator;
  if (call.reduction == Reduction::kMean) {
    denominator = rt::empty({}, options.dtype(at::kDouble));
    const int64_t* ids = target.const_data_ptr<int64_t>();
    double* out = denominator.mutable_data_ptr<double>();
    if (call.weight) {
      const at::Tensor w = call.weight->to(at::kDouble).contiguous();
      rt::launch(&softmax_denominator_kernel<double>, 1, kSoftmaxThreads, stream, ids, elements,
                 call.classes(), ignore_index, w.const_data_ptr<double>(), out);
    } else {
      rt::launch(&softmax_denominator_kernel<double>, 1, kSoftmaxThreads, stream, ids, elements,
                 call.classes(), ignore_index, static_cast<const double*>(nullptr), out);
    }
    s.denominator = denominator.const_data_ptr<double>();
  }
  const at::Tensor factor = call.class_factor();
  const SoftmaxArgs args = call.kernel_args(factor, reduce ? at::Tensor() : loss,
                                            compute_grad ? grad : at::Tensor());
  const bool per_thread = call.inner() > 1 || call.classes() <= kThreadRowClasses;
  const int64_t max_blocks = int64_t{rt::multiprocessor_count()} * kSoftmaxBlocksPerSm;
  const int64_t wanted = per_thread ? (elements + kSoftmaxThreads - 1) / kSoftmaxThreads : call.outer();
  const int blocks = static_cast<int>(wanted < max_blocks ? wanted : max_blocks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_focal_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor block_sums = reduce ? rt::empty({blocks}, options.dtype(call.math_dtype())) : at::Tensor();
    acc_t* sums = reduce ? block_sums.mutable_data_ptr<acc_t>() : nullptr;
    with_gamma_kind(call.gamma_kind(), [&](auto gamma_kind) {
      constexpr GammaKind G = decltype(gamma_kind)::value;
      const auto run = [&](auto smooth) {
        constexpr bool kSmooth = decltype(smooth)::value;
        if (per_thread) {
          rt::launch(&softmax_elements_kernel<scalar_t, G, kSmooth>, blocks, kSoftmaxThreads, stream, args, s, sums);
        } else {
          rt::launch(&softmax_rows_kernel<scalar_t, G, kSmooth>, blocks, kSoftmaxThreads, stream, args, s, sums);
        }
      };
      if (label_smoothing > 0) run(std::true_type{});
      else run(std::false_type{});
    });
    if (reduce) {
      rt::launch(&softmax_sum_blocks_kernel<acc_t>, 1, kSoftmaxThreads, stream, sums, blocks, s,
                 loss.mutable_data_ptr<acc_t>());
    }
  });
  return {loss, grad};
}

}  // namespace focal::cuda
