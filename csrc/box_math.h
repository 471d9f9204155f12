// Per-location math of FCOS's box losses (Tian et al., 2019, as torchvision trains it): the GIoU
// loss of the decoded box and the centerness loss, each with its derivative, for one foreground
// location. The CPU loop (cpu/box_cpu.cpp) and the CUDA kernel (cuda/box_cuda.cu) both call
// fcos_location, in float64 whatever the inputs' dtype.
//
// A location has a reference box (its anchor: corners a0..a3), the ground-truth box it was matched
// to (g0..g3), the head's four regression codes and one centerness logit.
// - Decode (torchvision's BoxLinearCoder): centre c of the anchor, size s (its width and height
//   when normalize_by_size, else 1); the predicted box is (cx - c0 sx, cy - c1 sy, cx + c2 sx,
//   cy + c3 sy).
// - GIoU loss (Rezatofighi et al., 2019; torchvision's generalized_box_iou_loss, eps = 1e-7):
//   1 - I / (U + eps) + (C - U) / (C + eps), with I the intersection (0 unless both of its sides
//   are positive), U = A1 + A2 - I the union and C the area of the smallest enclosing box.
// - Centerness target (no gradient): the encoded distances l, t, r, b from the anchor's centre to
//   the ground-truth box's edges (divided by s when normalize_by_size), and
//   sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)); its loss is the binary cross-entropy of
//   the logit against it.
// The derivatives are those autograd takes through torchvision's expressions: at a tie, min and
// max give each operand half the gradient, and an empty intersection passes none.
#pragma once

#include <cmath>

#include "focal_math.h"  // FOCAL_HOST_DEVICE

namespace focal::boxes {

inline constexpr double kGiouEps = 1e-7;

struct LocationTerms {
  double giou;         // GIoU loss of the decoded box
  double centerness;   // binary cross-entropy of the centerness logit
  double d_codes[4];   // d giou / d codes
  double d_logit;      // d centerness / d logit
};

// torch.maximum / torch.minimum: NaN when either operand is NaN.
FOCAL_HOST_DEVICE double maximum(double a, double b) { return (a > b || a != a) ? a : b; }
FOCAL_HOST_DEVICE double minimum(double a, double b) { return (a < b || a != a) ? a : b; }

// The share of d max(a, b) (or min) that reaches a, as autograd gives it.
FOCAL_HOST_DEVICE double share_of_max(double a, double b) { return a > b ? 1.0 : (a == b ? 0.5 : 0.0); }
FOCAL_HOST_DEVICE double share_of_min(double a, double b) { return a < b ? 1.0 : (a == b ? 0.5 : 0.0); }

FOCAL_HOST_DEVICE LocationTerms fcos_location(const double codes[4], double logit, const double anchor[4],
                                              const double gt[4], bool normalize_by_size) {
  LocationTerms out;
  const double cx = 0.5 * (anchor[0] + anchor[2]), cy = 0.5 * (anchor[1] + anchor[3]);
  const double sx = normalize_by_size ? anchor[2] - anchor[0] : 1.0;
  const double sy = normalize_by_size ? anchor[3] - anchor[1] : 1.0;
  const double x1 = cx - codes[0] * sx, y1 = cy - codes[1] * sy;
  const double x2 = cx + codes[2] * sx, y2 = cy + codes[3] * sy;

  // GIoU loss.
  const double w1 = x2 - x1, h1 = y2 - y1;
  const double area1 = w1 * h1, area2 = (gt[2] - gt[0]) * (gt[3] - gt[1]);
  const double iw = minimum(x2, gt[2]) - maximum(x1, gt[0]);
  const double ih = minimum(y2, gt[3]) - maximum(y1, gt[1]);
  const bool overlaps = iw > 0 && ih > 0;
  const double inter = overlaps ? iw * ih : 0.0;
  const double uni = area1 + area2 - inter;
  const double cw = maximum(x2, gt[2]) - minimum(x1, gt[0]);
  const double ch = maximum(y2, gt[3]) - minimum(y1, gt[1]);
  const double area_c = cw * ch;
  const double ue = uni + kGiouEps, ce = area_c + kGiouEps;
  out.giou = 1.0 - (inter / ue - (area_c - uni) / ce);

  // Its derivative, through I, A1 and C (U = A1 + A2 - I).
  const double d_inter = 1.0 / ce - 1.0 / ue - inter / (ue * ue);
  const double d_area1 = inter / (ue * ue) - 1.0 / ce;
  const double d_area_c = 1.0 / ce - (area_c - uni) / (ce * ce);
  double dx1 = -d_area1 * h1, dx2 = d_area1 * h1, dy1 = -d_area1 * w1, dy2 = d_area1 * w1;
  if (overlaps) {
    dx1 -= d_inter * ih * share_of_max(x1, gt[0]);
    dx2 += d_inter * ih * share_of_min(x2, gt[2]);
    dy1 -= d_inter * iw * share_of_max(y1, gt[1]);
    dy2 += d_inter * iw * share_of_min(y2, gt[3]);
  }
  dx1 -= d_area_c * ch * share_of_min(x1, gt[0]);
  dx2 += d_area_c * ch * share_of_max(x2, gt[2]);
  dy1 -= d_area_c * cw * share_of_min(y1, gt[1]);
  dy2 += d_area_c * cw * share_of_max(y2, gt[3]);
  out.d_codes[0] = -dx1 * sx;
  out.d_codes[1] = -dy1 * sy;
  out.d_codes[2] = dx2 * sx;
  out.d_codes[3] = dy2 * sy;

  // Centerness: the target from the encoded box, then the cross-entropy of the logit against it.
  const double l = (cx - gt[0]) / sx, t = (cy - gt[1]) / sy;
  const double r = (gt[2] - cx) / sx, b = (gt[3] - cy) / sy;
  const double target =
      ::sqrt(minimum(l, r) / maximum(l, r) * (minimum(t, b) / maximum(t, b)));
  const double e = ::exp(-::fabs(logit));
  out.centerness = maximum(logit, 0.0) - logit * target + ::log1p(e);
  const double p = logit >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
  out.d_logit = p - target;
  return out;
}

}  // namespace focal::boxes
