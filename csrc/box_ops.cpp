// The argument checks of fcos_box_losses shared by every backend (the schema is in box_ops.h,
// registered by module.cpp).
#include "box_ops.h"

#include <c10/util/Exception.h>

namespace focal {

namespace {

bool is_real(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

BoxCall make_box_call(const at::Tensor& codes, const at::Tensor& ctrness, const at::Tensor& anchors,
                      const at::Tensor& gt_boxes, const at::Tensor& matched,
                      const std::optional<at::Tensor>& normalizer, bool normalize_by_size) {
  TORCH_CHECK_VALUE(codes.dim() == 3 && codes.size(2) == 4, "codes must have shape (N, L, 4), got ",
                    codes.sizes());
  const int64_t n = codes.size(0), l = codes.size(1);
  TORCH_CHECK_TYPE(is_real(codes.scalar_type()),
                   "codes must be float32, float64, float16 or bfloat16, got ", codes.scalar_type());
  TORCH_CHECK_TYPE(ctrness.scalar_type() == codes.scalar_type(), "ctrness must have the codes' dtype ",
                   codes.scalar_type(), ", got ", ctrness.scalar_type());
  TORCH_CHECK_VALUE((ctrness.dim() == 2 || (ctrness.dim() == 3 && ctrness.size(2) == 1)) &&
                        ctrness.size(0) == n && ctrness.size(1) == l,
                    "ctrness must have shape (", n, ", ", l, ", 1) or (", n, ", ", l, "), got ",
                    ctrness.sizes());
  TORCH_CHECK_VALUE(anchors.dim() == 3 && anchors.size(0) == n && anchors.size(1) == l &&
                        anchors.size(2) == 4,
                    "anchors must have shape (", n, ", ", l, ", 4), got ", anchors.sizes());
  TORCH_CHECK_VALUE(gt_boxes.dim() == 3 && gt_boxes.size(0) == n && gt_boxes.size(1) >= 1 &&
                        gt_boxes.size(2) == 4,
                    "gt_boxes must have shape (", n, ", G, 4) with G >= 1, got ", gt_boxes.sizes());
  TORCH_CHECK_TYPE(is_real(anchors.scalar_type()) && is_real(gt_boxes.scalar_type()),
                   "anchors and gt_boxes must be floating point tensors, got ", anchors.scalar_type(),
                   " and ", gt_boxes.scalar_type());
  TORCH_CHECK_TYPE(matched.scalar_type() == at::kLong, "matched must be int64, got ",
                   matched.scalar_type());
  TORCH_CHECK_VALUE(matched.dim() == 2 && matched.size(0) == n && matched.size(1) == l,
                    "matched must have shape (", n, ", ", l, "), got ", matched.sizes());
  for (const at::Tensor* t : {&ctrness, &anchors, &gt_boxes, &matched}) {
    TORCH_CHECK_VALUE(t->device() == codes.device(), "every input must be on the codes' device ",
                      codes.device(), ", got one on ", t->device());
  }
  if (normalizer) {
    TORCH_CHECK_VALUE(normalizer->numel() == 1, "normalizer must hold one value, got shape ",
                      normalizer->sizes());
    TORCH_CHECK_VALUE(normalizer->device().is_cpu() || normalizer->device() == codes.device(),
                      "normalizer must be on the host or on the codes' device ", codes.device(),
                      ", got ", normalizer->device());
  }
  // Both in float64 if either is, else float32: every value of a 16-bit box is kept exactly.
  const bool wide = anchors.scalar_type() == at::kDouble || gt_boxes.scalar_type() == at::kDouble;
  const at::ScalarType box_dtype = wide ? at::kDouble : at::kFloat;
  return {codes.contiguous(), ctrness.contiguous(), anchors.to(box_dtype).contiguous(),
          gt_boxes.to(box_dtype).contiguous(), matched.contiguous(), normalizer, normalize_by_size};
}

BoxArgs box_args(const BoxCall& call, const at::Tensor& grad_codes, const at::Tensor& grad_ctrness) {
  return {call.codes.const_data_ptr(),
          call.ctrness.const_data_ptr(),
          call.anchors.const_data_ptr(),
          call.gt_boxes.const_data_ptr(),
          call.matched.const_data_ptr<int64_t>(),
          call.images(),
          call.locations(),
          call.boxes_per_image(),
          call.normalize_by_size,
          grad_codes.mutable_data_ptr(),
          grad_ctrness.mutable_data_ptr()};
}

}  // namespace focal
