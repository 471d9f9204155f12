"""Reading a COCO-format annotation file for training and evaluation, with every problem reported.

``read_coco`` checks what the rest of the example relies on and says which file is wrong otherwise:
the json parses, has ``images``, ``annotations`` and ``categories``; every image file exists and its
header can be read (its real size is taken from it); every annotation names a known image and
category and has a four-number ``bbox``. It then

* maps category ids (any integers, e.g. COCO's 1..90 with gaps) to contiguous labels 0..K-1 in
  ascending id order (``category_ids[label]`` maps back, for evaluation and written detections);
* drops degenerate boxes (zero or negative width or height, or nothing left after clipping to the
  image) and clips the rest to the image, with one warning that counts them;
* keeps ``iscrowd`` boxes apart: they are not objects to detect, the matcher ignores anchors on them;
* keeps images without annotations: they are negatives (every anchor is background).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from .errors import InputError, require_file


class DegenerateBoxWarning(UserWarning):
    """Boxes of an annotation file were dropped as degenerate (one warning per file, with the count)."""


@dataclass
class CocoImage:
    """One image: its id, file (joined with the image root), real size, and its boxes in pixels XYXY."""

    id: int
    path: str
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    crowd_boxes: list[list[float]] = field(default_factory=list)


@dataclass
class CocoData:
    """A checked annotation file: ``images`` sorted by id; ``category_ids[label]`` is the dataset's id of
    contiguous label ``label``; ``dataset`` is the json with degenerate boxes removed and ``iscrowd`` and
    ``area`` filled in, ready for pycocotools."""

    path: str
    images: list[CocoImage]
    category_ids: list[int]
    class_names: list[str]
    dataset: dict
    num_dropped: int = 0
    num_annotations: int = 0


def read_json(path: str, what: str = "annotation file"):
    """The parsed json at ``path``; an :class:`InputError` naming the file for anything else."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise InputError(f"{what} {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                         f"{error.msg})") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not a UTF-8 text file") from None


def _list_field(data: dict, key: str, path: str) -> list:
    if key not in data:
        raise InputError(f"annotation file {path} has no '{key}' list (not a COCO detection file?)")
    if not isinstance(data[key], list):
        raise InputError(f"annotation file {path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data[key]


def _image_size(path: str, json_path: str, image_id) -> tuple[int, int]:
    """(width, height) from the image header (no decoding): also proves the file is a readable image."""
    if not os.path.isfile(path):
        raise InputError(f"image {path} (id {image_id} in {json_path}) does not exist")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"image {path} (id {image_id} in {json_path}) is not a readable image: {error}") from None


