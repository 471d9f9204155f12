// CPU backend of fcos_box_losses: one ordered pass over the locations, sums in float64. A normaliser
// is read on the host.
#include <optional>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../box_ops.h"
#include "../focal_ops.h"  // divide_by_host_normalizer, reduced_loss_tensor

namespace focal::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fcos_box_losses_cpu(
    const at::Tensor& codes, const at::Tensor& ctrness, const at::Tensor& anchors,
    const at::Tensor& gt_boxes, const at::Tensor& matched, const std::optional<at::Tensor>& normalizer,
    bool normalize_by_size) {
  const BoxCall call = make_box_call(codes, ctrness, anchors, gt_boxes, matched, normalizer, normalize_by_size);
  const at::TensorOptions math = call.codes.options().dtype(call.math_dtype());
  const at::Tensor grad_codes = at::empty(call.codes.sizes(), math);
  const at::Tensor grad_ctrness = at::empty(call.ctrness.sizes(), math);
  const BoxArgs args = box_args(call, grad_codes, grad_ctrness);
  const double scale = divide_by_host_normalizer(1.0, call.normalizer);
  const int64_t count = call.images() * call.locations();
  const int64_t* ids = call.matched.const_data_ptr<int64_t>();
  double giou = 0, centerness = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.codes.scalar_type(), "fcos_box_losses", [&] {
    using code_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(call.anchors.scalar_type(), "fcos_box_losses", [&] {
      for (int64_t i = 0; i < count; ++i) {
        TORCH_CHECK_VALUE(ids[i] < args.boxes_per_image, "matched index ", ids[i], " at image ",
                          i / args.locations, ", location ", i % args.locations,
                          " is beyond that image's ", args.boxes_per_image, " boxes");
        double terms[2];
        box_location<code_t, scalar_t>(args, i, scale, terms);
        giou += terms[0];
        centerness += terms[1];
      }
    });
  });
  return {reduced_loss_tensor(giou, math), reduced_loss_tensor(centerness, math), grad_codes, grad_ctrness};
}

}  // namespace

TORCH_LIBRARY_IMPL(focal, CPU, m) { m.impl("fcos_box_losses", &fcos_box_losses_cpu); }

}  // namespace focal::cpu
