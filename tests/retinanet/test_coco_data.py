"""Any COCO-format dataset: category ids mapped to contiguous labels and back, unannotated images as
negatives, crowd boxes ignored in matching, degenerate boxes dropped with one counted warning, any
image size letterboxed with boxes clipped to the real image, --data folders in both layouts."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from examples.retinanet import evaluate, train
from examples.retinanet.coco import DegenerateBoxWarning, dataset_layout, read_coco
from examples.retinanet.config import build_model, fast_config
from examples.retinanet.batches import InMemoryBatches
from examples.retinanet.data import CocoDetection, build_transform
from examples.retinanet.errors import InputError
from examples.retinanet.matcher import Matcher

from .tiny_coco import TINY_MODEL_FLAGS, write_coco


def test_category_ids_become_contiguous_labels_and_map_back_in_evaluation(tmp_path):
    objects = [[(17, [4, 4, 20, 20])], [(42, [10, 8, 16, 24]), (3, [30, 30, 12, 12])], [(42, [2, 2, 30, 10])]]
    path = write_coco(tmp_path, "val", sizes=((48, 48),) * 3, objects=objects, categories=(42, 3, 17))
    dataset = CocoDetection(str(tmp_path), path, build_transform(48, train=False))
    assert dataset.category_ids == [3, 17, 42] and dataset.class_names == ["class3", "class17", "class42"]
    assert [dataset[i][1]["labels"].tolist() for i in range(3)] == [[1], [2, 0], [2]]

    class GroundTruthModel(torch.nn.Module):
        """Predicts exactly the ground truth in contiguous labels: AP 1 only if mapped back right."""

        def forward(self, images):
            return [{"boxes": dataset[i][1]["boxes"], "labels": dataset[i][1]["labels"],
                     "scores": torch.ones(len(dataset[i][1]["labels"]))} for i in range(len(images))]

    results = evaluate.predict(GroundTruthModel(), dataset, batch_size=8)
    assert sorted(r["category_id"] for r in results) == [3, 17, 42, 42]
    assert evaluate.coco_evaluate(dataset, results)["AP"] == pytest.approx(1.0)


def test_images_without_annotations_are_negatives(tmp_path):
    path = write_coco(tmp_path, sizes=((40, 40),) * 4, objects=[[(1, [4, 4, 16, 16])], [], [(2, [8, 8, 20, 12])], []])
    dataset = CocoDetection(str(tmp_path), path, build_transform(32, train=False))
    batches = InMemoryBatches(dataset, batch_size=4)
    images, targets = batches.next_batch()
    assert sorted(len(t["boxes"]) for t in targets) == [0, 0, 1, 1]
    model = build_model(fast_config(num_classes=2, backbone_width=0.25, fpn_channels=16, head_width=16))
    anchors = torch.cat(model.anchor_generator([(4, 4), (2, 2)]))
    gt_classes, _ = model.label_anchors(anchors, targets)
    for target, classes in zip(targets, gt_classes):
        if len(target["boxes"]) == 0:
            assert (classes == Matcher.BACKGROUND).all()  # every anchor a negative, none ignored
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_crowd_boxes_are_not_objects_and_their_anchors_are_ignored(tmp_path):
    objects = [[(1, [2, 2, 12, 12]), (1, [16, 16, 30, 30], 1)]]
    path = write_coco(tmp_path, sizes=((48, 48),), objects=objects)
    dataset = CocoDetection(str(tmp_path), path, build_transform(48, train=False))
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[2, 2, 14, 14]] and target["crowd_boxes"].tolist() == [[16, 16, 46, 46]]
    model = build_model(fast_config(num_classes=2, backbone_width=0.25, fpn_channels=16, head_width=16))
    anchors = torch.cat(model.anchor_generator([(6, 6), (3, 3)]))
    with_crowd, _ = model.label_anchors(anchors, [target])
    without, _ = model.label_anchors(anchors, [{**target, "crowd_boxes": torch.zeros(0, 4)}])
    inside = ((anchors[:, :2] >= 16) & (anchors[:, 2:] <= 46)).all(dim=1)
    assert inside.any()
    assert (with_crowd[0][inside] == Matcher.IGNORE).all() and (without[0][inside] == Matcher.BACKGROUND).all()
    assert torch.equal(with_crowd[0][with_crowd[0] >= 0], without[0][without[0] >= 0])  # positives unchanged


def test_degenerate_boxes_dropped_with_one_counted_warning_and_the_rest_clipped(tmp_path):
    objects = [[(1, [4, 4, 0, 10]), (1, [4, 4, 10, -2]), (1, [60, 60, 10, 10]), (1, [-5, 30, 20, 30]),
                (2, [8, 8, 10, 10])]]
    path = write_coco(tmp_path, sizes=((48, 40),), objects=objects)
    with pytest.warns(DegenerateBoxWarning, match="dropped 3 of 5 boxes as degenerate") as record:
        data = read_coco(path, str(tmp_path))
    assert len([w for w in record if w.category is DegenerateBoxWarning]) == 1
    assert data.images[0].boxes == [[0.0, 30.0, 15.0, 40.0], [8.0, 8.0, 18.0, 18.0]]
    assert data.num_dropped == 3 and len(data.dataset["annotations"]) == 2


def test_a_wide_image_is_letterboxed_and_its_boxes_stay_in_the_real_image(tmp_path):
    objects = [[(1, [250, 60, 40, 50])]]  # reaches past the 288 x 96 image: clipped to it
    path = write_coco(tmp_path, "val", sizes=((288, 96),), objects=objects)
    dataset = CocoDetection(str(tmp_path), path, build_transform(96, train=False))
    image, target = dataset[0]
    assert image.shape == (3, 96, 96) and target["scale"] == pytest.approx(1 / 3)
    assert target["orig_size"] == (96, 288)
    torch.testing.assert_close(target["boxes"], torch.tensor([[250 / 3, 20.0, 96.0, 32.0]]))
    assert (image[:, 32:] == 0).all()  # padding below the 96 x 32 resized image

    class PaddingModel(torch.nn.Module):
        """Predicts a box over the whole padded square, as an untrained model may."""

        def forward(self, images):
            return [{"boxes": torch.tensor([[10.0, 5.0, 96.0, 96.0]]), "labels": torch.tensor([0]),
                     "scores": torch.tensor([0.9])} for _ in images]

    (result,) = evaluate.predict(PaddingModel(), dataset)
    x, y, w, h = result["bbox"]
    assert (x, y) == pytest.approx((30.0, 15.0)) and x + w == pytest.approx(288.0) and y + h == pytest.approx(96.0)


def test_data_folder_layouts(tmp_path):
    ours = tmp_path / "ours"
    write_coco(ours, "train"), write_coco(ours, "val")
    assert dataset_layout(str(ours)) == {"train": (str(ours), str(ours / "train.json")),
                                          "val": (str(ours), str(ours / "val.json"))}
    coco = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        path = write_coco(coco, split)
        os.makedirs(coco / "annotations", exist_ok=True)
        data = json.load(open(path))
        for image in data["images"]:
            image["file_name"] = os.path.basename(image["file_name"])  # COCO: relative to the split folder
        json.dump(data, open(coco / "annotations" / f"instances_{split}.json", "w"))
    layout = dataset_layout(str(coco))
    assert layout["train"] == (str(coco / "train2017"), str(coco / "annotations" / "instances_train2017.json"))
    assert len(CocoDetection(*layout["val"]).images) == 4
    with pytest.raises(InputError, match="found neither"):
        dataset_layout(str(tmp_path))
    with pytest.raises(InputError, match="is a file, expected a directory"):
        dataset_layout(str(ours / "train.json"))


def test_train_and_evaluate_on_a_data_folder_end_to_end(tmp_path):
    objects = [[(5, [4 + 2 * i, 6, 14, 14])] if i % 3 else [] for i in range(6)]
    objects[1].append((9, [20, 20, 12, 18], 1))
    write_coco(tmp_path / "d", "train", sizes=((40, 56),) * 6, objects=objects, categories=(5, 9))
    write_coco(tmp_path / "d", "val", sizes=((56, 40),) * 2, categories=(5, 9))
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateBoxWarning)  # none here
        train.main(["--data", str(tmp_path / "d"), "--image-size", "32", "--batch-size", "2", "--iters", "3",
                    "--warmup-iters", "0", "--output", str(out), "--no-progress", "--loader", "stream",
                    "--workers", "1", *TINY_MODEL_FLAGS])
    metrics = json.load(open(out / "metrics.json"))["summary"]
    assert metrics["iterations"] == 3 and -1.0 <= metrics["AP"] <= 1.0
    checkpoint = torch.load(out / "model_final.pth", weights_only=True)
    assert checkpoint["category_ids"] == [5, 9] and checkpoint["config"]["num_classes"] == 2
    evaluate.main(["--checkpoint", str(out / "model_final.pth"), "--data", str(tmp_path / "d")])
