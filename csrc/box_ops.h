// fcos_box_losses, shared by the backends: its schema, the checked call and the kernels' view of it.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include <ATen/core/Tensor.h>

#include "box_math.h"

namespace focal {

// fcos_box_losses: FCOS's GIoU and centerness losses summed over the foreground locations of a
// batch and divided by a normaliser, and their gradients, in one pass over the locations (the
// per-location math: box_math.h).
//   codes (N, L, 4): the head's box regression; ctrness (N, L, 1) or (N, L): its centerness logits,
//   the codes' dtype (float32, float64, float16 or bfloat16); anchors (N, L, 4) and gt_boxes
//   (N, G, 4), G >= 1, corners (x1, y1, x2, y2), any of those dtypes; matched (N, L) int64: the index
//   in gt_boxes[n] of the box a location was matched to, negative for background; normalizer None
//   or a one-element tensor (on the host or the codes' device) that divides both sums.
//   Returns, in the math dtype (float64 for float64 codes, else float32): giou and centerness, 0-dim,
//   the two normalised sums; grad_codes (the codes' shape) and grad_ctrness (ctrness'), d giou /
//   d codes and d centerness / d ctrness, zero at background locations. The gradients stay in the
//   math dtype so that the backward rounds them to a 16-bit dtype once, after scaling.
inline constexpr const char* kFcosBoxLossesSchema =
    "fcos_box_losses(Tensor codes, Tensor ctrness, Tensor anchors, Tensor gt_boxes, Tensor matched, "
    "Tensor? normalizer, bool normalize_by_size) -> (Tensor, Tensor, Tensor, Tensor)";

// The arguments, checked, contiguous, anchors and gt_boxes both in float32, or both in float64.
struct BoxCall {
  at::Tensor codes, ctrness, anchors, gt_boxes, matched;
  std::optional<at::Tensor> normalizer;
  bool normalize_by_size;

  int64_t images() const { return codes.size(0); }
  int64_t locations() const { return codes.size(1); }
  int64_t boxes_per_image() const { return gt_boxes.size(1); }
  at::ScalarType math_dtype() const { return codes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
};

// Checks what the kernels rely on for memory safety (dims, sizes, dtypes, devices). The values are
// checked later: matched by the CPU kernel (the CUDA kernel gives NaN sums for an index out of
// range), a normaliser when the host reads it (one the CUDA kernel reads gives NaN sums unless
// finite and > 0).
BoxCall make_box_call(const at::Tensor& codes, const at::Tensor& ctrness, const at::Tensor& anchors,
                      const at::Tensor& gt_boxes, const at::Tensor& matched,
                      const std::optional<at::Tensor>& normalizer, bool normalize_by_size);

// What a kernel reads and writes, from a checked call and its outputs.
struct BoxArgs {
  const void* codes;
  const void* ctrness;
  const void* anchors;
  const void* gt_boxes;
  const int64_t* matched;
  int64_t images, locations, boxes_per_image;
  bool normalize_by_size;
  void* grad_codes;
  void* grad_ctrness;
};

BoxArgs box_args(const BoxCall& call, const at::Tensor& grad_codes, const at::Tensor& grad_ctrness);

// One location, flat index i = n * L + l, as both backends run it: writes its gradients and returns
// its GIoU and centerness terms, each multiplied by `scale`, all zero at a background location
// (matched < 0). A matched index beyond gt_boxes[n] gives NaN terms and zero gradients (the CPU
// backend rejects it before).
template <typename code_t, typename box_t>
FOCAL_HOST_DEVICE void box_location(const BoxArgs& a, int64_t i, double scale, double terms[2]) {
  using grad_t = std::conditional_t<std::is_same_v<code_t, double>, double, float>;  // the math dtype
  grad_t* grad = static_cast<grad_t*>(a.grad_codes) + 4 * i;
  grad_t* grad_logit = static_cast<grad_t*>(a.grad_ctrness) + i;
  const int64_t m = a.matched[i];
  if (m < 0 || m >= a.boxes_per_image) {
    for (int k = 0; k < 4; ++k) grad[k] = grad_t(0);
    *grad_logit = grad_t(0);
    terms[0] = terms[1] = m < 0 ? 0.0 : std::numeric_limits<double>::quiet_NaN();
    return;
  }
  const int64_t image = i / a.locations;
  const code_t* codes = static_cast<const code_t*>(a.codes) + 4 * i;
  const box_t* anchor = static_cast<const box_t*>(a.anchors) + 4 * i;
  const box_t* gt = static_cast<const box_t*>(a.gt_boxes) + 4 * (image * a.boxes_per_image + m);
  double c[4], an[4], g[4];
  for (int k = 0; k < 4; ++k) {
    c[k] = static_cast<double>(codes[k]);
    an[k] = static_cast<double>(anchor[k]);
    g[k] = static_cast<double>(gt[k]);
  }
  const double logit = static_cast<double>(static_cast<const code_t*>(a.ctrness)[i]);
  const boxes::LocationTerms r = boxes::fcos_location(c, logit, an, g, a.normalize_by_size);
  for (int k = 0; k < 4; ++k) grad[k] = static_cast<grad_t>(r.d_codes[k] * scale);
  *grad_logit = static_cast<grad_t>(r.d_logit * scale);
  terms[0] = r.giou * scale;
  terms[1] = r.centerness * scale;
}

}  // namespace focal
