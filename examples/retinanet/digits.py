"""The built-in benchmark: digits detection generated from scikit-learn's handwritten digits and fonts.

Each image is a noisy, cluttered canvas with several digits, each cropped to its ink, scaled to a
random size and aspect ratio and pasted without overlap. Ten classes, "0".."9". How the digits and the
canvas are drawn is the ``style`` (``STYLES``):

* ``varied`` (the default benchmark): half the digits are 8x8 scans of ``sklearn.datasets.load_digits``
  (43 writers), half are glyphs of ``TRAIN_FONTS`` (matplotlib's DejaVu Sans, Sans Mono and Serif and
  its Computer Modern faces) drawn with a stroke of 0-5 px at 48 px; half the digits in one ink colour,
  half in a ramp from it to a second, fainter colour; the canvas is a colour gradient or colour
  blotches (3-20 across), with pixel noise and clutter.
* ``heldout``: what training never draws, to measure whether a model learned digits or the
  generator: glyphs of ``HELDOUT_FONTS`` (STIX, a Times-like family) only, each drawn in two colours
  (a fill inside an outline of another colour), on striped canvases. ``evaluate --held-out-style``
  reports its AP beside the in-distribution AP.
* ``scans``: the benchmark's first generator: scans only, gradient canvases. The ``imbalance`` variant
  keeps it, so that its Table 1 runs reproduce, and the ``scans`` variant is the first default
  benchmark (``--digits scans --augment none`` reruns what was measured on it).

The splits are written as PNG + COCO json:

    ROOT/train/000000.png ...   ROOT/train.json
    ROOT/val/000000.png ...     ROOT/val.json

Training scans come from ``load_digits`` indices [0, 1300) and validation scans from [1300, 1797):
the dataset is ordered by writer, so validation scans are written by people never seen in training.
Everything is a function of ``seed`` and the parameters; ``ensure_digits_dataset`` generates on first
use and regenerates when the parameters differ from those recorded in ``ROOT/params.json``.

Three variants (``VARIANTS``), chosen by name with ``--digits`` in ``train`` and ``ablate``:

* ``default``: 2-5 digits on a 96-px canvas. With the ``fast`` model (P3-P4) an image has 1,620 anchors
  and about 20 positives, an imbalance far milder than the paper's (about 100k anchors per image).
* ``imbalance``: 1-2 digits of the same 14-40 px on a 256-px canvas. The same model then has 11,520
  anchors and about 9 positives per image: the paper-like regime where most anchors are easy background
  (``python -m examples.retinanet.imbalance_stats`` prints the counts).
* ``scans``: the ``default`` canvas drawn by the first generator (style ``scans``).

Run ``python -m examples.retinanet.digits --root data/digits`` to (re)generate explicitly.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = [str(d) for d in range(10)]
TRAIN_DIGITS = (0, 1300)
VAL_DIGITS = (1300, 1797)


@dataclass(frozen=True)
class DigitsParams:
    seed: int = 0
    num_train: int = 6000
    num_val: int = 500
    image_size: int = 96
    min_digit_height: int = 14
    max_digit_height: int = 40
    min_digits: int = 2
    max_digits: int = 5
    clutter: int = 6  # number of clutter strokes / blobs per image
    style: str = "varied"  # see STYLES

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown digits style {self.style!r}; choose one of {STYLES}")


STYLES = ("varied", "heldout", "scans")
# matplotlib's bundled fonts (mpl-data/fonts/ttf). Training draws TRAIN_FONTS; HELDOUT_FONTS, another
# family, only ever draws the held-out style.
TRAIN_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
               "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
               "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf")
HELDOUT_FONTS = ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf")
GLYPH_SIZE = 48  # font size the glyphs are drawn at before scaling to the digit's box
TRAIN_BACKGROUNDS = ("gradient", "blotches")
HELDOUT_BACKGROUNDS = ("stripes",)

VARIANTS = {
    "default": DigitsParams(),
    # The first generator's scans and clutter; 7x the canvas area and fewer digits, so the anchors per
    # positive grow about 16x while an image still costs well under a second per training step on 2 cores.
    "imbalance": DigitsParams(image_size=256, min_digits=1, max_digits=2, style="scans"),
    # The default benchmark as the first generator drew it, for the measurements made on it.
    "scans": DigitsParams(style="scans"),
}


def params_from_record(record: dict) -> DigitsParams:
    """The :class:`DigitsParams` recorded in a checkpoint; records from before ``style`` existed were
    drawn by the first generator, ``scans``."""
    return DigitsParams(**{"style": "scans", **record})


def heldout_params(params: DigitsParams) -> DigitsParams:
    """The held-out-style val set matching ``params`` (canvas, digit sizes and counts, val size): only
    its val split is meant to be read (it has no training images)."""
    return replace(params, style="heldout", num_train=0)


def variant_params(name: str) -> DigitsParams:
    """The :class:`DigitsParams` of a variant in ``VARIANTS``; a clear error for an unknown name."""
    if name not in VARIANTS:
        raise ValueError(f"unknown digits variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def default_root(variant: str) -> str:
    """Where a variant is generated unless told otherwise: ``data/digits`` for the default,
    ``data/digits-VARIANT`` for the others (one folder each, so none overwrites another)."""
    variant_params(variant)
    return "data/digits" if variant == "default" else f"data/digits-{variant}"


def _ink_crop(digit: np.ndarray) -> np.ndarray:
    """Crop an 8x8 digit (values 0..16) to the rows and columns that carry ink."""
    ink = digit > 2
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return digit[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]


def _background(rng: np.random.Generator, size: int, clutter: int) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size, 3) float canvas in [0, 1] and its mean colour (3,)."""
    base = rng.uniform(0.0, 1.0, size=3)
    # Smooth colour gradient + Gaussian pixel noise.
    ramp = np.linspace(-1, 1, size)
    direction = rng.uniform(-0.25, 0.25, size=(2, 3))
    canvas = base + ramp[:, None, None] * direction[0] + ramp[None, :, None] * direction[1]
    canvas = canvas + rng.normal(0.0, rng.uniform(0.02, 0.10), size=(size, size, 3))
    # Clutter: lines, arcs and blobs in random colours, drawn on a separate layer and blended.
    layer = Image.new("RGB", (size, size))
    alpha = Image.new("L", (size, size))
    draw_rgb, draw_alpha = ImageDraw.Draw(layer), ImageDraw.Draw(alpha)
    for _ in range(rng.integers(0, clutter + 1)):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        opacity = int(rng.integers(60, 200))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(-size // 4, size + size // 4, size=4))
        kind = rng.integers(0, 3)
        width = int(rng.integers(1, 4))
        if kind == 0:
            draw_rgb.line([x0, y0, x1, y1], fill=colour, width=width)
            draw_alpha.line([x0, y0, x1, y1], fill=opacity, width=width)
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
            start, end = (float(v) for v in rng.uniform(0, 360, size=2))
            if kind == 1:
                draw_rgb.arc(box, start, end, fill=colour, width=width)
                draw_alpha.arc(box, start, end, fill=opacity, width=width)
            else:
                small = [box[0], box[1], box[0] + (box[2] - box[0]) // 6 + 2, box[1] + (box[3] - box[1]) // 6 + 2]
                draw_rgb.ellipse(small, fill=colour)
                draw_alpha.ellipse(small, fill=opacity // 2)
    a = np.asarray(alpha, dtype=np.float32)[..., None] / 255.0
    canvas = canvas * (1 - a) + np.asarray(layer, dtype=np.float32) / 255.0 * a
    return canvas, base


def _styled_background(rng: np.random.Generator, size: int, kind: str, clutter: int):
    """A (size, size, 3) float canvas of ``kind`` ("gradient", "blotches" or "stripes") with pixel
    noise and clutter, and its mean colour (3,)."""
    if kind == "gradient":
        return _background(rng, size, clutter)
    base = rng.uniform(0.0, 1.0, size=3)
    if kind == "blotches":  # smooth colour variation: a coarse random grid upsampled
        cells = int(rng.integers(3, 21))
        coarse = rng.normal(0.0, 0.15, size=(cells, cells, 3))
        smooth = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32), mode="F")
                                      .resize((size, size), Image.BICUBIC)) for c in range(3)], axis=-1)
        pattern = smooth
    elif kind == "stripes":  # straight stripes of a second colour at a random angle and period
        angle, period = rng.uniform(0, np.pi), rng.uniform(5.0, 14.0)
        ys, xs = np.mgrid[0:size, 0:size]
        phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
        pattern = ((phase % 1.0) < 0.5)[..., None] * rng.uniform(-0.25, 0.25, size=3)
    else:
        raise ValueError(f"unknown background {kind!r}")
    canvas, _ = _background(rng, size, clutter)  # noise and clutter as the gradient canvas has them
    canvas = canvas - canvas.mean(axis=(0, 1)) + base + pattern
    return canvas, base


