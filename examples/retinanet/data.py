"""COCO-format detection data: a checked dataset, transforms and a collate function (the batches a
training run draws from it are in ``batches``).

A sample is ``(image, target)``: ``image`` (3, S, S) uint8 (letterboxed: resized so the longer side is
S, padded bottom/right), ``target`` a dict with ``boxes`` (M, 4) float XYXY in the resized image,
``labels`` (M,) int64 contiguous class ids in [0, K), ``crowd_boxes`` (C, 4) (regions whose anchors the
matcher ignores), ``image_id``, ``scale`` (resized / original) and ``orig_size`` (original height, width:
detections are clipped to it, not to the padded square).
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .coco import coco_api, read_coco
from .errors import InputError


class CocoDetection(torch.utils.data.Dataset):
    """Images + a COCO annotation json, checked by :func:`~examples.retinanet.coco.read_coco` (clear errors,
    contiguous labels, degenerate boxes dropped, crowd boxes kept apart, unannotated images kept as
    negatives). ``require_annotations=False`` accepts a file without annotations (inference only)."""

    def __init__(self, image_root: str, annotation_file: str, transform=None, require_annotations: bool = True):
        self.image_root = image_root
        self.data = read_coco(annotation_file, image_root, require_annotations)
        self.images = self.data.images
        self.image_ids = [image.id for image in self.images]
        self.category_ids = self.data.category_ids  # contiguous label i <-> category_ids[i]
        self.label_of_category = {c: i for i, c in enumerate(self.category_ids)}
        self.class_names = self.data.class_names
        self.transform = transform
        self._coco = None

    @property
    def coco(self):
        """pycocotools' ``COCO`` over the checked annotations (built on first use, for evaluation)."""
        if self._coco is None:
            self._coco = coco_api(self.data.dataset)
        return self._coco

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> torch.Tensor:
        """(3, H, W) uint8 at its original size."""
        path = self.images[index].path
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as error:  # truncated or otherwise undecodable file
            raise InputError(f"image {path} could not be decoded: {error}") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def load_target(self, index: int) -> dict:
        """``boxes`` (M, 4) XYXY clipped to the image, ``labels`` (M,), ``crowd_boxes`` (C, 4),
        ``image_id``, ``scale`` 1.0 and ``orig_size`` (height, width) of the original image."""
        image = self.images[index]
        return {"boxes": torch.tensor(image.boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(image.labels, dtype=torch.int64),
                "crowd_boxes": torch.tensor(image.crowd_boxes, dtype=torch.float32).reshape(-1, 4),
                "image_id": image.id, "scale": 1.0, "orig_size": (image.height, image.width)}

    def __getitem__(self, index: int):
        image, target = self.load_image(index), self.load_target(index)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


class Letterbox:
    """Resize so the longer side equals ``size`` (bilinear), pad to ``size`` x ``size`` with zeros;
    boxes follow, and ``target["scale"]`` records the factor to map detections back."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: torch.Tensor, target: dict):
        _, h, w = image.shape
        scale = self.size / max(h, w)
        if scale != 1.0:
            new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
            image = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                                  align_corners=False, antialias=scale < 1)[0].round().clamp(0, 255).byte()
            target = {**target, "boxes": target["boxes"] * scale, "scale": target["scale"] * scale}
            if "crowd_boxes" in target:
                target["crowd_boxes"] = target["crowd_boxes"] * scale
        _, h, w = image.shape
        if (h, w) != (self.size, self.size):
            image = F.pad(image, (0, self.size - w, 0, self.size - h))
        return image, target


def flip_target(target: dict, width: int) -> dict:
    """``target`` with its ``boxes`` and ``crowd_boxes`` mirrored in an image ``width`` pixels wide."""
    mirrored = {}
    for key in ("boxes", "crowd_boxes"):
        if key in target:
            b = target[key]
            mirrored[key] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
    return {**target, **mirrored}


class RandomHorizontalFlip:
    """Flip with probability ``p``. Off for the digits benchmark: a mirrored digit is not a digit."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict):
        if self.p > 0 and torch.rand(()) < self.p:
            image, target = image.flip(-1), flip_target(target, image.shape[-1])
        return image, target


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


def build_transform(image_size: int, train: bool, flip_prob: float = 0.0) -> Compose:
    """Letterbox to ``image_size`` (+ random flip for training). Normalisation happens in the model
    (``RetinaNet.preprocess``) so that uint8 batches stay small in memory."""
    transforms = [Letterbox(image_size)]
    if train and flip_prob > 0:
        transforms.append(RandomHorizontalFlip(flip_prob))
    return Compose(transforms)


def collate(batch):
    """List of ``(image (3, S, S), target)`` -> ``(images (N, 3, S, S), [targets])``."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)
