"""FCOS box-loss problems and torchvision's own statement of their terms, shared by the tests of the
fused op (tests/test_fcos_boxes.py) and its emulated CUDA checks (tests/cuda_emulation)."""

from __future__ import annotations

import torch
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.ops import generalized_box_iou_loss


def stock_sums(codes, ctrness, anchors, gt_boxes, matched, normalize):
    """torchvision's FCOS box terms (as FCOSHead.compute_loss computes them), summed: the oracle."""
    coder = BoxLinearCoder(normalize_by_size=normalize)
    fg = matched >= 0
    gt = torch.stack([g[m.clamp(min=0)] for g, m in zip(gt_boxes, matched)])
    pred = coder.decode(codes, anchors)
    giou = generalized_box_iou_loss(pred[fg], gt[fg], reduction="sum")
    encoded = coder.encode(anchors.reshape(-1, 4), gt.reshape(-1, 4)).reshape(gt.shape)
    lr, tb = encoded[..., [0, 2]], encoded[..., [1, 3]]
    target = torch.sqrt((lr.min(-1)[0] / lr.max(-1)[0]) * (tb.min(-1)[0] / tb.max(-1)[0]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        ctrness.reshape(fg.shape)[fg], target[fg], reduction="sum")
    return torch.stack([giou, bce])


def problem(n=3, locations=200, boxes=5, seed=0, dtype=torch.float64):
    """``(codes, ctrness, anchors, gt_boxes, matched)``: ``n`` images of ``locations`` locations,
    about half of them matched to one of ``boxes`` ground-truth boxes (the last image to none), each
    anchor centred inside its box; random codes give predictions that overlap their box, nest in it
    or lie apart from it, and some predictions equal their box exactly or in two edges (integer
    coordinates, so that the GIoU's minima and maxima tie)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 100, (n, boxes, 2), generator=g).double()
    gt_boxes = torch.cat([low, low + torch.randint(2, 40, (n, boxes, 2), generator=g).double()], -1)
    matched = torch.randint(0, boxes, (n, locations), generator=g)
    matched[torch.rand(n, locations, generator=g) < 0.5] = -1
    matched[-1] = -1
    gt_of = torch.stack([b[m.clamp(min=0)] for b, m in zip(gt_boxes, matched)])
    # Each anchor's centre strictly inside its box, as FCOS's centre sampling places them.
    inside = torch.rand(n, locations, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1
    centre = (gt_of[..., :2] + inside * (gt_of[..., 2:] - gt_of[..., :2])).floor().clamp(min=gt_of[..., :2] + 1)
    half = torch.randint(1, 9, (n, locations, 2), generator=g).double()
    anchors = torch.cat([centre - half, centre + half], -1)
    codes = torch.rand(n, locations, 4, generator=g, dtype=torch.float64) * 6 - 1
    # Exact predictions (corners tie with the ground truth), unnormalised codes in whole numbers.
    cx, cy = centre[..., 0], centre[..., 1]
    exact = torch.stack([cx - gt_of[..., 0], cy - gt_of[..., 1], gt_of[..., 2] - cx, gt_of[..., 3] - cy], -1)
    codes[:, :20] = exact[:, :20]
    codes[:, 20:30, :2] = exact[:, 20:30, :2]  # two edges tie
    ctrness = torch.randn(n, locations, 1, generator=g, dtype=torch.float64) * 4
    return codes.to(dtype), ctrness.to(dtype), anchors, gt_boxes, matched
