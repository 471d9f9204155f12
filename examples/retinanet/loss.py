"""RetinaNet losses: focal loss on every non-ignored anchor, box loss on the positive anchors, both
divided by the number of positive anchors in the batch (kept as a tensor: no host synchronisation).

The classification loss is the one place that chooses an implementation (``impl``):

* ``"focal"``: ``focal.sigmoid_focal_loss``, the fused op, fed class-id targets directly;
* ``"reference"``: ``focal.reference.sigmoid_focal_loss``, the pure-PyTorch statement of the math;
* ``"torchvision"``: ``torchvision.ops.sigmoid_focal_loss`` on one-hot float targets of the
  non-ignored anchors, with the same normalisation, for side-by-side comparison.

``family_classification_loss`` trains with a relative of the focal loss instead (FL*, QFL, VFL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss as torchvision_sigmoid_focal_loss

from .matcher import Matcher

IGNORE_INDEX = Matcher.IGNORE  # class-id target of anchors in the ignore band
BACKGROUND = Matcher.BACKGROUND  # class-id target of background anchors


def _focal_op(impl: str):
    if impl == "focal":
        from focal import sigmoid_focal_loss  # the fused C++ op

        return sigmoid_focal_loss
    if impl == "reference":
        from focal import reference

        return reference.sigmoid_focal_loss
    raise ValueError(f"unknown loss implementation {impl!r}")


def classification_loss(cls_logits: torch.Tensor, gt_classes: torch.Tensor, normalizer: torch.Tensor,
                        alpha: float = 0.25, gamma: float = 2.0, impl: str = "focal") -> torch.Tensor:
    """Focal loss summed over anchors and classes, divided by ``normalizer``.

    ``cls_logits`` (N, R, K); ``gt_classes`` (N, R) int64 with a class id in [0, K), ``BACKGROUND`` (-1)
    or ``IGNORE_INDEX`` (-2); ``normalizer`` 0-dim tensor (number of positive anchors, >= 1).
    ``alpha < 0`` disables the alpha weighting; ``gamma = 0`` gives (alpha-balanced) cross entropy.
    """
    if impl == "torchvision":
        valid = gt_classes != IGNORE_INDEX  # (N, R)
        one_hot = F.one_hot(gt_classes.clamp(min=0), cls_logits.shape[-1]).to(cls_logits.dtype)
        one_hot = one_hot * (gt_classes >= 0).unsqueeze(-1)
        loss = torchvision_sigmoid_focal_loss(cls_logits[valid], one_hot[valid], alpha, gamma, "sum")
        return loss / normalizer
    op = _focal_op(impl)
    return op(cls_logits, gt_classes, alpha, gamma, "sum", normalizer=normalizer, ignore_index=IGNORE_INDEX)


def quality_scores(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """The quality target of QFL and VFL: the IoU of each foreground anchor's predicted box with its
    ground-truth box, 0 elsewhere; ``pred_boxes``, ``gt_boxes`` (N, R, 4) XYXY, ``foreground`` (N, R).
    Not differentiated: the score is a target."""
    with torch.no_grad():
        top_left = torch.maximum(pred_boxes[..., :2], gt_boxes[..., :2])
        bottom_right = torch.minimum(pred_boxes[..., 2:], gt_boxes[..., 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
        area_pred = (pred_boxes[..., 2:] - pred_boxes[..., :2]).clamp(min=0).prod(dim=-1)
        area_gt = (gt_boxes[..., 2:] - gt_boxes[..., :2]).clamp(min=0).prod(dim=-1)
        iou = inter / (area_pred + area_gt - inter).clamp(min=1e-6)
        return torch.where(foreground, iou.clamp(0, 1), torch.zeros((), dtype=iou.dtype, device=iou.device))


def family_classification_loss(config, cls_logits: torch.Tensor, gt_classes: torch.Tensor, normalizer: torch.Tensor,
                               quality: torch.Tensor | None = None) -> torch.Tensor:
    """The classification loss ``config.cls_loss`` of focal's family, summed and divided by
    ``normalizer``: FL* on the class ids, or QFL / VFL on the pair (class ids, ``quality``), where
    ``quality`` (N, R) holds each positive anchor's IoU (see ``quality_scores``)."""
    import focal

    common = dict(reduction="sum", normalizer=normalizer, ignore_index=IGNORE_INDEX)
    if config.cls_loss == "focal_star":
        alpha = config.focal_alpha if config.focal_alpha >= 0 else None
        return focal.sigmoid_focal_loss_star(cls_logits, gt_classes, config.focal_gamma, config.star_beta, alpha,
                                             **common)
    targets = (gt_classes, quality.to(cls_logits.dtype))
    if config.cls_loss == "qfl":
        return focal.quality_focal_loss(cls_logits, targets, config.qfl_beta, **common)
    if config.cls_loss == "vfl":
        return focal.varifocal_loss(cls_logits, targets, config.vfl_alpha, config.vfl_gamma, **common)
    raise ValueError(f"unknown cls_loss {config.cls_loss!r}")


def box_regression_loss(box_deltas: torch.Tensor, gt_deltas: torch.Tensor, foreground: torch.Tensor,
                        normalizer: torch.Tensor, kind: str = "smooth_l1", beta: float = 0.11,
                        pred_boxes: torch.Tensor | None = None, gt_boxes: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Box loss over the foreground anchors, divided by ``normalizer``.

    ``box_deltas``, ``gt_deltas`` (N, R, 4); ``foreground`` (N, R) bool. ``"giou"`` compares decoded
    boxes instead: ``pred_boxes``, ``gt_boxes`` (N, R, 4) XYXY. Non-foreground anchors are masked with
    ``torch.where`` rather than indexed out, so the loss needs no host synchronisation.
    """
    mask = foreground.unsqueeze(-1)
    if kind == "smooth_l1":
        per_anchor = F.smooth_l1_loss(box_deltas, gt_deltas, beta=beta, reduction="none")
    elif kind == "l1":
        per_anchor = F.l1_loss(box_deltas, gt_deltas, reduction="none")
    elif kind == "giou":
        if pred_boxes is None or gt_boxes is None:
            raise ValueError("giou needs pred_boxes and gt_boxes")
        per_anchor = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none").unsqueeze(-1)
    else:
        raise ValueError(f"unknown box loss {kind!r}")
    per_anchor = torch.where(mask, per_anchor, torch.zeros((), dtype=per_anchor.dtype))
    return per_anchor.sum() / normalizer
