"""The RetinaNet meta-architecture: preprocess -> backbone + FPN -> heads -> (training) label anchors
and compute losses / (inference) decode and NMS."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_iou

from .anchors import AnchorGenerator
from .backbone import ResNetFPN
from .box_coder import BoxCoder
from .config import RetinaNetConfig
from .head import RetinaNetHead
from .loss import box_regression_loss, classification_loss, family_classification_loss, quality_scores
from .matcher import Matcher
from .postprocess import detections_for_image


CROWD_IOA = 0.5  # fraction of an anchor's area inside a crowd box from which it is ignored


def intersection_over_anchor(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(M, R): area of ``boxes`` (M, 4) ∩ ``anchors`` (R, 4), divided by the anchor's area."""
    top_left = torch.maximum(boxes[:, None, :2], anchors[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], anchors[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area = (anchors[:, 2:] - anchors[:, :2]).prod(dim=-1).clamp(min=1e-6)
    return inter / area


class RetinaNet(nn.Module):
    """``forward(images, targets=None)``.

    ``images``: (N, 3, H, W), uint8 in [0, 255] or float in [0, 1] (same size within a batch; the data
    module pads). ``targets`` (training): a list of N dicts with ``boxes`` (Mi, 4) float XYXY in pixels
    and ``labels`` (Mi,) int64 in [0, K); Mi may be 0.

    Training returns ``{"loss_cls": ..., "loss_box": ...}``; evaluation returns one dict per image with
    ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,).
    """

    def __init__(self, config: RetinaNetConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNetFPN(config.depth, config.backbone_width, config.levels, config.fpn_channels,
                                  config.backbone_norm)
        if config.weights:
            self.backbone.body.load_torchvision_checkpoint(config.weights)
        self.anchor_generator = AnchorGenerator(
            self.backbone.strides, config.anchor_sizes, config.anchor_scales, config.anchor_ratios
        )
        self.head = RetinaNetHead(
            self.backbone.out_channels, self.anchor_generator.num_anchors, config.num_classes,
            width=config.head_width, num_convs=config.head_convs, norm=config.head_norm,
            prior_prob=config.prior_prob,
        )
        self.matcher = Matcher(config.fg_iou_threshold, config.bg_iou_threshold,
                               config.allow_low_quality_matches)
        self.box_coder = BoxCoder()
        # Maps this process's positive-anchor count (a 0-dim float32 tensor) to the loss normaliser;
        # None: the count itself, at least 1. Data-parallel training sets distributed.global_normalizer.
        self.normalizer_fn = None
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, -1, 1, 1), persistent=False)
        if config.channels_last:
            self.to(memory_format=torch.channels_last)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 or [0, 1] float -> normalised float, channels-last if configured."""
        images = images.to(self.pixel_mean.device)
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        images = (images - self.pixel_mean) / self.pixel_std
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        images = self.preprocess(images)
        features = self.backbone(images)  # list of (N, C, Hi, Wi)
        anchors_per_level = self.anchor_generator([f.shape[-2:] for f in features])  # (Hi*Wi*A, 4) each
        logits_per_level, deltas_per_level = self.head.forward_per_level(features)
        if self.training:
            if targets is None:
                raise ValueError("training needs targets")
            cls_logits = torch.cat(logits_per_level, dim=1)  # (N, R, K)
            box_deltas = torch.cat(deltas_per_level, dim=1)  # (N, R, 4)
            anchors = torch.cat(anchors_per_level)  # (R, 4)
            gt_classes, gt_boxes = self.label_anchors(anchors, targets)
            return self.losses(anchors, cls_logits, box_deltas, gt_classes, gt_boxes)
        image_size = tuple(images.shape[-2:])
        return [
            detections_for_image(
                [lv[i] for lv in logits_per_level], [lv[i] for lv in deltas_per_level], anchors_per_level,
                image_size, self.box_coder, self.config.score_threshold, self.config.topk_candidates,
                self.config.nms_threshold, self.config.detections_per_image,
            )
            for i in range(images.shape[0])
        ]

    @torch.no_grad()
    def label_anchors(self, anchors: torch.Tensor, targets: list[dict]):
        """Match every anchor (R, 4) to the targets of each image.

        Returns ``gt_classes`` (N, R) int64: class id, ``Matcher.BACKGROUND`` or ``Matcher.IGNORE``; and
        ``gt_boxes`` (N, R, 4): the matched box of each anchor (the anchor itself where unmatched).
        A target's optional ``crowd_boxes`` (C, 4) mark regions of many unannotated objects: an anchor
        that is not positive and lies at least ``CROWD_IOA`` inside one is ignored, since calling it
        background would teach the model that those objects are background.
        """
        gt_classes, gt_boxes = [], []
        for target in targets:
            boxes = target["boxes"].to(anchors)
            labels = target["labels"].to(device=anchors.device, dtype=torch.int64)
            matched = self.matcher(box_iou(boxes, anchors))  # (R,)
            crowd = target.get("crowd_boxes")
            if crowd is not None and crowd.numel():
                on_crowd = intersection_over_anchor(crowd.to(anchors), anchors).amax(dim=0) >= CROWD_IOA
                matched = torch.where(on_crowd & (matched < 0), Matcher.IGNORE, matched)
            if boxes.numel() == 0:
                gt_classes.append(matched)
                gt_boxes.append(anchors)
                continue
            index = matched.clamp(min=0)
            gt_classes.append(torch.where(matched >= 0, labels[index], matched))
            gt_boxes.append(torch.where((matched >= 0).unsqueeze(-1), boxes[index], anchors))
        return torch.stack(gt_classes), torch.stack(gt_boxes)

    def losses(self, anchors, cls_logits, box_deltas, gt_classes, gt_boxes) -> dict:
        """Paper section 4, "Training": focal loss over all non-ignored anchors and box loss over the
        positives, both normalised by the number of positive anchors in the batch (a tensor)."""
        cfg = self.config
        foreground = gt_classes >= 0  # (N, R)
        # 0-dim, no host sync; float32 even for 16-bit logits, whose 8-bit mantissa would round the count
        num_foreground = foreground.sum().to(torch.float32)
        if self.normalizer_fn is not None:
            num_foreground = self.normalizer_fn(num_foreground)  # e.g. the global count under DDP
        else:
            num_foreground = num_foreground.clamp(min=1)
        gt_deltas = self.box_coder.encode(gt_boxes, anchors.unsqueeze(0))  # (N, R, 4)
        pred_boxes = None
        if cfg.box_loss == "giou" or cfg.cls_loss in ("qfl", "vfl"):
            pred_boxes = self.box_coder.decode(box_deltas, anchors.unsqueeze(0))
        if cfg.cls_loss == "focal":
            loss_cls = classification_loss(cls_logits, gt_classes, num_foreground, cfg.focal_alpha,
                                           cfg.focal_gamma, cfg.loss_impl)
        else:
            quality = quality_scores(pred_boxes, gt_boxes, foreground) if pred_boxes is not None else None
            loss_cls = family_classification_loss(cfg, cls_logits, gt_classes, num_foreground, quality)
        loss_box = box_regression_loss(box_deltas, gt_deltas, foreground, num_foreground, cfg.box_loss,
                                       cfg.smooth_l1_beta, pred_boxes, gt_boxes)
        return {"loss_cls": loss_cls, "loss_box": cfg.box_loss_weight * loss_box}
