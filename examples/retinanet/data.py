"""COCO-format detection data: a pycocotools-backed dataset, transforms, a collate function, and an
in-memory batch sampler for small datasets.

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


class InMemoryBatches:
    """The whole (transformed) dataset decoded once into one (N, 3, S, S) uint8 tensor, then served as
    batches by indexing: no per-step PNG decoding, no worker processes.

    The order is ``torch.utils.data.DistributedSampler``'s (``shuffle``, ``drop_last``, ``set_epoch``):
    epoch ``e`` shuffles with a generator seeded ``seed + e`` and process ``rank`` takes every
    ``world_size``-th image; its step-k batch is the k-th run of ``batch_size`` of those. So the union
    of the processes' step-k batches is the step-k batch of one process with ``batch_size *
    world_size`` images, whatever the process count, and the position in the data is two integers
    (``state_dict``): resuming is exact. ``flip_prob`` flips an image left-right with a decision drawn
    per (epoch, image), likewise independent of the process count.
    """

    def __init__(self, dataset: CocoDetection, batch_size: int, flip_prob: float = 0.0, seed: int = 0,
                 progress: bool = False, rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if global_batch > len(dataset):
            raise InputError(f"batch size {global_batch} is larger than the {len(dataset)} images of "
                             f"{dataset.data.path}: lower --batch-size")
        items = range(len(dataset))
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc="loading images", leave=False)
        samples = [dataset[i] for i in items]
        self.images = torch.stack([s[0] for s in samples])
        self.targets = [s[1] for s in samples]
        self.class_names = list(dataset.class_names)
        self.category_ids = list(dataset.category_ids)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.flip_prob = flip_prob
        self.seed = seed
        self.batches_per_epoch = len(self) // global_batch
        self.epoch, self.position = 0, 0
        self._epoch_order: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def state_dict(self) -> dict:
        """The position in the data: ``{"epoch", "position"}`` (batches already served this epoch)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's indices for the epoch (from the sampler) and flip decisions per dataset index (N,)."""
        if self._epoch_order is None or self._epoch_order[0] != self.epoch:
            sampler = torch.utils.data.DistributedSampler(range(len(self)), num_replicas=self.world_size,
                                                          rank=self.rank, shuffle=True, seed=self.seed,
                                                          drop_last=True)
            sampler.set_epoch(self.epoch)
            order = torch.tensor(list(sampler), dtype=torch.int64)
            # Flips from the same per-epoch generator, past the sampler's permutation: identical on
            # every process, a function of (seed, epoch, image).
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            torch.randperm(len(self), generator=generator)
            flips = torch.rand(len(self), generator=generator) < self.flip_prob
            self._epoch_order = (self.epoch, order, flips)
        return self._epoch_order[1], self._epoch_order[2]

    def next_batch(self):
        """``(images (B, 3, S, S) uint8, [targets])`` of this process; B is ``batch_size``."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order, flips = self._order()
        index = order[self.position * self.batch_size: (self.position + 1) * self.batch_size]
        self.position += 1
        images = self.images[index]
        targets = [self.targets[i] for i in index.tolist()]
        flip = flips[index]
        if flip.any():
            images = images.clone()
            images[flip] = images[flip].flip(-1)
            width = images.shape[-1]
            targets = [flip_target(t, width) if f else t for t, f in zip(targets, flip.tolist())]
        return images, targets
