// CUDA backend of the elementwise losses (sigmoid_focal_loss, sigmoid_focal_loss_star,
// quality_focal_loss, varifocal_loss): outputs, the scale, grid sizing and the launches of the
// kernels in focal_kernels.cuh (FL*, QFL and VFL through family_cuda.cu). A reduced loss is summed
// per tile of the data and the tiles' sums are added in a fixed order by a second, one-block kernel
// (tile_sums.cuh; no atomics: bitwise reproducible, whatever the launch shape and grid). The host never reads device memory, so nothing here waits for
// the GPU and the op can be captured in a CUDA graph. Registered by register_cuda.cpp. Compiled by
// nvcc, and for tests as host C++ against the emulation (host_runtime.cuh, README.md).
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch.h>

#include "../focal_ops.h"
#include "cuda_ops.h"
#include "family_cuda.cuh"
#include "focal_kernels.cuh"
#include "host_runtime.cuh"
#include "variants.h"

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

}  // namespace

std::tuple<at::Tensor, at::Tensor> run_elementwise_loss(const FocalCall& call) {
  const at::Tensor& logits = call.logits;
  const bool compute_grad = call.compute_grad;
  const rt::DeviceGuard device_guard(logits.device());
  const int64_t rows = call.rows(), cols = call.cols(), numel = rows * cols;
  const auto options = logits.options();
  const bool reduce = call.reduction != Reduction::kNone;

  // The scale is passed by value; only what lives on the device is read there, by the kernels.
  at::Tensor normalizer_converted;
  ScaleArgs s = rt::scale_by_normalizer<ScaleArgs>(call.scale, call.normalizer, normalizer_converted);
  if (call.reduction == Reduction::kMean && !call.class_ids()) s.count = static_cast<double>(numel);

  const at::Tensor grad =
      compute_grad ? rt::empty(logits.sizes(), options) : rt::empty({0}, options);
  at::Tensor loss = reduce ? rt::empty({}, options.dtype(call.reduced_dtype()))
                           : rt::empty(logits.sizes(), options);
  if (numel == 0) {
    if (reduce) loss.fill_(call.reduction == Reduction::kMean ? call.empty_mean() : 0.0);
    return {loss, grad};
  }

  const rt::Stream stream = rt::current_stream();
  at::Tensor kept_rows;
  if (call.reduction == Reduction::kMean && call.class_ids()) {
    // The one launch beyond the loss kernels: the count is only known on the device.
    kept_rows = rt::empty({}, options.dtype(at::kLong));
    rt::launch(&count_kept_rows_kernel, 1, kThreads, stream, call.targets.const_data_ptr<int64_t>(),
               rows, call.ignore_index, kept_rows.mutable_data_ptr<int64_t>());
    s.kept_rows = kept_rows.const_data_ptr<int64_t>();
    s.cols = cols;
  }

  const KernelArgs args = call.kernel_args(reduce ? at::Tensor() : loss, compute_grad ? grad : at::Tensor());
  const bool aligned = aligned16(args.logits) && aligned16(args.loss) && aligned16(args.grad) &&
                       (call.class_ids() || aligned16(args.targets));

  // The roofline kernel takes the loss of dense detection (focal_ids_kernel), a row-free one takes
  // unweighted float targets (focal_float_kernel); everything else the general one.
  // QFL and VFL with class ids and scores take the roofline kernel too: their negatives are the
  // focal loss's.
  const bool focal = call.loss_kind == LossKind::kFocal;
  const bool ids_targets = focal ? args.target_kind == TargetKind::kClassId
                                 : args.target_kind == TargetKind::kClassIdScore;
  // A tensor alpha, like a per-element weight, takes the general kernel; so does a background_index
  // other than -1 and cols (RowWalk::ids_from).
  // It tests class ids in 32 bits, so the ignore_index too must fit.
  const bool ids_kernel = ids_targets && reduce && aligned && args.elem_weight == nullptr &&
                          args.class_alpha == nullptr &&
                          (args.background_index == -1 || args.background_index == cols) &&
                          args.ignore_index == static_cast<int32_t>(args.ignore_index) &&
                          numel <= kIdsKernelElements;  // 32-bit element indices
  const bool float_kernel = focal && args.target_kind == TargetKind::kFloat && aligned &&
                            args.row_weight == nullptr && args.elem_weight == nullptr &&
                            args.class_alpha == nullptr && args.label_smoothing == 0.0 &&
                            numel / (16 / logits.element_size()) < (int64_t{1} << 31);  // 32-bit packs

  const int shape_index =
      variant_index({"FOCAL_CUDA_VARIANT", kLaunchShapeNames, kLaunchShapeCount}, arch_variants().shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "focal_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* sums = nullptr;
    at::Tensor partial_sums;
    // The sums of a reduced loss, one per tile.
    const auto sums_of = [&](int64_t count) {
      if (reduce) {
        partial_sums = rt::empty({count}, options.dtype(call.reduced_dtype()));
        sums = partial_sums.mutable_data_ptr<acc_t>();
      }
      return count;
    };
    int64_t partials = 0;
    if (ids_kernel || float_kernel) {
      with_launch_shape_for<scalar_t>(focal ? shape_index : 0, [&](auto shape) {
        using Shape = decltype(shape);
        partials = sums_of(tile_count<scalar_t>(numel));
        const int blocks = tile_blocks<Shape>(partials, max_blocks(Shape::kBlocksPerSm));
        const RowWalk walk = RowWalk::make(ids_kernel ? cols : 1, args.background_index, args.row_weight != nullptr);
        if (!focal) {  // QFL and VFL: the default shape only (FOCAL_CUDA_VARIANT does not apply)
          if constexpr (std::is_same_v<Shape, DefaultLaunchShapeFor<scalar_t>>) {
            launch_family_ids_kernel(args, logits.scalar_type(), call.gamma_kind(), walk, s, sums, blocks,
                                     stream);
          }
          return;
        }
        with_gamma_kind(call.gamma_kind(), [&](auto gamma_kind) {
          constexpr GammaKind G = decltype(gamma_kind)::value;
          if (ids_kernel) {
            rt::launch(&focal_ids_kernel<scalar_t, G, LossKind::kFocal, Shape>, blocks, Shape::kThreads,
                       stream, args, s, walk, sums);
          } else {
            rt::launch(&focal_float_kernel<scalar_t, G, Shape>, blocks, Shape::kThreads, stream, args, s,
                       sums);
          }
        });
      });
    } else {
      partials = sums_of(tile_count<scalar_t>(numel));
      const int blocks = tile_blocks<LaunchShape<kThreads, 16, kBlocksPerSm<scalar_t>>>(
          partials, max_blocks(kBlocksPerSm<scalar_t>));
      if (!focal) {
        launch_family_kernel(args, logits.scalar_type(), call.gamma_kind(), aligned, s, sums, blocks, stream);
      } else {
        with_gamma_kind(call.gamma_kind(), [&](auto gamma_kind) {
          constexpr GammaKind G = decltype(gamma_kind)::value;
          constexpr LossKind L = LossKind::kFocal;
          if (args.target_kind == TargetKind::kClassId) {
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
    }
    if (reduce) {
      rt::launch(&sum_blocks_kernel<acc_t, ScaleArgs>, 1, kSumThreads, stream, sums, static_cast<int>(partials),
                 s, loss.mutable_data_ptr<acc_t>());
    }
  });
  return {loss, grad};
}

}  // namespace focal::cuda
