"""IoU matcher: assigns each anchor to a ground-truth box, to background, or to the ignore band."""

from __future__ import annotations

import torch


class Matcher:
    """Paper section 4: IoU >= ``high`` -> matched to its best box; IoU < ``low`` -> background;
    in between -> ignored.

    ``allow_low_quality_matches`` (as in detectron2 / torchvision) additionally matches every ground
    truth to the anchors with which it has its highest IoU (ties included), so that no object is left
    without a positive anchor.
    """

    BACKGROUND = -1
    IGNORE = -2

    def __init__(self, high: float = 0.5, low: float = 0.4, allow_low_quality_matches: bool = True):
        if low > high:
            raise ValueError(f"low threshold {low} exceeds high threshold {high}")
        self.high = high
        self.low = low
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: torch.Tensor) -> torch.Tensor:
        """``iou``: (M ground truths, R anchors). Returns (R,) int64: the matched ground-truth index,
        ``BACKGROUND`` (-1) or ``IGNORE`` (-2). With M == 0 every anchor is background."""
        num_gt, num_anchors = iou.shape
        if num_gt == 0:
            return torch.full((num_anchors,), self.BACKGROUND, dtype=torch.int64, device=iou.device)
        best_iou, matches = iou.max(dim=0)  # (R,)
        result = matches.clone()
        result[best_iou < self.high] = self.IGNORE
        result[best_iou < self.low] = self.BACKGROUND
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1, keepdim=True).values  # (M, 1)
            # Only anchors that overlap at all; a box with IoU 0 to every anchor stays unmatched.
            is_best = (iou == best_per_gt) & (best_per_gt > 0)  # (M, R)
            gt_of_best, anchor_of_best = is_best.nonzero(as_tuple=True)
            result[anchor_of_best] = matches[anchor_of_best]
        return result