def _clip(bbox, width: int, height: int) -> list[float] | None:
    """COCO XYWH -> XYXY clipped to the image, or None when degenerate (no area, or outside)."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1, y1]


def read_coco(annotation_file: str, image_root: str, require_annotations: bool = True) -> CocoData:
    """Read and check ``annotation_file`` (images relative to ``image_root``); see the module docstring.

    ``require_annotations``: a file without any (non-crowd) annotation is an error (nothing to learn,
    and COCO AP would be undefined, -1), as is a file without images.
    """
    data = read_json(annotation_file)
    if not isinstance(data, dict):
        raise InputError(f"annotation file {annotation_file} must hold a JSON object with 'images', "
                         f"'annotations' and 'categories', got a {type(data).__name__}")
    images_json = _list_field(data, "images", annotation_file)
    categories = _list_field(data, "categories", annotation_file)
    annotations = data.get("annotations")
    if annotations is None and require_annotations:
        raise InputError(f"annotation file {annotation_file} has no 'annotations' list: nothing to train on "
                         f"or evaluate against (COCO AP would be -1)")
    annotations = _list_field(data, "annotations", annotation_file) if annotations is not None else []
    if not images_json:
        raise InputError(f"annotation file {annotation_file} lists no images")
    if not categories:
        raise InputError(f"annotation file {annotation_file} lists no categories")
    try:
        category_ids = sorted(int(c["id"]) for c in categories)
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    except (KeyError, TypeError, ValueError):
        raise InputError(f"annotation file {annotation_file}: every category needs an integer 'id'") from None
    if len(set(category_ids)) != len(category_ids):
        raise InputError(f"annotation file {annotation_file}: category ids are not unique")
    label_of = {c: i for i, c in enumerate(category_ids)}

    by_id: dict[int, CocoImage] = {}
    for entry in images_json:
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise InputError(f"annotation file {annotation_file}: every image needs 'id' and 'file_name', "
                             f"got {str(entry)[:80]}")
        if entry["id"] in by_id:
            raise InputError(f"annotation file {annotation_file}: image id {entry['id']} appears twice")
        path = os.path.join(image_root, entry["file_name"])
        width, height = _image_size(path, annotation_file, entry["id"])
        by_id[entry["id"]] = CocoImage(entry["id"], path, width, height)

    kept, dropped, num_objects = [], 0, 0
    for number, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= set(ann):
            raise InputError(f"annotation file {annotation_file}: annotation #{number} needs 'image_id', "
                             f"'category_id' and 'bbox'")
        image = by_id.get(ann["image_id"])
        if image is None:
            raise InputError(f"annotation file {annotation_file}: annotation #{number} refers to image id "
                             f"{ann['image_id']}, which is not in 'images'")
        if ann["category_id"] not in label_of:
            raise InputError(f"annotation file {annotation_file}: annotation #{number} has category id "
                             f"{ann['category_id']}, which is not in 'categories'")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise InputError(f"annotation file {annotation_file}: annotation #{number} has bbox {bbox!r}, "
                             f"expected [x, y, width, height]")
        box = _clip(bbox, image.width, image.height)
        if box is None:
            dropped += 1
            continue
        if ann.get("iscrowd", 0):
            image.crowd_boxes.append(box)
        else:
            image.boxes.append(box)
            image.labels.append(label_of[ann["category_id"]])
            num_objects += 1
        kept.append({**ann, "iscrowd": int(ann.get("iscrowd", 0)), "area": ann.get("area", bbox[2] * bbox[3]),
                     "id": ann.get("id", number + 1)})
    if require_annotations and num_objects == 0:
        raise InputError(f"annotation file {annotation_file} has no usable annotations"
                         f"{f' ({dropped} degenerate boxes dropped)' if dropped else ''}: nothing to train "
                         f"on or evaluate against (COCO AP would be -1)")
    if dropped:
        warnings.warn(f"{annotation_file}: dropped {dropped} of {len(annotations)} boxes as degenerate "
                      f"(zero or negative size, or outside the image)", DegenerateBoxWarning, stacklevel=2)
    dataset = {**data, "annotations": kept,
               "categories": [{**c, "id": int(c["id"])} for c in categories]}
    return CocoData(annotation_file, [by_id[i] for i in sorted(by_id)], category_ids,
                    [names[c] for c in category_ids], dataset, dropped, num_objects)


def coco_api(dataset: dict):
    """A pycocotools ``COCO`` over an in-memory ``dataset`` dict, built without its progress prints."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def dataset_layout(root: str) -> dict:
    """``{"train": (image_root, json), "val": (image_root, json) or None}`` of a COCO-format folder.

    Two layouts are recognised, checked in this order:

    * ``ROOT/train.json`` and optionally ``ROOT/val.json``, image paths relative to ``ROOT`` (what
      ``digits`` writes);
    * COCO's own: ``ROOT/annotations/instances_<split>.json`` with the images of that split in
      ``ROOT/<split>/`` (e.g. ``instances_train2017.json`` and ``train2017/``), one train and at most
      one val split.
    """
    from .errors import require_directory

    require_directory(root, "--data folder")
    train_json, val_json = os.path.join(root, "train.json"), os.path.join(root, "val.json")
    if os.path.isfile(train_json):
        return {"train": (root, train_json), "val": (root, val_json) if os.path.isfile(val_json) else None}
    annotations = os.path.join(root, "annotations")
    found = {}
    if os.path.isdir(annotations):
        for name in sorted(os.listdir(annotations)):
            if name.startswith("instances_") and name.endswith(".json"):
                split = name[len("instances_"):-len(".json")]
                kind = "train" if split.startswith("train") else "val" if split.startswith("val") else None
                if kind is not None:
                    if kind in found:
                        raise InputError(f"--data {root}: more than one {kind} split in {annotations} "
                                         f"({found[kind][1]} and {name}); pass --train-json/--val-json")
                    found[kind] = (os.path.join(root, split), os.path.join(annotations, name))
    if "train" not in found:
        raise InputError(f"--data {root}: found neither {train_json} nor {annotations}/instances_train*.json")
    return {"train": found["train"], "val": found.get("val")}
