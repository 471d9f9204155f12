"""Tiny COCO datasets written into a test's tmp_path: a few small PNGs with bright rectangles as objects,
and the annotation json, so that every data path can be exercised in seconds."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

TINY_MODEL_FLAGS = ["--backbone-width", "0.25", "--fpn-channels", "16", "--head-width", "16"]


def write_image(path: str, width: int, height: int, boxes=(), seed: int = 0) -> None:
    """A dark noisy (height, width) RGB PNG with each XYWH box of ``boxes`` filled bright."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 40, size=(height, width, 3), dtype=np.uint8)
    for x, y, w, h in boxes:
        x0, y0 = max(0, int(x)), max(0, int(y))
        array[y0: int(y + h), x0: int(x + w)] = 220
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def write_coco(root, name: str = "train", sizes=((48, 48),) * 4, objects=None, categories=(1, 2),
               annotations=None, extra: dict | None = None) -> str:
    """Write ``root/name/*.png`` and ``root/name.json``; returns the json path.

    ``sizes``: (width, height) per image. ``objects[i]``: list of ``(category_id, [x, y, w, h])`` or
    ``(category_id, bbox, iscrowd)`` for image i (default: one 16x16 object of the first category,
    moving with i). ``annotations`` replaces the generated list when given.
    """
    root = str(root)
    if objects is None:
        objects = [[(categories[i % len(categories)], [4 + 4 * i, 6 + 2 * i, 16, 16])] for i in range(len(sizes))]
    images, generated = [], []
    for i, (width, height) in enumerate(sizes):
        file_name = f"{name}/{i:03d}.png"
        drawn = [o[1] for o in objects[i] if o[1][2] > 0 and o[1][3] > 0]
        write_image(os.path.join(root, file_name), width, height, drawn, seed=i)
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        for obj in objects[i]:
            category, bbox = obj[0], obj[1]
            crowd = obj[2] if len(obj) > 2 else 0
            generated.append({"id": len(generated) + 1, "image_id": i + 1, "category_id": category,
                              "bbox": list(bbox), "area": bbox[2] * bbox[3], "iscrowd": crowd})
    data = {"images": images, "annotations": generated if annotations is None else annotations,
            "categories": [{"id": c, "name": f"class{c}"} for c in categories]}
    data.update(extra or {})
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path
