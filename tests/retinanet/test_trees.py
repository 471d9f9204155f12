"""The trees benchmark: boxes read from the installed deepforest wheel, tiles with their boxes clipped at
the borders, the split by site, a COCO folder the example reads, and one tiny training run on it."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from examples.retinanet import trees
from examples.retinanet.coco import dataset_layout, read_coco
from examples.retinanet.config import trees_config
from examples.retinanet.errors import InputError
from examples.retinanet.options import TrainOptions


@pytest.fixture(scope="module")
def photos():
    return trees.load_photos()[1]


def test_the_wheel_ships_the_four_annotated_photos(photos):
    found = {p.name: (p.site, p.width, p.height, len(p.boxes)) for p in photos}
    assert found == {"2019_YELL_2_528000_4978000_image_crop2": ("YELL", 2299, 2472, 574),
                     "2019_YELL_2_541000_4977000_image_crop": ("YELL", 1249, 1035, 279),
                     "OSBS_029": ("OSBS", 400, 400, 61), "SOAP_061": ("SOAP", 400, 400, 37)}
    for p in photos:
        assert (p.boxes[:, 2:] > p.boxes[:, :2]).all()
        assert (p.boxes >= 0).all() and (p.boxes[:, 2] <= p.width).all() and (p.boxes[:, 3] <= p.height).all()
    assert set(next(p for p in photos if p.site == "SOAP").labels) == {"Alive", "Dead"}
    sizes = np.sqrt(np.concatenate([(p.boxes[:, 2] - p.boxes[:, 0]) * (p.boxes[:, 3] - p.boxes[:, 1])
                                    for p in photos]))
    assert 8 <= sizes.min() and sizes.max() <= 107  # the range the trees preset's anchors were sized for
    assert "all: 951 boxes" in trees.box_statistics(photos)[-1]


def test_tiles_cover_the_image_and_every_crown_lies_whole_in_one(photos):
    assert trees.tile_starts(400, 400, 200) == [0] and trees.tile_starts(300, 400, 200) == [0]
    starts = trees.tile_starts(2299, 400, 200)
    assert starts[0] == 0 and starts[-1] == 2299 - 400 and max(np.diff(starts)) <= 200
    for p in photos:
        xs, ys = trees.tile_starts(p.width, 400, 200), trees.tile_starts(p.height, 400, 200)
        for x0, y0, x1, y1 in p.boxes:
            assert any(x <= x0 and x1 <= x + 400 and y <= y0 and y1 <= y + 400 for x in xs for y in ys)


def test_boxes_are_clipped_at_tile_borders_and_slivers_ignored():
    boxes = np.array([[10, 10, 50, 50],      # inside
                      [380, 100, 420, 140],  # half inside (20 of 40 px): kept, clipped
                      [390, 200, 430, 240],  # a quarter inside: ignored region, clipped
                      [-30, 300, 10, 340],   # a quarter inside, at the left border: ignored
                      [500, 10, 540, 50]],   # outside: gone
                     dtype=np.float64)
    kept, ignored = trees.clip_to_tile(boxes, 0, 0, 400, 400, keep_fraction=0.5)
    np.testing.assert_array_equal(kept, [[10, 10, 50, 50], [380, 100, 400, 140]])
    np.testing.assert_array_equal(ignored, [[390, 200, 400, 240], [0, 300, 10, 340]])
    kept, ignored = trees.clip_to_tile(boxes, 200, 100, 400, 400, keep_fraction=0.5)  # offsets move boxes
    assert [180, 0, 220, 40] in kept.tolist() and len(ignored) == 0


def test_split_is_by_site_and_checked(photos):
    split = trees.split_photos(photos, trees.DEFAULT_VAL_SITES)
    assert {p.site for p in split["train"]} == {"YELL"} and {p.site for p in split["val"]} == {"OSBS", "SOAP"}
    assert sum(len(p.boxes) for p in split["train"]) == 853 and sum(len(p.boxes) for p in split["val"]) == 98
    for bad in ((), ("YELL", "OSBS", "SOAP"), ("HARV",)):
        with pytest.raises(InputError, match="--val-sites"):
            trees.TreesParams(val_sites=bad)


@pytest.fixture(scope="module")
def folder(photos, tmp_path_factory):
    """A small conversion: a 600x400 window of a YELL crop (2 tiles) to train, the OSBS and SOAP
    photos to validate, written by the converter's own ``write_split``."""
    root = str(tmp_path_factory.mktemp("trees"))
    crop = next(p for p in photos if p.name == "2019_YELL_2_541000_4977000_image_crop")
    window_path = os.path.join(root, "window.png")
    with Image.open(crop.path) as image:
        image.crop((300, 200, 900, 600)).save(window_path)
    window = trees.Photo("window", "YELL", window_path, 600, 400, crop.boxes - [300, 200, 300, 200], crop.labels)
    params = trees.TreesParams()
    written = {"train": trees.write_split(root, "train", [window], params),
               "val": trees.write_split(root, "val", trees.split_photos(photos, params.val_sites)["val"], params)}
    return root, window, written


