"""FCOS's box and centerness terms on coordinate pairs: torchvision's arithmetic, in fewer operations.

torchvision's ``BoxLinearCoder`` and ``generalized_box_iou_loss`` take boxes ``(K, 4)`` apart into
four coordinate columns and compute on each (about 60 tensor operations forward and backward for a
few hundred foreground locations, where each operation costs its dispatch, not its arithmetic). Here
the same quantities are computed on ``(K, 2)`` pairs, ``(x, y)`` of a box's low and high corners,
so that one operation does the work of two. Every element goes through the same IEEE operations in
the same order as in torchvision, so the values are torchvision's bit for bit; gradients are the
same sums of the same terms (autograd may add them in another order).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _corners(boxes: Tensor):
    """``(x1, y1)`` and ``(x2, y2)`` of boxes ``(K, 4)``, each ``(K, 2)``."""
    return boxes[:, :2], boxes[:, 2:]


def linear_decode(rel_codes: Tensor, boxes: Tensor, normalize_by_size: bool) -> Tensor:
    """``BoxLinearCoder.decode``: boxes ``(K, 4)`` from distances ``(l, t, r, b)`` to the edges,
    measured from the reference boxes' centres (in units of their size if ``normalize_by_size``)."""
    boxes = boxes.to(dtype=rel_codes.dtype)
    low, high = _corners(boxes)
    centre = 0.5 * (low + high)
    if normalize_by_size:
        size = high - low
        rel_codes = rel_codes * torch.cat((size, size), dim=1)
    return torch.cat((centre - rel_codes[:, :2], centre + rel_codes[:, 2:]), dim=1)


def linear_encode(reference_boxes: Tensor, proposals: Tensor, normalize_by_size: bool) -> Tensor:
    """``BoxLinearCoder.encode``: the distances ``(l, t, r, b)`` of ``proposals``' edges from the
    reference boxes' centres."""
    low, high = _corners(reference_boxes)
    centre = 0.5 * (low + high)
    low_p, high_p = _corners(proposals)
    targets = torch.cat((centre - low_p, high_p - centre), dim=1)
    if normalize_by_size:
        size = high - low
        targets = targets / torch.cat((size, size), dim=1)
    return targets


def centerness(encoded: Tensor) -> Tensor:
    """FCOS's centerness target ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of encoded
    boxes ``(K, 4)``."""
    pairs = encoded.reshape(-1, 2, 2)  # [[l, t], [r, b]]
    ratio = pairs.min(dim=1)[0] / pairs.max(dim=1)[0]  # (l, r) and (t, b) ratios
    return torch.sqrt(ratio[:, 0] * ratio[:, 1])


def generalized_box_iou_loss_sum(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """``generalized_box_iou_loss(boxes1, boxes2, reduction="sum")``."""
    if boxes1.dtype not in (torch.float32, torch.float64):
        boxes1 = boxes1.float()
    if boxes2.dtype not in (torch.float32, torch.float64):
        boxes2 = boxes2.float()
    low1, high1 = _corners(boxes1)
    low2, high2 = _corners(boxes2)
    inner = torch.minimum(high1, high2) - torch.maximum(low1, low2)  # the intersection's width, height
    outer = torch.maximum(high1, high2) - torch.minimum(low1, low2)  # the enclosing box's
    sides = torch.stack((high1 - low1, high2 - low2, inner, outer))  # (4, K, 2)
    area1, area2, overlap, area_c = (sides[..., 0] * sides[..., 1]).unbind(0)
    # a - b > 0 exactly when a > b: torchvision's test of the intersection's corners.
    intersection = torch.where((inner > 0).all(dim=1), overlap, torch.zeros_like(overlap))
    union = area1 + area2 - intersection
    iou = intersection / (union + eps)
    giou = iou - ((area_c - union) / (area_c + eps))
    return (1 - giou).sum()
