"""Training-time augmentation with ``torchvision.transforms.v2``, boxes carried as ``tv_tensors``.

``--augment`` names a pipeline (``AUGMENT_CHOICES``, built by ``_pipeline``):

* ``digits``: what a digit detector should not depend on: scale (0.7-1.4 about the centre, half the
  images), colour (brightness, contrast, saturation, hue, channel order, inverted, solarised,
  stretched or grey), sharpness, blur, pixel noise and clutter (thin bars of random pixels). No flips
  or rotations: a mirrored or turned digit is another symbol or none.
* ``aerial``: what changes between aerial photographs: orientation (left-right and up-down flips; a
  crown seen from above has no up), scale (0.8-1.25, crowns differ between sites), light and colour,
  and a slight blur (sensors and resampling).
* ``none``: nothing.

Each image's random draws are a function of (seed, epoch, dataset index) alone, as the flips of
``batches.BatchOrder`` are: a batch is augmented the same however many processes share it and after
a resume, and the process's own random state is left untouched.

Boxes follow the pixels: the geometric transforms map them, boxes pushed partly off the canvas are
clipped to it, and those left with less than 2 px of width or height are dropped with their labels.
``crowd_boxes`` (regions the matcher ignores) travel with the boxes, labelled -1 on the way.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

AUGMENT_CHOICES = ("none", "digits", "aerial")


def _pipeline(name: str) -> v2.Transform | None:
    """The v2 transform of ``--augment name`` on a float [0, 1] image (None for "none")."""
    if name == "none":
        return None
    if name == "digits":
        steps = [
            v2.RandomApply([v2.RandomAffine(degrees=0, scale=(0.7, 1.4))], p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.6)], p=0.8),
            v2.RandomApply([v2.ColorJitter(hue=0.1)], p=0.2),  # apart: the hue shift costs 3x the rest
            v2.RandomApply([v2.RandomChannelPermutation()], p=0.5),
            v2.RandomInvert(p=0.2),
            v2.RandomSolarize(threshold=0.5, p=0.15),
            v2.RandomAutocontrast(p=0.2),
            v2.RandomAdjustSharpness(sharpness_factor=3.0, p=0.2),
            v2.RandomGrayscale(p=0.1),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.2))], p=0.3),
            v2.RandomApply([v2.GaussianNoise(sigma=0.05)], p=0.3),
            v2.RandomErasing(p=0.5, scale=(0.002, 0.02), ratio=(0.1, 10.0), value="random"),
        ]
    elif name == "aerial":
        steps = [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomVerticalFlip(p=0.5),
            v2.RandomAffine(degrees=0, scale=(0.8, 1.25)),
            v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)], p=0.8),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.0))], p=0.2),
        ]
    else:
        raise ValueError(f"--augment must be one of {AUGMENT_CHOICES}, got {name!r}")
    return v2.Compose(steps + [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2.0)])


class Augmentation:
    """Augments a batch ``(images (B, 3, S, S) uint8, [targets])`` image by image (module docstring)."""

    def __init__(self, name: str, seed: int = 0):
        self.name, self.seed = name, seed
        self.transform = _pipeline(name)

    def image_seed(self, epoch: int, index: int) -> int:
        """The seed of dataset image ``index``'s draws in ``epoch``: well mixed, process-independent."""
        return int(np.random.SeedSequence([self.seed, epoch, index, 0xA06]).generate_state(1)[0])

    def __call__(self, images: torch.Tensor, targets: list[dict], indices: list[int], epoch: int):
        if self.transform is None:
            return images, targets
        out_images, out_targets = [], []
        with warnings.catch_warnings():  # RandomErasing leaves boxes as they are, as intended for clutter
            warnings.filterwarnings("ignore", "RandomErasing", UserWarning)
            for image, target, index in zip(images, targets, indices):
                with torch.random.fork_rng(devices=[]):  # v2 draws from the CPU generator alone
                    torch.random.default_generator.manual_seed(self.image_seed(epoch, index))
                    image, target = self.one(image, target)
                out_images.append(image)
                out_targets.append(target)
        return torch.stack(out_images), out_targets

    def one(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        """One (3, H, W) uint8 image and its target, transformed with the current random state."""
        crowd = target.get("crowd_boxes", torch.zeros(0, 4))
        boxes = torch.cat([target["boxes"].reshape(-1, 4), crowd.reshape(-1, 4)])
        labels = torch.cat([target["labels"], torch.full((len(crowd),), -1, dtype=torch.int64)])
        sample = {"image": tv_tensors.Image(image.float() / 255.0),
                  "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:])),
                  "labels": labels}
        out = self.transform(sample)
        pixels = (out["image"].as_subclass(torch.Tensor).clamp(0, 1) * 255.0).round().to(torch.uint8)
        boxes, labels = out["boxes"].as_subclass(torch.Tensor), out["labels"]
        objects = labels >= 0
        return pixels, {**target, "boxes": boxes[objects], "labels": labels[objects],
                        "crowd_boxes": boxes[~objects]}
