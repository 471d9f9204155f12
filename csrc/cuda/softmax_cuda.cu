// CUDA backend of softmax_focal_loss: the host code that launches the kernels of
// softmax_kernels.cuh. A reduced loss is summed per tile of the data and the tiles' sums are added
// in a fixed order by a one-block kernel (tile_sums.cuh): no atomics, bitwise reproducible for every
// variant and grid size. The "mean" denominator and a normaliser in device memory are read by the
// kernels, so the host never waits for the GPU. Registered by register_cuda.cpp. Compiled by nvcc,
// and for tests as host C++ against the emulation (host_runtime.cuh, README.md).
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../softmax_ops.h"
#include "cuda_ops.h"
#include "host_runtime.cuh"
#include "softmax_kernels.cuh"
#include "variants.h"

namespace focal::cuda {

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
  const ArchVariants table = arch_variants();
  const int variant = variant_index({"FOCAL_CUDA_SOFTMAX_VARIANT", kSoftmaxVariantNames, kSoftmaxVariantCount},
                                    table.softmax);
  const int rows_variant = variant_index(
      {"FOCAL_CUDA_SOFTMAX_ROWS_VARIANT", kRowVariantNames, kRowVariantCount}, table.softmax_rows);

  at::Tensor normalizer_converted;
  SoftmaxScale s =
      rt::scale_by_normalizer<SoftmaxScale>(call.scale * call.alpha_value, call.normalizer, normalizer_converted);

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
  SoftmaxArgs args = call.kernel_args(factor, reduce ? at::Tensor() : loss, compute_grad ? grad : at::Tensor());
  at::Tensor no_classes;
  if (call.classes() == 0) {
    // Every id not ignored is out of range, which gives NaN without reading a logit but the first
    // class's, which the thread-per-element kernel reads before it knows: zeros to read there.
    no_classes = rt::empty({call.inner()}, options);
    no_classes.fill_(0.0);
    args.logits = no_classes.const_data_ptr();
  }
  // The layout and the number of classes pick the kernel (so the order of every sum).
  const bool per_thread = call.inner() > 1 || call.classes() <= kThreadRowClasses;
  // (The warp-per-row kernel counts rows in 32 bits.)
  const bool warp_rows = !per_thread && call.classes() <= kWarpRowClasses && call.outer() < (int64_t{1} << 31);
  // Tiles of a warp's elements, or of rows (of whole rounds of the rows a warp takes at a time: two
  // with 16 lanes per row, so that no group idles for want of a row but at the end); as many blocks
  // as they fill, up to one wave of as many as the kernel's registers let an SM hold.
  const int64_t round_rows = warp_rows ? kWarp / warp_row_lanes(call.classes()) : 1;
  const SoftmaxTiles tiles =
      per_thread ? SoftmaxTiles::make(elements, kWarp) : SoftmaxTiles::make(call.outer(), round_rows);
  const int64_t tiles_per_block = per_thread || warp_rows ? kSoftmaxThreads / kWarp : 1;
  const int64_t wanted = (tiles.count + tiles_per_block - 1) / tiles_per_block;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_focal_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor tile_sums = reduce ? rt::empty({tiles.count}, options.dtype(call.math_dtype())) : at::Tensor();
    acc_t* sums = reduce ? tile_sums.mutable_data_ptr<acc_t>() : nullptr;
    const auto run_kernel = [&](auto kernel, auto... more) {
      const int64_t most = max_blocks(rt::resident_blocks(kernel, kSoftmaxThreads));
      const int blocks = static_cast<int>(wanted < most ? wanted : most);
      rt::launch(kernel, blocks, kSoftmaxThreads, stream, args, s, tiles, more..., sums);
    };
    with_gamma_kind(call.gamma_kind(), [&](auto gamma_kind) {
      constexpr GammaKind G = decltype(gamma_kind)::value;
      const auto run = [&](auto smooth) {
        constexpr bool kSmooth = decltype(smooth)::value;
        if (per_thread) {
          // float64 and label smoothing, whose math takes the registers (a chunk would spill), load
          // one class at a time in every variant; the ring takes the layouts it fits.
          constexpr bool kOneByOne = sizeof(scalar_t) == 8 || kSmooth;
          bool ring = false;
          if constexpr (!kOneByOne) {
            const std::optional<ElementLayout> layout =
                variant == kSoftmaxRingVariant
                    ? ElementSteps::layout_of(call.outer(), call.classes(), call.inner(), sizeof(scalar_t), args.logits)
                    : std::nullopt;
            if (layout) {
              const ElementSteps steps = ElementSteps::make(call.classes(), call.inner(), sizeof(scalar_t));
              if (*layout == ElementLayout::kRows) {
                run_kernel(&softmax_elements_ring_kernel<scalar_t, G, ElementLayout::kRows>, steps);
              } else if (*layout == ElementLayout::kPixelPieces) {
                run_kernel(&softmax_elements_ring_kernel<scalar_t, G, ElementLayout::kPixelPieces>, steps);
              } else {
                run_kernel(&softmax_elements_ring_kernel<scalar_t, G, ElementLayout::kPixelWords>, steps);
              }
              ring = true;
            }
          }
          if (!ring) {
            with_softmax_chunk(kOneByOne ? 0 : variant, [&](auto chunk) {
              constexpr int kChunk = kOneByOne ? 1 : decltype(chunk)::value;
              run_kernel(&softmax_elements_kernel<scalar_t, G, kSmooth, kChunk>);
            });
          }
        } else {
          // The rings copy whole 16-byte blocks, from the one that holds a tile's first logit: for
          // logits that are not 16-byte aligned, the first tile's block begins before them, maybe
          // outside their memory. float64's rows, and the block-per-row kernel's rows of more than
          // 8 KiB, span more of a ring's steps than it allows; its tiles' bytes are counted in 32 bits.
          const int64_t row_bytes = call.classes() * static_cast<int64_t>(sizeof(scalar_t));
          const bool ring_fits = sizeof(scalar_t) <= 4 && reinterpret_cast<uintptr_t>(args.logits) % 16 == 0 &&
                                 (warp_rows || (row_bytes <= BlockRowRing::kRoundBytes &&
                                                tiles.per_tile * row_bytes < (int64_t{1} << 31)));
          with_row_variant(ring_fits ? rows_variant : 0, [&](auto through_ring) {
            constexpr bool kRing = decltype(through_ring)::value && sizeof(scalar_t) <= 4;
            if (!warp_rows) {
              run_kernel(&softmax_rows_kernel<scalar_t, G, kSmooth, kRing>);
            } else if (warp_row_lanes(call.classes()) < kWarp) {
              run_kernel(&softmax_warp_rows_kernel<scalar_t, G, kSmooth, kWarp / 2, kRing>);
            } else {
              run_kernel(&softmax_warp_rows_kernel<scalar_t, G, kSmooth, kWarp, kRing>);
            }
          });
        }
      };
      if (label_smoothing > 0) run(std::true_type{});
      else run(std::false_type{});
    });
    if (reduce) {
      rt::launch(&sum_blocks_kernel<acc_t, SoftmaxScale>, 1, kSumThreads, stream, sums,
                 static_cast<int>(tiles.count), s, loss.mutable_data_ptr<acc_t>());
    }
  });
  return {loss, grad};
}

}  // namespace focal::cuda
