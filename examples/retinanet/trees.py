"""Tree crowns in aerial photographs: the example's real-image benchmark, built offline.

The ``deepforest`` wheel (MIT licence) ships, under ``deepforest/data/``, four RGB orthophotos of NEON
sites (10 cm per pixel) with Pascal VOC boxes around every tree crown:

===========================================  ===========  ==========  =====
image                                        site         size (px)   boxes
===========================================  ===========  ==========  =====
``2019_YELL_2_528000_4978000_image_crop2``   YELL         2299x2472     574
``2019_YELL_2_541000_4977000_image_crop``    YELL         1249x1035     279
``OSBS_029``                                 OSBS         400x400        61
``SOAP_061``                                 SOAP         400x400        37
===========================================  ===========  ==========  =====

Only the installed wheel is read (``pip install --no-deps deepforest==2.1.0``; its dependencies are a
geospatial and deep-learning stack this converter does not need): the files are found through
``importlib.metadata`` without importing the package.

**One class**, "tree". SOAP_061 labels its crowns "Alive" or "Dead"; a dead tree is still a tree
crown to detect, so both count as "tree".

**Split by site**: train on Yellowstone (YELL, both crops, 853 boxes), validate on OSBS (Florida) and
SOAP (California), 98 boxes. YELL holds 90 % of the boxes and is the only site with enough of them
to train on; validating on the two other sites measures detection on forests the model never saw
(other tree species, crown sizes and light) instead of on tiles cut from the training photographs.
Neither small site alone makes a usable validation set (61 and 37 boxes), so both are used.
``--val-sites`` picks another split.

**Tiles**: every image is cut into ``TILE`` x ``TILE`` windows (400 px, the size of the OSBS and SOAP
images, which therefore stay whole) at a stride of ``STRIDE`` (200 px; the last row and column are
aligned with the image's edge). The 200-px overlap is wider than the largest crown (107 px), so every
crown lies whole in at least one tile. A box is clipped to each tile it touches and kept when at least
``KEEP_FRACTION`` (half) of its area lies inside; a crown cut to less than half becomes an ``iscrowd``
region, whose anchors the matcher ignores: the model is neither asked to find a sliver of crown nor
punished for finding it.

Writes ``ROOT/train/*.png``, ``ROOT/val/*.png``, ``ROOT/train.json`` and ``ROOT/val.json`` (read by
``train --data ROOT``) and ``ROOT/params.json``; :func:`ensure_trees_dataset` converts on first use and
again when the settings or the wheel's version differ from those recorded. ``python -m
examples.retinanet.trees`` converts and prints the box statistics and how well the ``trees`` preset's
anchors fit the boxes.
"""

from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from .errors import InputError

DEEPFOREST_VERSION = "2.1.0"  # the pinned wheel (Makefile); another version is used with a warning line
DEFAULT_ROOT = "data/trees"
TILE = 400
STRIDE = 200
KEEP_FRACTION = 0.5
CATEGORY = {"id": 1, "name": "tree"}

# image name (without extension) -> site; the image is the .png next to the .xml in deepforest/data.
SOURCES = {
    "2019_YELL_2_528000_4978000_image_crop2": "YELL",
    "2019_YELL_2_541000_4977000_image_crop": "YELL",
    "OSBS_029": "OSBS",
    "SOAP_061": "SOAP",
}
SITES = ("YELL", "OSBS", "SOAP")
DEFAULT_VAL_SITES = ("OSBS", "SOAP")


@dataclass(frozen=True)
class TreesParams:
    """What a converted folder depends on (recorded in ``ROOT/params.json``)."""

    val_sites: tuple[str, ...] = DEFAULT_VAL_SITES
    tile: int = TILE
    stride: int = STRIDE
    keep_fraction: float = KEEP_FRACTION
    deepforest: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.val_sites) - set(SITES))
        if unknown or not self.val_sites or set(self.val_sites) == set(SITES):
            raise InputError(f"--val-sites must name some but not all of {list(SITES)}, got {list(self.val_sites)}")
        if not 32 <= self.tile or not 1 <= self.stride <= self.tile:
            raise InputError(f"tile must be at least 32 px and stride within [1, tile], got {self.tile}, {self.stride}")
        if not 0 < self.keep_fraction <= 1:
            raise InputError(f"keep fraction must be within (0, 1], got {self.keep_fraction}")


@dataclass
class Photo:
    """One annotated source image: its name, site, file and crown boxes (M, 4) XYXY in pixels."""

    name: str
    site: str
    path: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    labels: list[str] = field(default_factory=list)


