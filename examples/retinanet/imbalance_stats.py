"""Foreground-background imbalance of a preset's digits benchmark, counted the way training sees it.

    python -m examples.retinanet.imbalance_stats                       # imbalance preset, fast for comparison
    python -m examples.retinanet.imbalance_stats --preset fast --images 500

For each preset asked: render the first ``--images`` train images of the preset's digits variant (the
images ``digits.generate_split`` writes, rendered in memory), build the preset's model, take its anchors
from the model's own ``AnchorGenerator`` on its backbone's feature maps at the training image size, and
label them with ``RetinaNet.label_anchors`` (the matcher of the training path). Prints anchors per
image, positive anchors per image (mean, min, max), ignored anchors, anchors per positive and
anchor-class pairs per positive (the number of sigmoid outputs the classification loss sums over per
positive). The ratios are totals over all images (anchors x images / positives).
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: the OpenMP runtime reads its settings once (see entry)
    from .entry import configure_process

    configure_process()

import argparse
import json
import math

import torch

from .config import PRESETS, build_model
from .digits import CLASS_NAMES, render_split, variant_params
from .matcher import Matcher
from .options import PRESET_DATA, PRESET_DIGITS

DIGITS_PRESETS = sorted(set(PRESETS) - set(PRESET_DATA))  # the presets that train on a digits variant


def expected_anchors_per_image(levels, image_size: int, anchors_per_cell: int) -> int:
    """Anchors per image from the pyramid alone: level ``l`` has a ceil(S / 2**l) square map (the
    stride-2 convolutions round up) with ``anchors_per_cell`` anchors per position."""
    return sum(math.ceil(image_size / 2**level) ** 2 * anchors_per_cell for level in levels)


@torch.no_grad()
def model_anchors(model, image_size: int) -> torch.Tensor:
    """(R, 4) anchors of ``model`` for a square ``image_size`` input, as its forward pass makes them."""
    images = model.preprocess(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8))
    features = model.backbone(images)
    return torch.cat(model.anchor_generator([f.shape[-2:] for f in features]))


@torch.no_grad()
def imbalance_stats(preset: str = "imbalance", images: int = 200, split: str = "train") -> dict:
    """Counts for the first ``images`` images of ``split`` of the preset's digits variant (see module)."""
    if preset not in DIGITS_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {DIGITS_PRESETS} (those trained on digits)")
    if images < 1:
        raise ValueError(f"need at least one image, got {images}")
    digits = PRESET_DIGITS.get(preset, "default")
    params = variant_params(digits)
    image_size = params.image_size  # what train uses for this preset unless --image-size is given
    config = PRESETS[preset](num_classes=len(CLASS_NAMES))
    model = build_model(config).eval()
    anchors = model_anchors(model, image_size)
    scale = image_size / params.image_size  # the letterbox factor (1 here; kept for other sizes)
    positives, ignored, objects = [], [], []
    for _, boxes in render_split(split, params, images):
        target = {"boxes": torch.tensor([b[:4] for b in boxes], dtype=torch.float32).reshape(-1, 4) * scale,
                  "labels": torch.tensor([b[4] for b in boxes], dtype=torch.int64)}
        gt_classes, _ = model.label_anchors(anchors, [target])
        positives.append(int((gt_classes >= 0).sum()))
        ignored.append(int((gt_classes == Matcher.IGNORE).sum()))
        objects.append(len(boxes))
    count = len(positives)
    total_positives = max(sum(positives), 1)
    return {
        "preset": preset, "digits": digits, "image_size": image_size, "levels": list(config.levels),
        "images": count, "num_classes": config.num_classes,
        "anchors_per_image": len(anchors),
        "expected_anchors_per_image": expected_anchors_per_image(config.levels, image_size,
                                                                 model.anchor_generator.num_anchors),
        "objects_per_image": sum(objects) / count,
        "positives_per_image": {"mean": sum(positives) / count, "min": min(positives), "max": max(positives)},
        "ignored_per_image": sum(ignored) / count,
        "anchors_per_positive": len(anchors) * count / total_positives,
        "anchor_class_pairs_per_positive": len(anchors) * config.num_classes * count / total_positives,
    }


def format_stats(stats: dict) -> str:
    p = stats["positives_per_image"]
    return "\n".join([
        f"preset {stats['preset']} (digits variant {stats['digits']!r}, {stats['image_size']} px, "
        f"levels P{'-P'.join(str(v) for v in (stats['levels'][0], stats['levels'][-1]))}, "
        f"{stats['images']} train images)",
        f"  anchors per image               {stats['anchors_per_image']:,}",
        f"  digits per image                {stats['objects_per_image']:.2f}",
        f"  positive anchors per image      mean {p['mean']:.2f}, min {p['min']}, max {p['max']}",
        f"  ignored anchors per image       {stats['ignored_per_image']:.1f}",
        f"  anchors per positive            1:{stats['anchors_per_positive']:,.0f}",
        f"  anchor-class pairs per positive 1:{stats['anchor_class_pairs_per_positive']:,.0f} "
        f"({stats['num_classes']} classes)",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=DIGITS_PRESETS, default="imbalance")
    parser.add_argument("--images", type=int, default=200, help="first N train images of the variant")
    parser.add_argument("--no-compare", action="store_true", help="skip the fast preset's numbers")
    parser.add_argument("--json", action="store_true", help="print json instead of text")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be at least 1, got {args.images}")
    torch.set_num_threads(args.threads)
    presets = [args.preset] + ([] if args.no_compare or args.preset == "fast" else ["fast"])
    results = [imbalance_stats(preset, args.images) for preset in presets]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("\n".join(format_stats(r) for r in results))


if __name__ == "__main__":
    main()
