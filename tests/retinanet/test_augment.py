"""Training augmentation: boxes stay on the objects' pixels, draws depend on (seed, epoch, image) only,
and each preset or dataset gets the augmentation its options say."""

import argparse

import pytest
import torch

from examples.retinanet.augment import Augmentation
from examples.retinanet.config import add_config_arguments
from examples.retinanet.options import add_train_arguments, options_from_arguments

# Rectangles of distinct aspect ratios (the label is the index), one reaching the right border.
RECTANGLES = [(8, 10, 28, 20), (50, 12, 60, 42), (14, 56, 44, 76), (70, 60, 96, 72)]


def _batch(count: int = 6, size: int = 96):
    """Grey canvases with bright rectangles exactly at the boxes (crowd box: the last one)."""
    images = torch.full((count, 3, size, size), 60, dtype=torch.uint8)
    for x0, y0, x1, y1 in RECTANGLES:
        images[:, :, y0:y1, x0:x1] = 230
    boxes = torch.tensor(RECTANGLES, dtype=torch.float32)
    targets = [{"boxes": boxes[:3].clone(), "labels": torch.arange(3), "crowd_boxes": boxes[3:].clone(),
                "image_id": i} for i in range(count)]
    return images, targets


def _drawn_box(image: torch.Tensor, box: torch.Tensor, margin: int = 4) -> list[float]:
    """The extent of the object drawn near ``box`` (grown by ``margin``): the rows and columns of which
    at least half the pixels across the box differ from the background by half the contrast or more
    (a majority, so that a thin clutter bar or noise next to the box does not count)."""
    grey = image.float().mean(0)
    h, w = grey.shape
    x0, y0 = max(0, int(box[0]) - margin), max(0, int(box[1]) - margin)
    x1, y1 = min(w, int(box[2]) + margin + 1), min(h, int(box[3]) + margin + 1)
    window = (grey[y0:y1, x0:x1] - grey.median()).abs()
    on = window > 0.5 * window.max()
    inner_x = slice(int(box[0]) - x0, int(box[2]) - x0)
    inner_y = slice(int(box[1]) - y0, int(box[3]) - y0)
    rows = torch.nonzero(on[:, inner_x].float().mean(1) >= 0.5).flatten()
    cols = torch.nonzero(on[inner_y, :].float().mean(0) >= 0.5).flatten()
    if len(rows) == 0 or len(cols) == 0:
        return [float("nan")] * 4  # nothing of the object there
    return [x0 + cols.min().item(), y0 + rows.min().item(), x0 + cols.max().item() + 1, y0 + rows.max().item() + 1]


@pytest.mark.parametrize("name", ["digits", "aerial"])
def test_boxes_follow_the_pixels(name):
    images, targets = _batch()
    out_images, out_targets = Augmentation(name, seed=3)(images, targets, list(range(6)), epoch=0)
    assert out_images.shape == images.shape and out_images.dtype == torch.uint8
    changed = 0
    for image, target in zip(out_images, out_targets):
        boxes = torch.cat([target["boxes"], target["crowd_boxes"]])
        labels = target["labels"].tolist() + [3] * len(target["crowd_boxes"])
        assert len(target["boxes"]) == len(target["labels"]) and len(target["crowd_boxes"]) <= 1
        for box, label in zip(boxes, labels):
            assert (box >= 0).all() and (box[2:] <= 96).all()
            drawn = torch.tensor(_drawn_box(image, box), dtype=torch.float32)
            assert torch.allclose(drawn, box, atol=2.5), (name, label, box, drawn)
            x0, y0, x1, y1 = RECTANGLES[label]  # the label still names its rectangle: same aspect ratio
            if (box[:2] > 0).all() and (box[2:] < 96).all():  # not cut at a border
                aspect = (box[2] - box[0]) / (box[3] - box[1])
                assert aspect == pytest.approx((x1 - x0) / (y1 - y0), rel=0.25)
        changed += not torch.equal(target["boxes"], torch.tensor(RECTANGLES[:3], dtype=torch.float32))
    assert changed >= 2  # scale (and for aerial flips) moved the boxes of several images


def test_draws_depend_on_seed_epoch_and_image_only():
    images, targets = _batch()
    augment = Augmentation("digits", seed=0)
    state = torch.get_rng_state()
    first, _ = augment(images, targets, list(range(6)), epoch=0)
    assert torch.equal(torch.get_rng_state(), state)  # the process's random state is left as it was
    # Image 4 alone, as another process would hold it, gets the same draws as in the full batch.
    alone, _ = augment(images[4:5], targets[4:5], [4], epoch=0)
    assert torch.equal(alone[0], first[4])
    later, _ = augment(images, targets, list(range(6)), epoch=1)
    other_seed, _ = Augmentation("digits", seed=1)(images, targets, list(range(6)), epoch=0)
    assert not torch.equal(later, first) and not torch.equal(other_seed, first)
    same, _ = Augmentation("none")(images, targets, list(range(6)), epoch=0)
    assert same is images


def _options(*argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    add_config_arguments(parser)
    return options_from_arguments(parser.parse_args(list(argv)))


def test_augmentation_data_and_batch_follow_the_preset_and_dataset():
    assert _options().augment == "digits"  # the default digits benchmark
    assert _options("--preset", "imbalance").augment == "none"  # Table 1's runs, as they were measured
    assert _options("--data", "somewhere").augment == "none"  # a user's data: only what is asked
    trees = _options("--preset", "trees")
    assert (trees.data, trees.image_size, trees.augment) == ("data/trees", 400, "aerial")
    assert (trees.batch_size, trees.lr) == (4, 0.01) and (_options().batch_size, _options().lr) == (16, 0.04)
    assert _options("--preset", "trees", "--batch-size", "8").batch_size == 8
    assert _options("--preset", "trees", "--augment", "none", "--image-size", "512").image_size == 512
    assert _options("--preset", "trees", "--train-json", "a.json").data is None
    with pytest.raises(SystemExit):
        _options("--augment", "everything")
