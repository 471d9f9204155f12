"""Detect objects in images: detections as JSON and PNGs with boxes and labels drawn.

    python -m examples.retinanet.infer data/digits/val/000000.png data/digits/val/000001.png \\
        --checkpoint runs/retinanet/default/model_final.pth --output outputs/retinanet

Writes ``OUTPUT/detections.json`` (one entry per image: file, boxes in original pixels XYXY clipped to
the image, scores, contiguous labels, the dataset's category ids, class names) and
``OUTPUT/<image name>.png`` with the detections drawn.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: the OpenMP runtime reads its settings once (see entry)
    from .entry import configure_process

    configure_process()

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import Letterbox
from .errors import InputError, report_input_errors, require_file
from .evaluate import load_checkpoint, to_original_pixels

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def class_names_of(checkpoint: dict, num_classes: int) -> list[str]:
    if checkpoint.get("class_names"):
        return list(checkpoint["class_names"])
    if checkpoint.get("digits_params") is not None:
        from .digits import CLASS_NAMES

        return CLASS_NAMES
    return [str(i) for i in range(num_classes)]


def place_labels(anchors: list[tuple[float, float, float]], sizes: list[tuple[int, int]],
                 canvas_height: int) -> list[tuple[float, float]]:
    """Top-left corners for label boxes that do not overlap each other.

    ``anchors[i]`` = (x0, y0, y1) of detection i's box, ``sizes[i]`` = (width, height) of its label, in
    drawing order. A label goes just above its box (inside its top edge when there is no room above),
    then moves down one label height at a time past any label already placed that it would cover: two
    detections of one box (two classes) keep both labels readable.
    """
    placed: list[tuple[float, float, float, float]] = []
    corners = []
    for (x0, y0, _), (width, height) in zip(anchors, sizes):
        y = y0 - height if y0 >= height else y0
        for _ in range(len(placed) + 1):
            clash = [p for p in placed if x0 < p[2] and p[0] < x0 + width and y < p[3] and p[1] < y + height]
            if not clash:
                break
            y = max(p[3] for p in clash)
        y = min(y, max(0, canvas_height - height))
        placed.append((x0, y, x0 + width, y + height))
        corners.append((x0, y))
    return corners


def draw_detections(image: Image.Image, detections: dict, class_names: list[str], zoom: int = 1,
                    labels: bool = True) -> Image.Image:
    """Boxes (XYXY in ``image`` pixels) with "name score" labels (unless ``labels`` is false: dense
    scenes), drawn on a ``zoom``-times enlarged copy. Labels never cover one another (:func:`place_labels`)."""
    canvas = image.convert("RGB")
    if zoom != 1:
        canvas = canvas.resize((canvas.width * zoom, canvas.height * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    # Most confident first, so that it gets the place nearest its box.
    order = sorted(range(len(detections["scores"])), key=lambda i: -detections["scores"][i])
    texts, sizes, anchors = [], [], []
    for i in order:
        box, score, label = detections["boxes"][i], detections["scores"][i], detections["labels"][i]
        x0, y0, x1, y1 = (v * zoom for v in box)
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=max(1, zoom // 2))
        if not labels:
            continue
        text = f"{class_names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        texts.append((text, colour))
        sizes.append((right - left + 2, bottom - top + 2))
        anchors.append((x0, y0, y1))
    for (text, colour), (width, height), (x, y) in zip(texts, sizes, place_labels(anchors, sizes, canvas.height)):
        draw.rectangle([x, y, x + width, y + height], fill=colour)
        draw.text((x + 1, y), text, fill=(0, 0, 0))
    return canvas


@torch.no_grad()
def detect(model, images: list[Image.Image], image_size: int, score_threshold: float = 0.4) -> list[dict]:
    """Detections per image as plain lists, boxes in the original image's pixels."""
    letterbox = Letterbox(image_size)
    tensors, scales = [], []
    for image in images:
        tensor = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        tensor, meta = letterbox(tensor, {"boxes": torch.zeros(0, 4), "scale": 1.0})
        tensors.append(tensor)
        scales.append(meta["scale"])
    outputs = model(torch.stack(tensors))
    results = []
    for output, scale, image in zip(outputs, scales, images):
        keep = output["scores"] >= score_threshold
        boxes = to_original_pixels(output["boxes"][keep], scale, (image.height, image.width))
        results.append({"boxes": boxes.tolist(),
                        "scores": output["scores"][keep].tolist(), "labels": output["labels"][keep].tolist()})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="RetinaNet inference on image files")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--checkpoint", default="runs/retinanet/default/model_final.pth")
    parser.add_argument("--output", default="outputs/retinanet")
    parser.add_argument("--score-threshold", type=float, default=0.4, help="drawn and written detections")
    parser.add_argument("--image-size", type=int, default=None, help="default: the training size")
    parser.add_argument("--zoom", type=int, default=4, help="enlarge the drawn PNGs (small images)")
    parser.add_argument("--labels", action=argparse.BooleanOptionalAction, default=True,
                        help="'class score' beside each drawn box (--no-labels: boxes only, for dense scenes)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for flag in ("threads", "zoom", "image_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= args.score_threshold <= 1:
        parser.error(f"--score-threshold must be within [0, 1], got {args.score_threshold}")
    with report_input_errors(parser.prog):
        run(args)


def open_image(path: str, decode: bool = True) -> Image.Image | None:
    """The decoded image at ``path`` (with ``decode=False``: only its header read, None returned); an
    :class:`InputError` naming it when it cannot be read."""
    require_file(path, "image")
    try:
        with Image.open(path) as image:
            if not decode:
                return None
            image.load()
    except (OSError, ValueError) as error:
        raise InputError(f"image {path} is not a readable image: {error}") from None
    return image


def run(args) -> None:
    torch.set_num_threads(args.threads)
    for path in args.images:  # every file checked (header only) before the model loads
        open_image(path, decode=False)
    model, checkpoint = load_checkpoint(args.checkpoint)
    image_size = args.image_size or checkpoint.get("image_size", 96)
    class_names = class_names_of(checkpoint, model.config.num_classes)
    category_ids = checkpoint.get("category_ids") or list(range(model.config.num_classes))
    os.makedirs(args.output, exist_ok=True)
    records = []
    for path in args.images:
        image = open_image(path)
        (detections,) = detect(model, [image], image_size, args.score_threshold)
        stem = os.path.splitext(os.path.basename(path))[0]
        drawn_path = os.path.join(args.output, f"{stem}.png")
        draw_detections(image, detections, class_names, args.zoom, args.labels).save(drawn_path)
        records.append({"file": path, "drawn": drawn_path, **detections,
                        "category_ids": [category_ids[i] for i in detections["labels"]],
                        "names": [class_names[i] for i in detections["labels"]]})
        print(f"{path}: {len(detections['scores'])} detections -> {drawn_path}")
    with open(os.path.join(args.output, "detections.json"), "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