@functools.lru_cache(maxsize=None)
def font_glyph(font: str, digit: int, stroke: int) -> tuple[np.ndarray, np.ndarray]:
    """``(outline, fill)``: two (h, w) uint8 masks of ``digit`` in matplotlib's font file ``font`` at
    ``GLYPH_SIZE`` px, cropped to the ink: the glyph with a ``stroke``-px outline, and without it."""
    import matplotlib
    from PIL import ImageFont

    face = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", font), GLYPH_SIZE)
    masks = []
    for width in (stroke, 0):
        image = Image.new("L", (2 * GLYPH_SIZE, 2 * GLYPH_SIZE))
        ImageDraw.Draw(image).text((GLYPH_SIZE // 2, GLYPH_SIZE // 4), str(digit), font=face, fill=255,
                                   stroke_width=width, stroke_fill=255)
        masks.append(np.asarray(image))
    rows, cols = np.flatnonzero(masks[0].max(axis=1) > 64), np.flatnonzero(masks[0].max(axis=0) > 64)
    return tuple(m[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] for m in masks)


def _pick_glyph(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, style: str):
    """``(outline, fill, label)`` of one digit of ``style``: uint8 masks (equal for one-colour ink)."""
    if style == "varied" and rng.uniform() < 0.5:
        index = int(rng.integers(0, len(digits)))
        mask = (_ink_crop(digits[index]) * (255.0 / 16.0)).astype(np.uint8)
        return mask, mask, int(labels[index])
    fonts = TRAIN_FONTS if style == "varied" else HELDOUT_FONTS
    font, digit = fonts[int(rng.integers(0, len(fonts)))], int(rng.integers(0, 10))
    if style == "varied":
        outline = font_glyph(font, digit, int(rng.integers(0, 6)))[0]
        return outline, outline, digit
    outline, fill = font_glyph(font, digit, int(rng.integers(2, 5)))
    return outline, fill, digit


def _ink_ramp(rng: np.random.Generator, colour: np.ndarray, base: np.ndarray, height: int, width: int):
    """A (height, width, 3) ink that goes from ``colour`` to a second colour across the digit in a
    random direction; the second colour may come as close to the canvas's ``base`` as 0.3 from the
    far end, so that part of the digit is faint."""
    second = np.where(base > 0.5, rng.uniform(0.0, 0.7, 3), rng.uniform(0.3, 1.0, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = (xs / max(width - 1, 1) - 0.5) * np.cos(angle) + (ys / max(height - 1, 1) - 0.5) * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    return colour + ramp[..., None] * (second - colour)


def _no_overlap(box, boxes, margin: int = 1) -> bool:
    x0, y0, x1, y1 = box
    return all(x0 >= b[2] + margin or x1 + margin <= b[0] or y0 >= b[3] + margin or y1 + margin <= b[1]
               for b in boxes)


def render_image(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, params: DigitsParams):
    """One image: (H, W, 3) uint8 and a list of (x0, y0, x1, y1, label) with integer pixel boxes."""
    size = params.image_size
    if params.style == "scans":  # the first generator's draws, in its order
        canvas, base = _background(rng, size, params.clutter)
    else:
        kinds = TRAIN_BACKGROUNDS if params.style == "varied" else HELDOUT_BACKGROUNDS
        canvas, base = _styled_background(rng, size, kinds[int(rng.integers(0, len(kinds)))], params.clutter)
    objects: list[tuple[int, int, int, int, int]] = []
    wanted = int(rng.integers(params.min_digits, params.max_digits + 1))
    attempts = 0
    while len(objects) < wanted and attempts < 50 * wanted:
        attempts += 1
        if params.style == "scans":
            index = int(rng.integers(0, len(digits)))
            outline = fill = (_ink_crop(digits[index]) * (255.0 / 16.0)).astype(np.uint8)
            label = int(labels[index])
        else:
            outline, fill, label = _pick_glyph(rng, digits, labels, params.style)
        height = int(rng.integers(params.min_digit_height, params.max_digit_height + 1))
        aspect = outline.shape[1] / outline.shape[0] * rng.uniform(0.7, 1.4)
        width = int(np.clip(round(height * aspect), 4, size))
        if width > size or height > size:
            continue
        x0, y0 = int(rng.integers(0, size - width + 1)), int(rng.integers(0, size - height + 1))
        box = (x0, y0, x0 + width, y0 + height)
        if not _no_overlap(box, objects):
            continue
        # Ink colour far from the background's so the digit stays legible.
        colour = np.where(base > 0.5, rng.uniform(0.0, 0.3, 3), rng.uniform(0.7, 1.0, 3))
        if params.style == "varied" and rng.uniform() < 0.5:
            colour = _ink_ramp(rng, colour, base, height, width)
        region = canvas[y0: y0 + height, x0: x0 + width]
        layers = [(outline, colour)]
        if fill is not outline:  # two-colour ink: a fill of the background's side inside the outline
            layers.append((fill, np.where(base > 0.5, rng.uniform(0.75, 1.0, 3), rng.uniform(0.0, 0.25, 3))))
        for mask, ink_colour in layers:
            ink = Image.fromarray(mask).resize((width, height), Image.BILINEAR)
            ink = np.asarray(ink, dtype=np.float32)[..., None] / 255.0  # (h, w, 1) opacity of the ink
            region = region * (1 - ink) + ink_colour * ink
        canvas[y0: y0 + height, x0: x0 + width] = region
        objects.append((*box, label))
    image = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image, objects


def render_split(split: str, params: DigitsParams, count: int | None = None):
    """Yield the first ``count`` (default: all) images of a split as ``(image, objects)`` in order, as
    :func:`render_image` returns them: exactly the images ``generate_split`` writes, without writing."""
    from sklearn.datasets import load_digits

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    bunch = load_digits()
    lo, hi = TRAIN_DIGITS if split == "train" else VAL_DIGITS
    digits, labels = bunch.images[lo:hi], bunch.target[lo:hi]
    total = params.num_train if split == "train" else params.num_val
    count = total if count is None else min(count, total)
    rng = np.random.default_rng([params.seed, 0 if split == "train" else 1])
    for _ in range(count):
        yield render_image(rng, digits, labels, params)


def generate_split(root: str, split: str, params: DigitsParams) -> str:
    """Write ``root/split/*.png`` and ``root/split.json``; returns the json path."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations, saved = [], [], []
    # The images are drawn in order (one random stream); their PNG encoding, which releases the GIL,
    # runs on a second thread meanwhile.
    with concurrent.futures.ThreadPoolExecutor(1) as writer:
        for image_id, (image, objects) in enumerate(render_split(split, params)):
            file_name = f"{split}/{image_id:06d}.png"
            saved.append(writer.submit(Image.fromarray(image).save, os.path.join(root, file_name)))
            images.append({"id": image_id, "file_name": file_name, "height": image.shape[0],
                           "width": image.shape[1]})
            for x0, y0, x1, y1, label in objects:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                })
            if len(saved) > 64:  # a bounded queue: the writer keeps up, memory stays flat
                saved.pop(0).result()
        for pending in saved:
            pending.result()
    coco = {
        "info": {"description": f"digits detection ({split}), generated from sklearn load_digits"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASS_NAMES)],
    }
    path = os.path.join(root, f"{split}.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path


def ensure_digits_dataset(root: str, params: DigitsParams | None = None, force: bool = False) -> dict:
    """Generate the dataset under ``root`` unless it already exists with the same parameters.

    Returns ``{"train": (image_root, json), "val": (image_root, json)}``.
    """
    params = params or DigitsParams()
    record = os.path.join(root, "params.json")
    wanted = asdict(params)
    current = None
    if os.path.exists(record):
        with open(record) as f:
            current = json.load(f)
    if force or current != wanted:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(record):
            os.remove(record)
        for split in ("train", "val"):
            generate_split(root, split, params)
        with open(record, "w") as f:
            json.dump(wanted, f)
    return {split: (root, os.path.join(root, f"{split}.json")) for split in ("train", "val")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data/digits")
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="default",
                        help="starting parameters; the flags below override single fields")
    for name, value in asdict(DigitsParams()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=None)
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in asdict(DigitsParams()) if getattr(args, k) is not None}
    params = replace(variant_params(args.variant), **given)
    paths = ensure_digits_dataset(args.root, params, force=args.force)
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
