"""COCO evaluation (pycocotools' COCOeval): AP, AP50, AP75, APs/m/l.

    python -m examples.retinanet.evaluate --checkpoint runs/retinanet/default/model_final.pth

Without ``--val-json`` it evaluates on the built-in digits val split (``--data-root``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time

import torch

from .data import CocoDetection, build_transform, collate

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(model, dataset: CocoDetection, batch_size: int = 32, progress: bool = False) -> list[dict]:
    """Run ``model`` over ``dataset``; COCO result dicts with boxes in original image coordinates."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="evaluating", leave=False)
    results = []
    for images, targets in loader:
        for detections, target in zip(model(images), targets):
            boxes = detections["boxes"] / target["scale"]
            boxes[:, 2:] -= boxes[:, :2]  # XYXY -> XYWH
            for box, score, label in zip(boxes.tolist(), detections["scores"].tolist(),
                                         detections["labels"].tolist()):
                results.append({"image_id": target["image_id"], "category_id": dataset.category_ids[label],
                                "bbox": [round(v, 2) for v in box], "score": round(score, 5)})
    return results


def coco_evaluate(dataset: CocoDetection, results: list[dict], verbose: bool = False) -> dict:
    """COCOeval bbox stats as ``{"AP": ..., "AP50": ..., ...}`` (zeros when there is no detection)."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        detections = dataset.coco.loadRes(results)
        evaluator = COCOeval(dataset.coco, detections, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats[:6])}


def evaluate_model(model, image_root: str, annotation_file: str, image_size: int, batch_size: int = 32,
                   verbose: bool = False, progress: bool = False) -> dict:
    dataset = CocoDetection(image_root, annotation_file, build_transform(image_size, train=False))
    start = time.perf_counter()
    results = predict(model, dataset, batch_size, progress)
    stats = coco_evaluate(dataset, results, verbose)
    stats["eval_seconds"] = time.perf_counter() - start
    stats["num_detections"] = len(results)
    return stats


def load_checkpoint(path: str):
    """``(model, checkpoint)`` from a file written by ``train``; the model is in eval mode."""
    from .config import RetinaNetConfig, build_model

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    config = RetinaNetConfig.from_dict({**checkpoint["config"], "weights": None})
    model = build_model(config)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def data_root(args, checkpoint: dict) -> str:
    """``--data-root`` if given, else the digits folder the checkpoint trained on (recorded in its
    options), else ``data/digits``: evaluating a checkpoint of one digits variant must not regenerate
    another variant's folder."""
    return args.data_root or (checkpoint.get("options") or {}).get("data_root") or "data/digits"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="COCO AP of a RetinaNet checkpoint")
    parser.add_argument("--checkpoint", default="runs/retinanet/default/model_final.pth")
    parser.add_argument("--data-root", default=None,
                        help="built-in digits dataset folder; default: the one the checkpoint trained on")
    parser.add_argument("--image-root", default=None, help="image folder of a COCO dataset")
    parser.add_argument("--val-json", default=None, help="COCO annotation json to evaluate on")
    parser.add_argument("--image-size", type=int, default=None, help="default: the training size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="write the stats here as json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, checkpoint = load_checkpoint(args.checkpoint)
    image_size = args.image_size or checkpoint.get("image_size", 96)
    if args.val_json:
        image_root, annotation_file = args.image_root or os.path.dirname(args.val_json), args.val_json
    else:
        from .digits import DigitsParams, ensure_digits_dataset

        params = DigitsParams(**checkpoint["digits_params"]) if checkpoint.get("digits_params") else None
        image_root, annotation_file = ensure_digits_dataset(data_root(args, checkpoint), params)["val"]
    stats = evaluate_model(model, image_root, annotation_file, image_size, args.batch_size, verbose=True,
                           progress=True)
    print(json.dumps({k: round(v, 4) for k, v in stats.items()}))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(stats, f, indent=1)


if __name__ == "__main__":
    main()
