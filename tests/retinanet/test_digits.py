import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from examples.retinanet.digits import DigitsParams, ensure_digits_dataset, generate_split, render_image, render_split

SMALL = DigitsParams(seed=3, num_train=6, num_val=3, image_size=64, min_digit_height=10, max_digit_height=24)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return str(root), ensure_digits_dataset(str(root), SMALL)


def test_deterministic_by_seed(dataset, tmp_path):
    root, _ = dataset
    ensure_digits_dataset(str(tmp_path / "again"), SMALL)
    assert _digest(root) == _digest(tmp_path / "again")
    other = DigitsParams(**{**SMALL.__dict__, "seed": 4})
    ensure_digits_dataset(str(tmp_path / "other"), other)
    with open(os.path.join(root, "train.json")) as a, open(tmp_path / "other" / "train.json") as b:
        assert json.load(a)["annotations"] != json.load(b)["annotations"]


def test_written_files_are_the_rendered_images_in_order_and_a_failed_write_stops_the_run(tmp_path, monkeypatch):
    """The PNGs are encoded on a writer thread while the next image is drawn: every file must be the
    plain encoding of the image rendered for its name, past the writer's bounded queue (64), and a
    write that fails must fail the generation rather than leave a hole."""
    many = DigitsParams(**{**SMALL.__dict__, "num_train": 70, "image_size": 32, "max_digit_height": 14})
    generate_split(str(tmp_path), "train", many)
    for index, (image, _) in enumerate(render_split("train", many)):
        expected = io.BytesIO()
        Image.fromarray(image).save(expected, format="png")
        assert (tmp_path / "train" / f"{index:06d}.png").read_bytes() == expected.getvalue(), index

    def broken(self, path, *args, **kwargs):
        raise OSError(f"disk full writing {path}")
    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        generate_split(str(tmp_path / "broken"), "val", many)


def test_generated_on_first_use_only_and_regenerated_when_params_change(dataset, tmp_path):
    root = str(tmp_path / "d")
    ensure_digits_dataset(root, SMALL)
    marker = os.path.join(root, "train", "000000.png")
    stamp = os.path.getmtime(marker)
    os.utime(marker, (stamp - 100, stamp - 100))
    ensure_digits_dataset(root, SMALL)  # same params: untouched
    assert os.path.getmtime(marker) == stamp - 100
    ensure_digits_dataset(root, DigitsParams(**{**SMALL.__dict__, "num_val": 2}))
    with open(os.path.join(root, "val.json")) as f:
        assert len(json.load(f)["images"]) == 2


def test_boxes_inside_images_and_pycocotools_loads(dataset):
    from pycocotools.coco import COCO

    root, paths = dataset
    for split, count in (("train", SMALL.num_train), ("val", SMALL.num_val)):
        image_root, annotation_file = paths[split]
        coco = COCO(annotation_file)
        assert len(coco.getImgIds()) == count
        assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == [str(d) for d in range(10)]
        for image_id in coco.getImgIds():
            info = coco.imgs[image_id]
            with Image.open(os.path.join(image_root, info["file_name"])) as image:
                assert image.size == (info["width"], info["height"]) == (64, 64)
                assert image.mode == "RGB"
            annotations = coco.imgToAnns[image_id]
            assert SMALL.min_digits <= len(annotations) <= SMALL.max_digits
            for a in annotations:
                x, y, w, h = a["bbox"]
                assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
                assert SMALL.min_digit_height <= h <= SMALL.max_digit_height
                assert 1 <= a["category_id"] <= 10 and a["area"] == w * h


def test_val_digits_come_from_disjoint_writers():
    from examples.retinanet import digits

    assert digits.TRAIN_DIGITS[1] <= digits.VAL_DIGITS[0]


def test_digits_do_not_overlap():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, objects = render_image(rng, bunch.images[:100], bunch.target[:100], SMALL)
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_held_out_style_differs_and_is_never_drawn_in_training(monkeypatch):
    from dataclasses import replace

    from examples.retinanet import digits

    assert not set(digits.TRAIN_FONTS) & set(digits.HELDOUT_FONTS)
    assert not set(digits.TRAIN_BACKGROUNDS) & set(digits.HELDOUT_BACKGROUNDS)
    assert all(params.style != "heldout" for params in digits.VARIANTS.values())  # no way to train on it
    drawn = {"fonts": set(), "backgrounds": set()}
    glyph, background = digits.font_glyph, digits._styled_background

    def record_glyph(font, digit, stroke):
        drawn["fonts"].add(font)
        return glyph(font, digit, stroke)

    def record_background(rng, size, kind, clutter):
        drawn["backgrounds"].add(kind)
        return background(rng, size, kind, clutter)

    monkeypatch.setattr(digits, "font_glyph", record_glyph)
    monkeypatch.setattr(digits, "_styled_background", record_background)
    params = replace(digits.VARIANTS["default"], num_train=30, num_val=10)
    for split in ("train", "val"):
        list(digits.render_split(split, params))
    assert drawn["fonts"] <= set(digits.TRAIN_FONTS) and len(drawn["fonts"]) >= 8
    assert drawn["backgrounds"] == set(digits.TRAIN_BACKGROUNDS)
    drawn["fonts"].clear(), drawn["backgrounds"].clear()
    held_out = list(digits.render_split("val", replace(digits.heldout_params(params), num_val=10)))
    assert drawn["fonts"] <= set(digits.HELDOUT_FONTS) and drawn["backgrounds"] == {"stripes"}
    assert all(image.shape == (96, 96, 3) and 2 <= len(objects) <= 5 for image, objects in held_out)


def test_checkpoints_from_before_styles_read_as_the_first_generator():
    from examples.retinanet.digits import params_from_record

    record = {k: v for k, v in DigitsParams().__dict__.items() if k != "style"}
    assert params_from_record(record).style == "scans"
    assert params_from_record({**record, "style": "varied"}) == DigitsParams()
    with pytest.raises(ValueError, match="unknown digits style"):
        DigitsParams(style="cursive")
