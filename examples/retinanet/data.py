"""COCO-format detection data: a pycocotools-backed dataset, transforms, a collate function, and an
in-memory batch sampler for small datasets.

A sample is ``(image, target)``: ``image`` (3, S, S) uint8 (letterboxed: resized so the longer side is
S, padded bottom/right), ``target`` a dict with ``boxes`` (M, 4) float XYXY in the resized image,
``labels`` (M,) int64 contiguous class ids in [0, K), ``image_id`` and ``scale`` (resized / original).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class CocoDetection(torch.utils.data.Dataset):
    """Images + a COCO annotation json, read with pycocotools. Crowd annotations are dropped."""

    def __init__(self, image_root: str, annotation_file: str, transform=None):
        from pycocotools.coco import COCO

        self.image_root = image_root
        self.coco = COCO(annotation_file)
        self.image_ids = sorted(self.coco.getImgIds())
        self.category_ids = sorted(self.coco.getCatIds())  # contiguous label i <-> category_ids[i]
        self.label_of_category = {c: i for i, c in enumerate(self.category_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, index: int) -> torch.Tensor:
        """(3, H, W) uint8 at its original size."""
        info = self.coco.imgs[self.image_ids[index]]
        with Image.open(os.path.join(self.image_root, info["file_name"])) as image:
            array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def load_target(self, index: int) -> dict:
        image_id = self.image_ids[index]
        annotations = self.coco.imgToAnns.get(image_id, [])
        boxes = [a["bbox"] for a in annotations if not a.get("iscrowd", 0)]
        labels = [self.label_of_category[a["category_id"]] for a in annotations if not a.get("iscrowd", 0)]
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "image_id": image_id,
                "scale": 1.0}

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
        _, h, w = image.shape
        if (h, w) != (self.size, self.size):
            image = F.pad(image, (0, self.size - w, 0, self.size - h))
        return image, target


def horizontal_flip(images: torch.Tensor, boxes: list[torch.Tensor]):
    """Flip (N, 3, H, W) images and their XYXY boxes left-right."""
    width = images.shape[-1]
    flipped = [torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1) for b in boxes]
    return images.flip(-1), flipped


class RandomHorizontalFlip:
    """Flip with probability ``p``. Off for the digits benchmark: a mirrored digit is not a digit."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict):
        if self.p > 0 and torch.rand(()) < self.p:
            flipped, (boxes,) = horizontal_flip(image[None], [target["boxes"]])
            image, target = flipped[0], {**target, "boxes": boxes}
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


class InMemoryBatches:
    """The whole (transformed) dataset decoded once into one (N, 3, S, S) uint8 tensor, then served as
    random batches by indexing: no per-step PNG decoding, no worker processes.

    ``flip_prob`` applies a random horizontal flip per image at batch time.
    """

    def __init__(self, dataset: CocoDetection, batch_size: int, flip_prob: float = 0.0, seed: int = 0,
                 progress: bool = False):
        items = range(len(dataset))
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc="loading images", leave=False)
        samples = [dataset[i] for i in items]
        self.images = torch.stack([s[0] for s in samples])
        self.targets = [s[1] for s in samples]
        self.class_names = list(dataset.class_names)
        self.batch_size = batch_size
        self.flip_prob = flip_prob
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def next_batch(self):
        """``(images (B, 3, S, S) uint8, [targets])``, sampled without replacement within an epoch."""
        if len(self._order) < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(len(self), generator=self.generator)])
        index, self._order = self._order[: self.batch_size], self._order[self.batch_size:]
        images = self.images[index]
        targets = [self.targets[i] for i in index.tolist()]
        if self.flip_prob > 0:
            flip = torch.rand(len(index), generator=self.generator) < self.flip_prob
            if flip.any():
                flipped, boxes = horizontal_flip(images[flip], [targets[i]["boxes"] for i in flip.nonzero()[:, 0]])
                images = images.clone()
                images[flip] = flipped
                targets = list(targets)
                for j, i in enumerate(flip.nonzero()[:, 0].tolist()):
                    targets[i] = {**targets[i], "boxes": boxes[j]}
        return images, targets
