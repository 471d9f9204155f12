"""COCO evaluation (pycocotools' COCOeval): AP, AP50, AP75, APs/m/l.

    python -m examples.retinanet.evaluate --checkpoint runs/retinanet/default/model_final.pth

Without ``--data`` or ``--val-json`` it evaluates on the val split of the data the checkpoint trained
on: its ``--data`` folder, or its built-in digits (``--data-root``). ``--held-out-style`` (digits
checkpoints) also evaluates on the generator's held-out style (``digits.STYLES``), never drawn in
training, and reports both APs and their ratio:

    python -m examples.retinanet.evaluate --checkpoint runs/retinanet/default/model_final.pth --held-out-style
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: the OpenMP runtime reads its settings once (see entry)
    from .entry import configure_process

    configure_process()

import argparse
import contextlib
import io
import json
import os
import time

import torch

from .checkpoint import load_training_checkpoint
from .data import CocoDetection, build_transform, collate
from .errors import InputError, report_input_errors

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_original_pixels(boxes: torch.Tensor, scale: float, orig_size: tuple[int, int]) -> torch.Tensor:
    """Letterboxed XYXY ``boxes`` (D, 4) -> pixels of the original image, clipped to its (height, width):
    the letterbox pads the image to a square, and a box reaching into the padding is cut at the real
    image's edge."""
    height, width = orig_size
    boxes = boxes / scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def check_classes(num_classes: int, trained: list[int] | None, dataset: CocoDetection,
                  checkpoint_path: str = "checkpoint") -> None:
    """An :class:`InputError` when a model of ``num_classes`` outputs, trained on category ids
    ``trained`` (None: not recorded), does not predict ``dataset``'s classes (another class count, or
    the same count of other category ids): its AP would be a number without meaning."""
    expected = len(dataset.category_ids)
    if num_classes != expected:
        raise InputError(f"{checkpoint_path} predicts {num_classes} classes but {dataset.data.path} has "
                         f"{expected} categories: evaluate on the dataset the model was trained on")
    if trained is not None and list(trained) != list(dataset.category_ids):
        raise InputError(f"{checkpoint_path} was trained on category ids {_first(trained)}, "
                         f"{dataset.data.path} has {_first(dataset.category_ids)}: not the same classes")


def _first(ids, count: int = 10) -> str:
    """The first ``count`` ids for a message, "..." when there are more."""
    ids = list(ids)
    return str(ids[:count])[:-1] + (", ...]" if len(ids) > count else "]")


@torch.no_grad()
def predict(model, dataset: CocoDetection, batch_size: int = 32, progress: bool = False,
            shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run ``model`` over ``dataset``; COCO result dicts with boxes in original image coordinates and
    the dataset's category ids. ``shard=(rank, world_size)`` predicts every world_size-th image only."""
    model.eval()
    rank, world_size = shard
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="evaluating", leave=False)
    results = []
    for images, targets in loader:
        for detections, target in zip(model(images), targets):
            boxes = to_original_pixels(detections["boxes"], target["scale"], target["orig_size"])
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


def evaluate_dataset(model, dataset: CocoDetection, batch_size: int = 32, verbose: bool = False,
                     progress: bool = False) -> dict | None:
    """COCO stats of ``model`` on ``dataset``. Under ``torchrun`` every process predicts its share of
    the images and rank 0 gathers all detections and evaluates; the other ranks return None."""
    from . import distributed

    ctx = distributed.context()
    start = time.perf_counter()
    shard = predict(model, dataset, batch_size, progress and ctx.is_main, (ctx.rank, ctx.world_size))
    results = [r for part in distributed.all_gather(shard) for r in part]
    if not ctx.is_main:
        return None
    stats = coco_evaluate(dataset, results, verbose)
    stats["eval_seconds"] = time.perf_counter() - start
    stats["num_detections"] = len(results)
    return stats


def evaluate_model(model, image_root: str, annotation_file: str, image_size: int, batch_size: int = 32,
                   verbose: bool = False, progress: bool = False, checkpoint: dict | None = None,
                   checkpoint_path: str = "the model") -> dict:
    """COCO stats of ``model`` on a COCO dataset, after checking that its classes are the dataset's."""
    dataset = CocoDetection(image_root, annotation_file, build_transform(image_size, train=False))
    check_classes(model.config.num_classes, (checkpoint or {}).get("category_ids"), dataset, checkpoint_path)
    return evaluate_dataset(model, dataset, batch_size, verbose, progress)


