// Launches of the loss kernels for FL*, QFL and VFL: only the target forms each loss takes are
// instantiated (FL*: those of the focal loss, with one gamma kind, since its gamma is a plain
// factor; QFL and VFL: float targets, or class ids with scores, the latter also through the
// roofline class-id kernel). Compiled by nvcc, and for tests
// as host C++ against the emulation (README.md).
#include <type_traits>

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include "family_cuda.cuh"

namespace focal::cuda {
namespace {

template <typename scalar_t, TargetKind TK, GammaKind G, LossKind L>
void launch(const KernelArgs& a, bool aligned, const ScaleArgs& s, void* sums, int blocks,
            rt::Stream stream) {
  rt::launch(&focal_kernel<scalar_t, TK, G, L>, blocks, kThreads, stream, a, aligned, s,
             static_cast<at::opmath_type<scalar_t>*>(sums));
}

template <typename scalar_t, LossKind L, GammaKind G>
void launch_quality(const KernelArgs& a, bool aligned, const ScaleArgs& s, void* sums, int blocks,
                    rt::Stream stream) {
  if (a.target_kind == TargetKind::kClassIdScore) {
    launch<scalar_t, TargetKind::kClassIdScore, G, L>(a, aligned, s, sums, blocks, stream);
  } else {
    TORCH_CHECK(a.target_kind == TargetKind::kFloat, "QFL / VFL: float targets or ids with scores");
    launch<scalar_t, TargetKind::kFloat, G, L>(a, aligned, s, sums, blocks, stream);
  }
}

template <typename scalar_t>
void launch_star(const KernelArgs& a, bool aligned, const ScaleArgs& s, void* sums, int blocks,
                 rt::Stream stream) {
  constexpr GammaKind G = GammaKind::kGeneral;
  constexpr LossKind L = LossKind::kFocalStar;
  switch (a.target_kind) {
    case TargetKind::kClassId:
      return launch<scalar_t, TargetKind::kClassId, G, L>(a, aligned, s, sums, blocks, stream);
    case TargetKind::kClassIdSmoothed:
      return launch<scalar_t, TargetKind::kClassIdSmoothed, G, L>(a, aligned, s, sums, blocks, stream);
    default:
      return launch<scalar_t, TargetKind::kFloat, G, L>(a, aligned, s, sums, blocks, stream);
  }
}

}  // namespace

void launch_family_kernel(const KernelArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                          bool aligned, const ScaleArgs& s, void* block_sums, int blocks,
                          rt::Stream stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "focal_family_cuda", [&] {
    switch (args.loss_kind) {
      case LossKind::kFocalStar:
        return launch_star<scalar_t>(args, aligned, s, block_sums, blocks, stream);
      case LossKind::kQuality:
        return with_gamma_kind(gamma_kind, [&](auto g) {
          launch_quality<scalar_t, LossKind::kQuality, decltype(g)::value>(args, aligned, s,
                                                                           block_sums, blocks, stream);
        });
      case LossKind::kVarifocal:
        return with_gamma_kind(gamma_kind, [&](auto g) {
          launch_quality<scalar_t, LossKind::kVarifocal, decltype(g)::value>(args, aligned, s,
                                                                             block_sums, blocks, stream);
        });
      default:
        TORCH_CHECK(false, "launch_family_kernel: the focal loss has its own launches");
    }
  });
}

void launch_family_ids_kernel(const KernelArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                              RowWalk walk, const ScaleArgs& s, void* tile_sums, int blocks,
                              rt::Stream stream) {
  TORCH_CHECK(args.loss_kind == LossKind::kQuality || args.loss_kind == LossKind::kVarifocal,
              "launch_family_ids_kernel: QFL or VFL only");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "focal_family_ids_cuda", [&] {
    // The default shape only: a type, not a switch over every shape, so that the other shapes'
    // kernels, which QFL and VFL never take, are not compiled for them.
    using Shape = DefaultLaunchShapeFor<scalar_t>;
    auto* sums = static_cast<at::opmath_type<scalar_t>*>(tile_sums);
    with_gamma_kind(gamma_kind, [&](auto g) {
      constexpr GammaKind G = decltype(g)::value;
      if (args.loss_kind == LossKind::kQuality) {
        rt::launch(&focal_ids_kernel<scalar_t, G, LossKind::kQuality, Shape>, blocks, Shape::kThreads,
                   stream, args, s, walk, sums);
      } else {
        rt::launch(&focal_ids_kernel<scalar_t, G, LossKind::kVarifocal, Shape>, blocks, Shape::kThreads,
                   stream, args, s, walk, sums);
      }
    });
  });
}

}  // namespace focal::cuda
