"""Stock ``torchvision.models.detection.RetinaNet`` behind this example's model interface, for comparison.

``--detector torchvision`` trains torchvision's detector with everything else of this example
unchanged (data, batch order, optimiser, schedule, time budget, checkpoints, COCO evaluation), so a
side-by-side run measures what torchvision's implementation gives on this benchmark:

    python -m examples.retinanet.train --detector torchvision --lr 0.01 --output runs/tv

What is torchvision's: the head (``RetinaNetHead``: 4 convs as wide as the FPN, no normalisation,
prior-initialised), the anchor matching (its ``Matcher``, IoU .5 / .4 with low-quality matches), the
loss (``torchvision.ops.sigmoid_focal_loss`` with alpha .25 and gamma 2 on a one-hot target, each
image normalised by its own positive count, then averaged; L1 box loss on its ``BoxCoder``'s
deltas), its ``GeneralizedRCNNTransform`` normalisation and the post-processing. What comes from the
config, because it describes the data rather than the algorithm: the backbone (the same
``ResNetFPN`` as ``--detector focal``, so the same size), the pyramid levels, the anchor sizes, scales
and ratios (torchvision's defaults are sized for 800-px COCO images), the class count and the
inference thresholds. Config fields of this example's own head and loss (``head_*``, ``prior_prob``,
``cls_loss``, ``loss_impl``, ``box_loss``, ...) do not apply.

``--detector torchvision_v2`` is torchvision's own improved recipe, as ``retinanet_resnet50_fpn_v2``
builds it: the head's convolutions followed by ``GroupNorm(32)`` and the box loss GIoU on decoded
boxes instead of L1 on deltas; everything else as above.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .backbone import ResNetFPN
from .config import RetinaNetConfig


class _PyramidAsDict(nn.Module):
    """``ResNetFPN`` returning an ``OrderedDict`` of levels, the form torchvision's detectors take."""

    def __init__(self, fpn: ResNetFPN):
        super().__init__()
        self.fpn = fpn
        self.out_channels = fpn.out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict:
        return OrderedDict((f"p{level}", feature) for level, feature in zip(self.fpn.levels, self.fpn(images)))


class _NormaliseOnly(GeneralizedRCNNTransform):
    """torchvision's detection transform (normalise, batch, map boxes back) without its resize."""

    def resize(self, image: torch.Tensor, target: dict | None = None):
        return image, target


class StockRetinaNet(nn.Module):
    """torchvision's RetinaNet with this example's calling convention (see ``model.RetinaNet``):
    ``forward(images, targets=None)`` with images (N, 3, H, W) uint8 or [0, 1] float; training returns
    ``{"loss_cls", "loss_box"}``, evaluation a dict of ``boxes``, ``scores``, ``labels`` per image."""

    def __init__(self, config: RetinaNetConfig):
        super().__init__()
        from torchvision.models.detection import RetinaNet
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        self.config = config
        self.normalizer_fn = None  # set by distributed.wrap; torchvision normalises per image itself
        fpn = ResNetFPN(config.depth, config.backbone_width, config.levels, config.fpn_channels,
                        config.backbone_norm)
        if config.weights:
            fpn.body.load_torchvision_checkpoint(config.weights)
        anchors = AnchorGenerator(
            sizes=tuple(tuple(size * scale for scale in config.anchor_scales) for size in config.anchor_sizes),
            aspect_ratios=(tuple(config.anchor_ratios),) * len(config.anchor_sizes),
        )
        head = None
        if config.detector == "torchvision_v2":
            from torchvision.models.detection.retinanet import RetinaNetHead

            head = RetinaNetHead(config.fpn_channels, anchors.num_anchors_per_location()[0], config.num_classes,
                                 norm_layer=partial(nn.GroupNorm, 32))
            head.regression_head._loss_type = "giou"
        self.detector = RetinaNet(
            _PyramidAsDict(fpn), config.num_classes, anchor_generator=anchors, head=head,
            score_thresh=config.score_threshold, nms_thresh=config.nms_threshold,
            detections_per_img=config.detections_per_image, topk_candidates=config.topk_candidates,
            fg_iou_thresh=config.fg_iou_threshold, bg_iou_thresh=config.bg_iou_threshold,
        )
        # The batches are already letterboxed squares of the training size: no resizing.
        self.detector.transform = _NormaliseOnly(min_size=1, max_size=1, image_mean=list(config.pixel_mean),
                                                 image_std=list(config.pixel_std))

    @property
    def backbone(self) -> ResNetFPN:
        return self.detector.backbone.fpn

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        device = next(self.parameters()).device
        images = images.to(device)
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        if self.training:
            if targets is None:
                raise ValueError("training needs targets")
            targets = [{"boxes": t["boxes"].to(device=device, dtype=torch.float32),
                        "labels": t["labels"].to(device=device, dtype=torch.int64)} for t in targets]
            losses = self.detector(list(images), targets)
            return {"loss_cls": losses["classification"], "loss_box": losses["bbox_regression"]}
        return self.detector(list(images))
