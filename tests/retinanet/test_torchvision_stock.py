"""--detector torchvision: stock torchvision RetinaNet trained and evaluated by this example's loop."""

import os

import pytest
import torch
from torchvision.ops import box_iou, sigmoid_focal_loss

from examples.retinanet import evaluate
from examples.retinanet.config import RetinaNetConfig, build_model, fast_config
from examples.retinanet.digits import DigitsParams, ensure_digits_dataset
from examples.retinanet.torchvision_stock import StockRetinaNet
from examples.retinanet.train import TrainOptions, train

TINY = DigitsParams(seed=5, num_train=24, num_val=4, image_size=48, min_digit_height=12, max_digit_height=20,
                    min_digits=1, max_digits=2)


def _targets():
    return [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 45.0]]), "labels": torch.tensor([3])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


def test_same_backbone_as_the_focal_detector():
    torch.manual_seed(0)
    stock = build_model(fast_config(detector="torchvision"))
    ours = build_model(fast_config())
    assert isinstance(stock, StockRetinaNet)
    assert {k: v.shape for k, v in stock.backbone.state_dict().items()} == {
        k: v.shape for k, v in ours.backbone.state_dict().items()}
    with pytest.raises(ValueError, match="detector must be one of"):
        RetinaNetConfig(detector="detectron")


def test_v2_is_torchvisions_v2_head_on_the_same_backbone():
    """--detector torchvision_v2: the head retinanet_resnet50_fpn_v2 builds (GroupNorm after each conv,
    GIoU box loss), the rest as --detector torchvision; it trains."""
    torch.manual_seed(0)
    v1, v2 = build_model(fast_config(detector="torchvision")), build_model(fast_config(detector="torchvision_v2"))
    assert {k: v.shape for k, v in v1.backbone.state_dict().items()} == {
        k: v.shape for k, v in v2.backbone.state_dict().items()}
    norms = lambda m: [x for x in m.detector.head.modules() if isinstance(x, torch.nn.GroupNorm)]  # noqa: E731
    assert norms(v1) == [] and len(norms(v2)) == 2 * 4 and all(n.num_groups == 32 for n in norms(v2))
    assert (v1.detector.head.regression_head._loss_type, v2.detector.head.regression_head._loss_type) == ("l1", "giou")
    v2.train()
    losses = v2(torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8), _targets())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in v2.detector.head.parameters())


def test_images_are_not_resized_and_losses_are_torchvisions():
    torch.manual_seed(0)
    model = build_model(fast_config(detector="torchvision"))
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    model.train()
    losses = model(images, _targets())
    assert set(losses) == {"loss_cls", "loss_box"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.detector.head.parameters())
    # The classification loss is torchvision's focal loss on the one-hot target, each image over its
    # own positives (at least 1): recompute it from the detector's own pieces.
    detector = model.detector
    with torch.no_grad():
        batch, _ = detector.transform(list(images.float() / 255))
        assert batch.tensors.shape[-2:] == (96, 96) and batch.image_sizes == [(96, 96)] * 2
        features = list(detector.backbone(batch.tensors).values())
        logits = detector.head.classification_head(features)
        anchors = detector.anchor_generator(batch, features)
        expected = []
        for i, target in enumerate(_targets()):
            if target["boxes"].numel():
                matched = detector.proposal_matcher(box_iou(target["boxes"], anchors[i]))
            else:
                matched = torch.full((anchors[i].shape[0],), -1, dtype=torch.int64)
            onehot = torch.zeros_like(logits[i])
            positive = matched >= 0
            onehot[positive, target["labels"][matched[positive]]] = 1.0
            valid = matched != detector.proposal_matcher.BETWEEN_THRESHOLDS
            loss = sigmoid_focal_loss(logits[i][valid], onehot[valid], reduction="sum")
            expected.append(loss / max(1, int(positive.sum())))
    with torch.no_grad():
        again = model(images, _targets())["loss_cls"]
    assert again == pytest.approx(float(sum(expected) / len(expected)), rel=1e-5)


def test_trains_evaluates_and_reloads_through_the_example(tmp_path):
    paths = ensure_digits_dataset(str(tmp_path / "data"), TINY)
    options = TrainOptions(output=str(tmp_path / "run"), train_json=paths["train"][1], val_json=paths["val"][1],
                           image_root=paths["train"][0], image_size=48, batch_size=8, iters=20, lr=0.01,
                           warmup_iters=3, log_every=5, checkpoint_every=0, progress=False)
    config = fast_config(detector="torchvision", backbone_width=0.25, fpn_channels=16, num_classes=10)
    torch.manual_seed(0)
    result = train(config, options)
    history = result["history"]
    assert result["iterations"] == 20 and history[-1]["loss"] < history[0]["loss"]
    assert set(evaluate.STAT_NAMES) <= set(result["stats"])
    model, checkpoint = evaluate.load_checkpoint(os.path.join(options.output, "model_final.pth"))
    assert isinstance(model, StockRetinaNet) and checkpoint["config"]["detector"] == "torchvision"
    again = evaluate.evaluate_model(model, *paths["val"], image_size=48)
    assert again["AP"] == pytest.approx(result["stats"]["AP"])