def test_converted_folder_is_valid_coco_that_the_example_reads(folder):
    from pycocotools.coco import COCO

    root, window, written = folder
    layout = dataset_layout(root)
    assert layout == {"train": (root, os.path.join(root, "train.json")), "val": (root, os.path.join(root, "val.json"))}
    for split, count in (("train", 2), ("val", 2)):
        coco = COCO(layout[split][1])
        assert len(coco.getImgIds()) == count
        assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "tree"}]
        data = read_coco(layout[split][1], root)
        for image in data.images:
            with Image.open(image.path) as tile:
                assert tile.size == (image.width, image.height) == (400, 400)
            for box in image.boxes + image.crowd_boxes:
                assert 0 <= box[0] < box[2] <= 400 and 0 <= box[1] < box[3] <= 400
    val = read_coco(layout["val"][1], root)
    assert sum(len(i.boxes) for i in val.images) == 98 and not any(i.crowd_boxes for i in val.images)
    # Train tiles: each kept box holds at least half of its crown, each ignored one less.
    train = written["train"]
    b = window.boxes
    inside = (b[:, 0] < 600) & (b[:, 2] > 0) & (b[:, 1] < 400) & (b[:, 3] > 0)
    assert len(train["annotations"]) >= inside.sum()  # every crown touching the window lands in a tile
    for tile in train["images"]:
        x0, y0 = tile["offset"]
        kept, ignored = trees.clip_to_tile(window.boxes, x0, y0, 400, 400, trees.KEEP_FRACTION)
        mine = [a for a in train["annotations"] if a["image_id"] == tile["id"]]
        assert sum(not a["iscrowd"] for a in mine) == len(kept) and sum(a["iscrowd"] for a in mine) == len(ignored)
        assert len(kept) > 10


def test_trees_anchors_fit_the_crowns(folder):
    root, _, _ = folder
    share, median, count = trees.anchor_fit(os.path.join(root, "val.json"), trees_config(), trees.TILE)
    assert count == 98 and share >= 0.95 and median > 0.5


def test_tiny_training_run_on_tiles_then_evaluation(folder, tmp_path):
    from examples.retinanet import evaluate, infer
    from examples.retinanet.train import train

    root, _, _ = folder
    options = TrainOptions(output=str(tmp_path / "run"), data=root, image_size=400, augment="aerial", batch_size=2,
                           iters=4, lr=0.01, warmup_iters=1, log_every=2, checkpoint_every=0, threads=1,
                           progress=False, tensorboard=False)
    config = trees_config(backbone_width=0.25, fpn_channels=16, head_width=16, score_threshold=0.001)
    torch.manual_seed(0)
    result = train(config, options)
    assert result["iterations"] == 4 and all(np.isfinite(h["loss"]) for h in result["history"])
    stats = result["stats"]
    assert stats["num_detections"] > 0 and 0.0 <= stats["AP50"] <= 1.0
    model, checkpoint = evaluate.load_checkpoint(str(tmp_path / "run" / "model_final.pth"))
    assert checkpoint["class_names"] == ["tree"] and model.config.levels == (3, 4, 5)
    out = tmp_path / "eval.json"
    evaluate.main(["--checkpoint", str(tmp_path / "run" / "model_final.pth"), "--threads", "1", "--output", str(out)])
    with open(out) as f:  # without --data: the val split of the folder the checkpoint trained on
        assert json.load(f)["AP"] == pytest.approx(stats["AP"])
    # Detections drawn on a val photograph, boxes only (dense crowns) and with labels.
    tile = os.path.join(root, "val", "OSBS_029_x0_y0.png")
    changed = {}
    for flag in ("--labels", "--no-labels"):
        infer.main([tile, "--checkpoint", str(tmp_path / "run" / "model_final.pth"), "--output", str(tmp_path / flag),
                    "--score-threshold", "0", "--zoom", "1", "--threads", "1", flag])
        with Image.open(tile) as original, Image.open(tmp_path / flag / "OSBS_029_x0_y0.png") as drawn:
            changed[flag] = (np.asarray(original) != np.asarray(drawn)).any(axis=-1).sum()
    assert 0 < changed["--no-labels"] < changed["--labels"]


def test_converted_on_first_use_and_again_only_when_the_settings_change(tmp_path, monkeypatch):
    written = []

    def write_split(root, split, photos, params):  # the conversion itself is tested above
        written.append((split, sorted({p.site for p in photos})))
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump({}, f)

    monkeypatch.setattr(trees, "write_split", write_split)
    root = str(tmp_path / "trees")
    paths = trees.ensure_trees_dataset(root)
    assert written == [("train", ["YELL"]), ("val", ["OSBS", "SOAP"])]
    assert paths["val"] == (root, os.path.join(root, "val.json"))
    trees.ensure_trees_dataset(root)
    assert len(written) == 2  # up to date: nothing rewritten
    trees.ensure_trees_dataset(root, val_sites=("SOAP",))
    assert written[2:] == [("train", ["OSBS", "YELL"]), ("val", ["SOAP"])]
    with open(os.path.join(root, "params.json")) as f:
        assert json.load(f)["val_sites"] == ["SOAP"]
