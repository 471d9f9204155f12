"""torchvision's RetinaNet and FCOS with their classification loss computed by one fused call.

>>> import focal.integrations.torchvision
>>> model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
>>> model = focal.integrations.torchvision.use_fused_loss(model)       # or an FCOS model

Stock torchvision builds, per image, a float one-hot target the size of the logits, copies the
logits and that target through a boolean mask of the anchors that are not ignored, and calls an
unfused focal loss; FCOS then divides by a count read back with ``.item()``. Here the class ids of
the whole batch are gathered straight from the matcher's ``matched_idxs`` (labels padded into an
``(N, G)`` table): ``-1`` (below the low IoU threshold) is background and ``-2`` (between the
thresholds) is passed as ``ignore_index``, so one call of :func:`focal.sigmoid_focal_loss` on the
``(N, A, C)`` logits gives the loss and its gradient, with no one-hot, no mask copy and no host
sync. The semantics are stock's:

- RetinaNet: each image's sum divided by ``max(1, its positives)``, then the mean over images,
  given to the op as a per-image row weight ``1 / (N max(1, num_fg_i))``. The weight is cast to the
  logits' dtype, so under bfloat16 autocast it is rounded to bfloat16 (relative 2^-9).
- FCOS: the batch's sum divided by ``max(1, positives in the batch)``, given as a tensor normaliser.
  FCOS computes its box and centerness losses in the same ``compute_loss``: here they are one more
  fused call (``_fcos_boxes``: the GIoU and centerness losses of every foreground location, picked
  by the matcher's index inside the kernel, in float64), divided by the same count kept on the
  device. Stock decodes and encodes every location, then keeps the foreground through boolean
  masks that wait for the device.

``alpha = 0.25`` and ``gamma = 2``, torchvision's defaults. A model whose heads were adapted can
no longer be compiled with ``torch.jit.script`` (``torch.compile`` is fine).
"""

from __future__ import annotations

import types
from typing import Dict, List, Tuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetClassificationHead

import focal

from . import _fcos_boxes as boxes

__all__ = ["use_fused_loss"]

ALPHA = 0.25
GAMMA = 2.0


def use_fused_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Compute the classification loss of a torchvision ``RetinaNet`` or ``FCOS`` with the fused op.

    Replaces, on this model instance only, ``RetinaNetClassificationHead.compute_loss`` (RetinaNet)
    or ``FCOSHead.compute_loss`` (FCOS); calling it again does nothing more. Returns ``model``.

    Raises:
        TypeError: ``model`` is neither a RetinaNet nor an FCOS with torchvision's own head.
    """
    if isinstance(model, RetinaNet) and isinstance(model.head.classification_head, RetinaNetClassificationHead):
        head = model.head.classification_head
        head.compute_loss = types.MethodType(_retinanet_classification_loss, head)
    elif isinstance(model, FCOS) and isinstance(model.head, FCOSHead):
        model.head.compute_loss = types.MethodType(_fcos_loss, model.head)
    else:
        raise TypeError(
            "use_fused_loss expects a torchvision RetinaNet or FCOS with torchvision's own head, got "
            f"{type(model).__name__}"
        )
    return model


def _padded(targets: List[Dict[str, Tensor]], key: str, first: int = 0) -> Tensor:
    """Every image's ``targets[i][key]``, padded with zeros into one ``(N, first + max(1, G), ...)``
    table from column ``first`` on, so that an image without boxes gathers zeros, as stock
    torchvision fills it."""
    values = [t[key] for t in targets]
    rows = max([1] + [len(v) for v in values])
    table = values[0].new_zeros((len(values), first + rows) + values[0].shape[1:])
    for i, v in enumerate(values):
        table[i, first : first + len(v)] = v
    return table


def _class_ids(targets: List[Dict[str, Tensor]], matched_idxs: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Class ids ``(N, A)`` with the matcher's negatives kept: ``-1`` background, ``-2`` between the
    thresholds; and the stacked ``matched_idxs``. One gather, at ``matched + 2``, from a table of
    each image's labels after two columns that hold -2 and -1."""
    matched = torch.stack(matched_idxs)
    table = _padded(targets, "labels", first=2)
    table[:, 0], table[:, 1] = Matcher.BETWEEN_THRESHOLDS, Matcher.BELOW_LOW_THRESHOLD
    return table.gather(1, matched + 2), matched


def _retinanet_classification_loss(
    self: RetinaNetClassificationHead, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor],
    matched_idxs: List[Tensor],
) -> Tensor:
    """Stock ``RetinaNetClassificationHead.compute_loss``, as one fused call over the batch."""
    cls_logits = head_outputs["cls_logits"]  # (N, HWA, C)
    ids, matched = _class_ids(targets, matched_idxs)
    num_foreground = (matched >= 0).sum(dim=1).clamp(min=1)
    math_dtype = torch.float64 if cls_logits.dtype == torch.float64 else torch.float32
    per_image = 1.0 / (num_foreground.to(math_dtype) * len(targets))
    return focal.sigmoid_focal_loss(
        cls_logits, ids, alpha=ALPHA, gamma=GAMMA, reduction="sum", weight=per_image[:, None, None],
        ignore_index=self.BETWEEN_THRESHOLDS,
    )


def _fcos_loss(
    self: FCOSHead, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor], anchors: List[Tensor],
    matched_idxs: List[Tensor],
) -> Dict[str, Tensor]:
    """Stock ``FCOSHead.compute_loss`` with its classification term as one fused call."""
    cls_logits = head_outputs["cls_logits"]  # (N, HWA, C)
    bbox_regression = head_outputs["bbox_regression"]  # (N, HWA, 4)
    bbox_ctrness = head_outputs["bbox_ctrness"]  # (N, HWA, 1)

    gt_classes, matched = _class_ids(targets, matched_idxs)  # FCOS's matcher gives only -1 and >= 0
    num_foreground = (gt_classes >= 0).sum().clamp(min=1)  # stays on the device: no .item()

    loss_cls = focal.sigmoid_focal_loss(
        cls_logits, gt_classes, alpha=ALPHA, gamma=GAMMA, reduction="sum", normalizer=num_foreground
    )
    # The box and centerness terms of every foreground location (matched >= 0) in one fused call.
    loss_bbox_reg, loss_bbox_ctrness = boxes.fcos_box_losses(
        bbox_regression, bbox_ctrness, torch.stack(anchors), _padded(targets, "boxes"), matched,
        num_foreground, self.box_coder.normalize_by_size,
    )
    return {"classification": loss_cls, "bbox_regression": loss_bbox_reg, "bbox_ctrness": loss_bbox_ctrness}
