// CUDA backend of the elementwise losses (sigmoid_focal_loss, sigmoid_focal_loss_star,
// quality_focal_loss, varifocal_loss): outputs, the scale, grid sizing and the launches of the
// kernels in focal_kernels.cuh (FL*, QFL and VFL through family_cuda.cu). A reduced loss is summed
// per block with CUB and the block sums are added in a fixed order by a second, one-block kernel
// (no atomics: bitwise reproducible). The host never reads device memory, so nothing here waits for the GPU and the op
// can be captured in a CUDA graph. Compiled by nvcc, and for tests as host C++ against the
// emulation (host_runtime.cuh, README.md).
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../focal_ops.h"
#include "../loss_ops.h"
#include "family_cuda.cuh"
#include "focal_kernels.cuh"
#include "host_runtime.cuh"

namespace focal::cuda {
namespace {

// *out = the number of rows whose class id is not ignore_index (the "mean" of class-id targets).
__global__ void __launch_bounds__(kThreads)
    count_kept_rows_kernel(const int64_t* __restrict__ ids, int64_t rows, int64_t ignore_index,
                           int64_t* __restrict__ out) {
  int64_t kept = 0;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) kept += ids[r] != ignore_index ? 1 : 0;
  using BlockReduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const int64_t total = BlockReduce(storage).Sum(kept);
  if (threadIdx.x == 0) *out = total;
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Loss and gradient of any elementwise loss of the family, from checked arguments.
std::tuple<at::Tensor, at::Tensor> run(const FocalCall& call) {
  const at::Tensor& logits = call.logits;
  const at::Tensor& targets = call.targets;
  const bool compute_grad = call.compute_grad;
  const int64_t ignore_index = call.ignore_index;
  const rt::DeviceGuard device_guard(logits.device());
  const int64_t rows = call.rows(), cols = call.cols(), numel = rows * cols;
  const auto options = logits.options();
  const bool reduce = call.reduction != Reduction::kNone;

  // The scale is passed by value; only what lives on the device is read there, by the kernels.
  ScaleArgs s;
  at::Tensor normalizer_converted;
  if (call.normalizer && !rt::resides_on_host(*call.normalizer)) {
    s.factor = call.scale;
    s.normalizer = rt::scalar_ref(*call.normalizer, normalizer_converted);
  } else {
    s.factor = call.host_scale();  // reads and checks a CPU normaliser
  }
  if (call.reduction == Reduction::kMean && !call.class_ids()) s.count = static_cast<double>(numel);

  const at::Tensor grad =
      compute_grad ? at::empty(logits.sizes(), options) : at::empty({0}, options);
  at::Tensor loss = reduce ? at::empty({}, options.dtype(call.reduced_dtype()))
                           : at::empty(logits.sizes(), options);
  if (numel == 0) {
    if (reduce) loss.fill_(call.reduction == Reduction::kMean ? call.empty_mean() : 0.0);
    return {loss, grad};
  }

  const rt::Stream stream = rt::current_stream();
  at::Tensor kept_rows;
  if (call.reduction == Reduction::kMean && call.class_ids()) {
    // The one launch beyond the loss kernels: the count is only known on the device.
    kept_rows = at::empty({}, options.dtype(at::kLong));
    rt::launch(&count_kept_rows_kernel, 1, kThreads, stream, targets.const_data_ptr<int64_t>(),
               rows, ignore_index, kept_rows.mutable_data_ptr<int64_t>());
    s.kept_rows = kept_rows.const_data_ptr<int64_t>();
    s.cols = cols;
  }

  const KernelArgs args =
      call.kernel_args(reduce ? at::Tensor() : loss, compute_grad ? grad : at::Tensor());
  const bool aligned = aligned16(args.logits) && aligned16(args.loss) && aligned16(args.grad) &&
                       (call.class_ids() || aligned16(args.targets));
  const int64_t multiprocessors = rt::multiprocessor_count();

  // The roofline kernel takes the loss of dense detection (focal_ids_kernel), a row-free one takes
  // unweighted float targets (focal_float_kernel); everything else the general one.
  // QFL and VFL with class ids and scores take the roofline kernel too: their negatives are the
  // focal loss's.
  const bool focal = call.loss_kind == LossKind::kFocal;
  const bool ids_targets = focal ? args.target_kind == TargetKind::kClassId
                                 : args.target_kind == TargetKind::kClassIdScore;
  const bool ids_kernel = ids_targets && reduce && aligned && args.row_weight == nullptr &&
                          args.elem_weight == nullptr &&
                          cols < (int64_t{1} << 30);  // its columns are 32-bit
  const bool float_kernel = focal && args.target_kind == TargetKind::kFloat && aligned &&
                            args.row_weight == nullptr && args.elem_weight == nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "focal_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t per_thread = ids_kernel ? kIdsChunk<scalar_t> : 16 / sizeof(scalar_t);
    const int blocks = grid_blocks((numel + per_thread - 1) / per_thread,
                                   multiprocessors * kBlocksPerSm<scalar_t>);
    const at::Tensor block_sums =
        reduce ? at::empty({blocks}, options.dtype(call.reduced_dtype())) : at::Tensor();
    acc_t* sums = reduce ? block_sums.mutable_data_ptr<acc_t>() : nullptr;
    if (!focal) {
      launch_family_kernel(args, logits.scalar_type(), call.gamma_kind(), ids_kernel, aligned, s, sums,
                           blocks, stream);
    } else {
      with_gamma_kind(call.gamma_kind(), [&](auto gamma_kind) {
        constexpr GammaKind G = decltype(gamma_kind)::value;
        constexpr LossKind L = LossKind::kFocal;
        if (ids_kernel) {
          rt::launch(&focal_ids_kernel<scalar_t, G, L>, blocks, kThreads, stream, args, s, sums);
        } else if (float_kernel) {
          rt::launch(&focal_float_kernel<scalar_t, G>, blocks, kThreads, stream, args, s, sums);
        } else if (args.target_kind == TargetKind::kClassId) {
          rt::launch(&focal_kernel<scalar_t, TargetKind::kClassId, G, L>, blocks, kThreads, stream,
                     args, aligned, s, sums);
        } else if (args.target_kind == TargetKind::kClassIdSmoothed) {
          rt::launch(&focal_kernel<scalar_t, TargetKind::kClassIdSmoothed, G, L>, blocks, kThreads,
                     stream, args, aligned, s, sums);
        } else {
          rt::launch(&focal_kernel<scalar_t, TargetKind::kFloat, G, L>, blocks, kThreads, stream,
                     args, aligned, s, sums);
        }
      });
    }
    if (reduce) {
      rt::launch(&sum_blocks_kernel<acc_t>, 1, kThreads, stream, sums, blocks, s,
                 loss.mutable_data_ptr<acc_t>());
    }
  });
  return {loss, grad};
}

}  // namespace

FOCAL_CUDA_REGISTER_KERNELS(m) { LossOps<&run>::register_on(m); }

}  // namespace focal::cuda
