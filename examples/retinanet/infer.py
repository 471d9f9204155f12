"""Detect objects in images: detections as JSON and PNGs with boxes and labels drawn.

    python -m examples.retinanet.infer data/digits/val/000000.png data/digits/val/000001.png \\
        --checkpoint runs/retinanet/default/model_final.pth --output outputs/retinanet

Writes ``OUTPUT/detections.json`` (one entry per image: file, boxes in original pixels XYXY, scores,
labels, class names) and ``OUTPUT/<image name>.png`` with the detections drawn.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import Letterbox
from .evaluate import load_checkpoint

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def class_names_of(checkpoint: dict, num_classes: int) -> list[str]:
    if checkpoint.get("class_names"):
        return list(checkpoint["class_names"])
    if checkpoint.get("digits_params") is not None:
        from .digits import CLASS_NAMES

        return CLASS_NAMES
    return [str(i) for i in range(num_classes)]


def draw_detections(image: Image.Image, detections: dict, class_names: list[str], zoom: int = 1) -> Image.Image:
    """Boxes (XYXY in ``image`` pixels) with "name score" labels, drawn on a ``zoom``-times enlarged copy."""
    canvas = image.convert("RGB")
    if zoom != 1:
        canvas = canvas.resize((canvas.width * zoom, canvas.height * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    # Lowest score first, so that the most confident detection's label ends up on top.
    order = sorted(range(len(detections["scores"])), key=lambda i: detections["scores"][i])
    for i in order:
        box, score, label = detections["boxes"][i], detections["scores"][i], detections["labels"][i]
        colour = PALETTE[label % len(PALETTE)]
        x0, y0, x1, y1 = (v * zoom for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=max(1, zoom // 2))
        text = f"{class_names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        text_h = bottom - top + 2
        text_y = y0 - text_h if y0 >= text_h else y0  # inside the box when there is no room above
        draw.rectangle([x0, text_y, x0 + (right - left) + 2, text_y + text_h], fill=colour)
        draw.text((x0 + 1, text_y), text, fill=(0, 0, 0))
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
    for output, scale in zip(outputs, scales):
        keep = output["scores"] >= score_threshold
        results.append({"boxes": (output["boxes"][keep] / scale).tolist(),
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
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, checkpoint = load_checkpoint(args.checkpoint)
    image_size = args.image_size or checkpoint.get("image_size", 96)
    class_names = class_names_of(checkpoint, model.config.num_classes)
    os.makedirs(args.output, exist_ok=True)
    records = []
    for path in args.images:
        with Image.open(path) as image:
            image.load()
        (detections,) = detect(model, [image], image_size, args.score_threshold)
        stem = os.path.splitext(os.path.basename(path))[0]
        drawn_path = os.path.join(args.output, f"{stem}.png")
        draw_detections(image, detections, class_names, args.zoom).save(drawn_path)
        records.append({"file": path, "drawn": drawn_path, **detections,
                        "names": [class_names[i] for i in detections["labels"]]})
        print(f"{path}: {len(detections['scores'])} detections -> {drawn_path}")
    with open(os.path.join(args.output, "detections.json"), "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