def load_checkpoint(path: str):
    """``(model, checkpoint)`` from a file written by ``train`` (loaded with ``weights_only=True``);
    the model is in eval mode."""
    from .config import RetinaNetConfig, build_model

    checkpoint = load_training_checkpoint(path)
    config = RetinaNetConfig.from_dict({**checkpoint["config"], "weights": None})
    model = build_model(config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise InputError(f"checkpoint {path}: weights do not fit its own config: "
                         f"{str(error).splitlines()[0]}") from None
    return model.eval(), checkpoint


def data_root(args, checkpoint: dict) -> str:
    """``--data-root`` if given, else the digits folder the checkpoint trained on (recorded in its
    options), else ``data/digits``: evaluating a checkpoint of one digits variant must not regenerate
    another variant's folder."""
    return args.data_root or (checkpoint.get("options") or {}).get("data_root") or "data/digits"


def checkpoint_digits(args, checkpoint: dict, split: str, max_images: int) -> torch.utils.data.Dataset:
    """The first ``max_images`` images of the built-in digits ``split`` ("train" or "val") the
    checkpoint trained on (its dataset parameters, ``data_root`` above), at its training size."""
    from .digits import ensure_digits_dataset, params_from_record

    params = params_from_record(checkpoint["digits_params"]) if checkpoint.get("digits_params") else None
    image_root, annotation_file = ensure_digits_dataset(data_root(args, checkpoint), params)[split]
    dataset = CocoDetection(image_root, annotation_file, build_transform(checkpoint.get("image_size", 96), False))
    return torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="COCO AP of a RetinaNet checkpoint")
    parser.add_argument("--checkpoint", default="runs/retinanet/default/model_final.pth")
    parser.add_argument("--data-root", default=None,
                        help="built-in digits dataset folder; default: the one the checkpoint trained on")
    parser.add_argument("--data", default=None, help="a COCO-format folder (its val split), as train's --data")
    parser.add_argument("--image-root", default=None, help="image folder of a COCO dataset")
    parser.add_argument("--val-json", default=None, help="COCO annotation json to evaluate on")
    parser.add_argument("--image-size", type=int, default=None, help="default: the training size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="write the stats here as json")
    parser.add_argument("--held-out-style", action="store_true",
                        help="digits checkpoints: also the AP on digits of the generator's held-out style")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "threads", "image_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    with report_input_errors(parser.prog):
        run(args)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    model, checkpoint = load_checkpoint(args.checkpoint)
    image_size = args.image_size or checkpoint.get("image_size", 96)
    trained_on = (checkpoint.get("options") or {}).get("data")
    if args.held_out_style and (args.data or args.val_json or not checkpoint.get("digits_params")):
        raise InputError("--held-out-style evaluates a checkpoint trained on the built-in digits, on its own "
                         "val split and the held-out style: drop --data/--val-json")
    sets = {}
    if args.data or (trained_on and not args.val_json):
        from .coco import dataset_layout

        val = dataset_layout(args.data or trained_on)["val"]
        if val is None:
            raise InputError(f"--data {args.data or trained_on} has no val split to evaluate on")
        sets["val"] = val
    elif args.val_json:
        sets["val"] = args.image_root or os.path.dirname(args.val_json), args.val_json
    else:
        from .digits import ensure_digits_dataset, heldout_params, params_from_record

        params = params_from_record(checkpoint["digits_params"]) if checkpoint.get("digits_params") else None
        root = data_root(args, checkpoint)
        sets["val"] = ensure_digits_dataset(root, params)["val"]
        if args.held_out_style:
            sets["held_out_style"] = ensure_digits_dataset(f"{root}-heldout", heldout_params(params))["val"]
    results = {}
    for name, (image_root, annotation_file) in sets.items():
        stats = evaluate_model(model, image_root, annotation_file, image_size, args.batch_size, verbose=True,
                               progress=True, checkpoint=checkpoint, checkpoint_path=args.checkpoint)
        print(json.dumps({"split": name, **{k: round(v, 4) for k, v in stats.items()}}))
        results[name] = stats
    if "held_out_style" in results:
        held, val = results["held_out_style"], results["val"]
        results["held_out_over_val"] = {k: held[k] / val[k] if val[k] > 0 else None for k in ("AP", "AP50")}
        print("held-out style / in-distribution: " + ", ".join(
            f"{k} {held[k]:.3f} / {val[k]:.3f} = {_ratio(results['held_out_over_val'][k])}" for k in ("AP", "AP50")))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results["val"] if len(sets) == 1 else results, f, indent=1)


def _ratio(value: float | None) -> str:
    return "undefined (no val AP)" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
