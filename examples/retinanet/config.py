"""Model configuration as plain keyword arguments, and the one function that builds a model from it.

Four presets:

* ``paper``: the configuration of the paper (ResNet + FPN P3-P7 with 256 channels, anchors of base size
  32..512, 256-wide heads without normalisation).
* ``fast`` (the default): the same architecture shrunk to what the built-in 96-px digits benchmark
  needs and a 2-core CPU can train in minutes. Every deviation from ``paper`` is listed in
  ``FAST_DEVIATIONS`` and in the README.
* ``imbalance``: the ``fast`` model on the paper-like-imbalance digits variant (256-px canvases with
  1-2 digits). The digits keep their 14-40 px, so the ``fast`` anchors (P3-P4, base sizes 16 and 32,
  16-51 px with the scales) already fit them and the model is ``fast``'s unchanged; what the preset
  changes is the data. ``train`` and ``ablate`` look up the digits variant of the preset in
  ``options.PRESET_DIGITS``, so ``--preset imbalance`` alone selects model, dataset and image size.
  The variant stays selectable on its own (``--digits imbalance``) to train any other model on it.
* ``trees``: the ``fast`` model with P3-P5 and anchors for the 8-107 px tree crowns of the real-image
  benchmark (``trees.py``); with ``options.PRESET_DATA`` and ``PRESET_TRAINING`` it also selects that
  data, 400-px tiles, the aerial augmentation, batch 4 and learning rate 0.01.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass


@dataclass
class RetinaNetConfig:
    num_classes: int = 80
    # "focal": this example's detector; "torchvision": stock torchvision RetinaNet on the same backbone,
    # anchors and data, for comparison (torchvision_stock.py says which fields it uses);
    # "torchvision_v2": the same with torchvision's v2 head (GroupNorm, GIoU box loss).
    detector: str = "focal"
    # Backbone: torchvision ResNet layout; ``backbone_width`` scales every stage's channels
    # (1.0 is torchvision's network, whose checkpoints ``weights`` can load).
    depth: int = 50
    backbone_width: float = 1.0
    # "bn": torchvision's BatchNorm; "gn": GroupNorm (32 groups or fewer), whose statistics do not depend
    # on how the batch is split across processes (with several GPUs, train's --sync-bn is the other way).
    backbone_norm: str = "bn"
    weights: str | None = None
    # FPN: which pyramid levels feed the heads (3..7) and their channel count.
    levels: tuple[int, ...] = (3, 4, 5, 6, 7)
    fpn_channels: int = 256
    # Anchors: one base size per level in ``levels``; scales and aspect ratios (height / width) shared.
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    anchor_scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # Matcher
    fg_iou_threshold: float = 0.5
    bg_iou_threshold: float = 0.4
    allow_low_quality_matches: bool = True
    # Heads
    head_width: int = 256
    head_convs: int = 4
    head_norm: str = "none"  # "none" or "gn" (GroupNorm, 32 groups or fewer)
    prior_prob: float = 0.01  # pi of the final classification bias; 0 disables the prior init
    # Loss
    loss_impl: str = "focal"  # "focal" (fused op), "reference" (focal.reference), "torchvision"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # The classification loss: "focal" (FL), or a relative from focal's family, each fused:
    # "focal_star" (FL*, the paper's Appendix A: gamma = focal_gamma, shift star_beta, alpha =
    # focal_alpha), "qfl" (quality focal loss) or "vfl" (varifocal loss), whose targets are the IoU
    # of each positive anchor's predicted box with its ground truth.
    cls_loss: str = "focal"
    star_beta: float = 1.0
    qfl_beta: float = 2.0
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0
    box_loss: str = "smooth_l1"  # "smooth_l1", "l1" or "giou"
    smooth_l1_beta: float = 0.11
    box_loss_weight: float = 1.0
    # Inference
    score_threshold: float = 0.05
    topk_candidates: int = 1000
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    # Input normalisation (ImageNet statistics, as torchvision's checkpoints expect)
    pixel_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels_last: bool = True

    def __post_init__(self) -> None:
        self.levels = tuple(int(v) for v in self.levels)
        self.anchor_sizes = tuple(float(v) for v in self.anchor_sizes)
        if len(self.anchor_sizes) != len(self.levels):
            raise ValueError(
                f"need one anchor size per level: levels={self.levels}, anchor_sizes={self.anchor_sizes}"
            )
        if not set(self.levels) <= {3, 4, 5, 6, 7}:
            raise ValueError(f"levels must be within 3..7, got {self.levels}")
        if self.detector not in CHOICES["detector"]:
            raise ValueError(f"detector must be one of {CHOICES['detector']}, got {self.detector!r}")
        if self.backbone_norm not in ("bn", "gn"):
            raise ValueError(f"backbone_norm must be 'bn' or 'gn', got {self.backbone_norm!r}")
        if self.head_norm not in ("none", "gn"):
            raise ValueError(f"head_norm must be 'none' or 'gn', got {self.head_norm!r}")
        if self.loss_impl not in ("focal", "reference", "torchvision"):
            raise ValueError(f"unknown loss_impl {self.loss_impl!r}")
        if self.box_loss not in ("smooth_l1", "l1", "giou"):
            raise ValueError(f"unknown box_loss {self.box_loss!r}")
        if self.cls_loss not in CHOICES["cls_loss"]:
            raise ValueError(f"cls_loss must be one of {CHOICES['cls_loss']}, got {self.cls_loss!r}")
        if self.cls_loss != "focal" and self.loss_impl != "focal":
            raise ValueError(f"loss_impl {self.loss_impl!r} implements the focal loss only; cls_loss "
                             f"{self.cls_loss!r} runs focal's fused op")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RetinaNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def paper_config(**overrides) -> RetinaNetConfig:
    return RetinaNetConfig(**overrides)


# The fast preset, and why each value differs from the paper.
FAST_DEVIATIONS = {
    "depth": (18, "ResNet-18: the smallest torchvision ResNet; the digits need no more"),
    "backbone_width": (0.5, "half the channels per stage (32..256): 4x fewer backbone FLOPs"),
    "levels": ((3, 4), "digits are 14-40 px in 96-px images: P3/P4 anchors cover them; P5-P7 "
               "would be 3x3..1x1 maps with no object of their size"),
    "fpn_channels": (64, "narrow FPN to match the narrow heads"),
    "anchor_sizes": ((16.0, 32.0), "base size 2x the stride (paper: 4x) so anchors fit 14-40 px digits"),
    "head_width": (64, "256-wide heads cost more than the backbone at 96 px"),
    "head_norm": ("gn", "GroupNorm in the subnets trains stably at the larger learning rate"),
    "num_classes": (10, "digits 0-9"),
}


def fast_config(**overrides) -> RetinaNetConfig:
    values = {name: value for name, (value, _why) in FAST_DEVIATIONS.items()}
    values.update(overrides)
    return RetinaNetConfig(**values)


def imbalance_config(**overrides) -> RetinaNetConfig:
    """The model of the ``imbalance`` benchmark: ``fast``'s, since its P3-P4 anchors were sized for the
    14-40 px digits, which the imbalance variant keeps; only the canvas (256 px) grows. A preset of its
    own so that one flag selects the benchmark (see the module docstring)."""
    return fast_config(**overrides)


# The trees preset (the real-image benchmark of trees.py), and why each value differs from fast's.
TREES_DEVIATIONS = {
    "levels": ((3, 4, 5), "crowns are 8-107 px (5-95 %: 16-71) in 400-px tiles: P3-P5, strides 8-32"),
    "anchor_sizes": ((16.0, 32.0, 64.0), "base size 2x the stride, as fast: anchors of 16-102 px; 98 % of the "
                     "training crowns have one with IoU >= 0.5 (at 1.5x the stride 94 %, at 1.25x 84 %; "
                     "python -m examples.retinanet.trees prints it)"),
    "num_classes": (1, "one class, tree"),
}


def trees_config(**overrides) -> RetinaNetConfig:
    """The ``fast`` model with pyramid levels and anchors sized for tree crowns (``TREES_DEVIATIONS``);
    its training options (data, 400-px tiles, augmentation; batch and learning rate) are in
    ``options.PRESET_DATA`` and ``options.PRESET_TRAINING``."""
    values = {name: value for name, (value, _why) in TREES_DEVIATIONS.items()}
    values.update(overrides)
    return fast_config(**values)


PRESETS = {"fast": fast_config, "imbalance": imbalance_config, "paper": paper_config, "trees": trees_config}


CHOICES = {
    "detector": ("focal", "torchvision", "torchvision_v2"),
    "head_norm": ("none", "gn"),
    "backbone_norm": ("bn", "gn"),
    "loss_impl": ("focal", "reference", "torchvision"),
    "box_loss": ("smooth_l1", "l1", "giou"),
    "cls_loss": ("focal", "focal_star", "qfl", "vfl"),
}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--preset`` and one ``--field-name`` flag per config field (default: the preset's value)."""
    group = parser.add_argument_group("model configuration (defaults come from --preset)")
    group.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    for f in dataclasses.fields(RetinaNetConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            group.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL")
        elif isinstance(default, tuple):
            kind = int if f.name == "levels" else float
            group.add_argument(flag, type=kind, nargs="+", default=None)
        elif default is None:
            group.add_argument(flag, type=str, default=None)
        else:
            group.add_argument(flag, type=type(default), default=None, choices=CHOICES.get(f.name))


def config_from_arguments(args: argparse.Namespace) -> RetinaNetConfig:
    overrides = {}
    for f in dataclasses.fields(RetinaNetConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            overrides[f.name] = tuple(value) if isinstance(value, list) else value
    if "levels" in overrides and "anchor_sizes" not in overrides:
        # Keep the preset's anchor-size-to-stride ratio (paper: 4, fast: 2) on the new levels.
        preset = PRESETS[args.preset]()
        ratio = preset.anchor_sizes[0] / 2 ** preset.levels[0]
        overrides["anchor_sizes"] = tuple(ratio * 2**level for level in overrides["levels"])
    return PRESETS[args.preset](**overrides)


def build_model(config: RetinaNetConfig):
    """The single place that turns a config into a :class:`~examples.retinanet.model.RetinaNet`."""
    if config.detector in ("torchvision", "torchvision_v2"):
        from .torchvision_stock import StockRetinaNet

        return StockRetinaNet(config)
    from .model import RetinaNet

    return RetinaNet(config)


__all__ = [
    "RetinaNetConfig",
    "FAST_DEVIATIONS",
    "PRESETS",
    "paper_config",
    "fast_config",
    "imbalance_config",
    "trees_config",
    "add_config_arguments",
    "config_from_arguments",
    "build_model",
]