def deepforest_data() -> tuple[str, dict[str, str]]:
    """``(version, {file name: absolute path})`` of the installed wheel's ``deepforest/data`` files,
    found from the distribution's file list (the package itself is not imported)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("deepforest")
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"the trees benchmark reads its images from the deepforest wheel, which is not "
                         f"installed: pip install --no-deps deepforest=={DEEPFOREST_VERSION}") from None
    files = {}
    for entry in dist.files or ():
        parts = entry.parts
        if len(parts) == 3 and parts[:2] == ("deepforest", "data"):
            files[parts[2]] = str(dist.locate_file(entry))
    return dist.version, files


def read_voc(xml_path: str) -> tuple[np.ndarray, list[str], tuple[int, int]]:
    """``(boxes (M, 4) XYXY float, class names, (width, height))`` of a Pascal VOC annotation file.

    VOC's corners are pixel indices; as in the deepforest package they are taken as coordinates."""
    try:
        root = ET.parse(xml_path).getroot()
        size = root.find("size")
        width, height = int(size.findtext("width")), int(size.findtext("height"))
        boxes, names = [], []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            boxes.append([float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
            names.append(obj.findtext("name"))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as error:
        raise InputError(f"{xml_path} is not a Pascal VOC annotation file: {error}") from None
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), names, (width, height)


def load_photos() -> tuple[str, list[Photo]]:
    """``(deepforest version, the four annotated photos of SOURCES)``; a clear error when a file is
    missing from the installed wheel or an image does not match its annotation's size."""
    version, files = deepforest_data()
    photos = []
    for name, site in SOURCES.items():
        missing = [f for f in (f"{name}.xml", f"{name}.png") if f not in files]
        if missing:
            raise InputError(f"deepforest {version} does not ship {missing} under deepforest/data: install "
                             f"pip install --no-deps deepforest=={DEEPFOREST_VERSION}")
        boxes, labels, (width, height) = read_voc(files[f"{name}.xml"])
        with Image.open(files[f"{name}.png"]) as image:
            if image.size != (width, height):
                raise InputError(f"{files[name + '.png']} is {image.size[0]}x{image.size[1]}, its annotation "
                                 f"says {width}x{height}")
        photos.append(Photo(name, site, files[f"{name}.png"], width, height, boxes, labels))
    return version, photos


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows of ``tile`` px every ``stride`` px along ``length`` px, the last one
    aligned with the end (a single window at 0 when ``length <= tile``)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def clip_to_tile(boxes: np.ndarray, x0: int, y0: int, width: int, height: int,
                 keep_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (M, 4) XYXY of the whole image -> ``(kept, ignored)``, each (K, 4) in the tile's pixels:
    clipped to the tile at (x0, y0) of ``width`` x ``height``; kept when at least ``keep_fraction`` of
    the box's area is inside, ignored (crowd) when less but some, left out when nothing is inside."""
    local = boxes - np.array([x0, y0, x0, y0], dtype=np.float64)
    clipped = np.stack([local[:, 0].clip(0, width), local[:, 1].clip(0, height),
                        local[:, 2].clip(0, width), local[:, 3].clip(0, height)], axis=1)
    inside = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
    area = (local[:, 2] - local[:, 0]) * (local[:, 3] - local[:, 1])
    keep = inside >= keep_fraction * area
    ignore = ~keep & (inside > 0)
    return clipped[keep], clipped[ignore]


def write_split(root: str, split: str, photos: list[Photo], params: TreesParams) -> dict:
    """Tile ``photos`` into ``root/split/*.png`` and write ``root/split.json``; returns the COCO dict."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for photo in photos:
        with Image.open(photo.path) as opened:
            pixels = opened.convert("RGB")
        for y0 in tile_starts(photo.height, params.tile, params.stride):
            for x0 in tile_starts(photo.width, params.tile, params.stride):
                width, height = min(params.tile, photo.width), min(params.tile, photo.height)
                file_name = f"{split}/{photo.name}_x{x0}_y{y0}.png"
                pixels.crop((x0, y0, x0 + width, y0 + height)).save(os.path.join(root, file_name))
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                               "site": photo.site, "source": photo.name, "offset": [x0, y0]})
                kept, ignored = clip_to_tile(photo.boxes, x0, y0, width, height, params.keep_fraction)
                for boxes, crowd in ((kept, 0), (ignored, 1)):
                    for x_0, y_0, x_1, y_1 in boxes.tolist():
                        w, h = x_1 - x_0, y_1 - y_0
                        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                            "category_id": CATEGORY["id"], "bbox": [x_0, y_0, w, h],
                                            "area": w * h, "iscrowd": crowd})
    coco = {"info": {"description": f"tree crowns ({split}: sites {sorted({p.site for p in photos})}), "
                                    f"tiles of the deepforest {params.deepforest} example images"},
            "images": images, "annotations": annotations, "categories": [CATEGORY]}
    with open(os.path.join(root, f"{split}.json"), "w") as f:
        json.dump(coco, f)
    return coco


def split_photos(photos: list[Photo], val_sites) -> dict[str, list[Photo]]:
    """``{"train": photos of the other sites, "val": photos of val_sites}``."""
    return {"train": [p for p in photos if p.site not in val_sites],
            "val": [p for p in photos if p.site in val_sites]}


def ensure_trees_dataset(root: str = DEFAULT_ROOT, val_sites=DEFAULT_VAL_SITES, force: bool = False) -> dict:
    """Convert into ``root`` unless it already holds a conversion with the same settings and wheel
    version. Returns ``{"train": (root, json), "val": (root, json)}``."""
    version, photos = load_photos()
    params = TreesParams(val_sites=tuple(sorted(val_sites)), deepforest=version)
    record = os.path.join(root, "params.json")
    wanted = json.loads(json.dumps(asdict(params)))  # tuples as lists, as read back
    current = None
    if os.path.exists(record):
        with open(record) as f:
            current = json.load(f)
    if force or current != wanted:
        if version != DEEPFOREST_VERSION:
            print(f"note: deepforest {version} is installed; the benchmark was built on {DEEPFOREST_VERSION}")
        os.makedirs(root, exist_ok=True)
        if os.path.exists(record):
            os.remove(record)
        for split, chosen in split_photos(photos, params.val_sites).items():
            write_split(root, split, chosen, params)
        with open(record, "w") as f:
            json.dump(wanted, f)
    return {split: (root, os.path.join(root, f"{split}.json")) for split in ("train", "val")}


def box_statistics(photos: list[Photo]) -> list[str]:
    """Lines describing the crowns per image: count, classes, and the percentiles of their size
    (the square root of the box area, what an anchor's base size is compared with), width, height and
    aspect ratio (height / width)."""
    lines = []
    everything = np.concatenate([p.boxes for p in photos])
    for name, boxes, labels in [(p.name, p.boxes, p.labels) for p in photos] + [("all", everything, [])]:
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        pct = (0, 5, 50, 95, 100)
        fmt = lambda values: "/".join(f"{v:.0f}" for v in np.percentile(values, pct))  # noqa: E731
        classes = f" {dict(zip(*(v.tolist() for v in np.unique(labels, return_counts=True))))}" if labels else ""
        lines.append(f"{name}: {len(boxes)} boxes{classes}; size (sqrt area) min/5%/50%/95%/max "
                     f"{fmt(np.sqrt(w * h))} px, width {fmt(w)}, height {fmt(h)}, "
                     f"height/width {np.percentile(h / w, 5):.2f}-{np.percentile(h / w, 95):.2f} (5-95%)")
    return lines


def anchor_fit(annotation_file: str, config, image_size: int) -> tuple[float, float, int]:
    """``(share, median, count)`` over the ``count`` non-crowd boxes of ``annotation_file``: the share
    that have an anchor of ``config`` (on an ``image_size`` square) with IoU at least the matcher's
    positive threshold, and the median best IoU. The other boxes are reached only through low-quality
    matches."""
    import torch
    from torchvision.ops import box_iou

    from .anchors import AnchorGenerator

    with open(annotation_file) as f:
        data = json.load(f)
    generator = AnchorGenerator([2**level for level in config.levels], config.anchor_sizes,
                                config.anchor_scales, config.anchor_ratios)
    anchors = torch.cat(generator([(-(-image_size // 2**level),) * 2 for level in config.levels]))
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        if not a["iscrowd"]:
            x, y, w, h = a["bbox"]
            by_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    best = torch.cat([box_iou(torch.tensor(b), anchors).max(dim=1).values for b in by_image.values()])
    return (best >= config.fg_iou_threshold).float().mean().item(), best.median().item(), len(best)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=DEFAULT_ROOT)
    parser.add_argument("--val-sites", nargs="+", choices=SITES, default=list(DEFAULT_VAL_SITES),
                        help="sites whose images form the val split; the others train")
    parser.add_argument("--force", action="store_true", help="convert again even if up to date")
    args = parser.parse_args(argv)
    from .config import PRESETS
    from .errors import report_input_errors

    with report_input_errors(parser.prog):
        _, photos = load_photos()
        print("\n".join(box_statistics(photos)))
        paths = ensure_trees_dataset(args.root, args.val_sites, force=args.force)
        config = PRESETS["trees"]()
        for split, (_, annotation_file) in paths.items():
            with open(annotation_file) as f:
                data = json.load(f)
            crowd = sum(a["iscrowd"] for a in data["annotations"])
            print(f"{split}: {len(data['images'])} tiles of {sorted({i['site'] for i in data['images']})}, "
                  f"{len(data['annotations']) - crowd} boxes + {crowd} ignored slivers -> {annotation_file}")
            share, median, count = anchor_fit(annotation_file, config, TILE)
            print(f"  {share:.1%} of the {count} boxes have a trees-preset anchor with IoU >= "
                  f"{config.fg_iou_threshold} (median best IoU {median:.2f})")


if __name__ == "__main__":
    main()
