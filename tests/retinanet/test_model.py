import dataclasses

import torch

from examples.retinanet import loss as loss_module
from examples.retinanet.config import build_model, fast_config, paper_config
from examples.retinanet.matcher import Matcher


def _tiny(**overrides):
    return fast_config(backbone_width=0.25, fpn_channels=16, head_width=16, **overrides)


def test_focal_impl_is_the_fused_op():
    import focal

    assert loss_module._focal_op("focal") is focal.sigmoid_focal_loss
    assert loss_module._focal_op("reference") is focal.reference.sigmoid_focal_loss


def test_paper_preset_pyramid_and_anchor_layout():
    config = paper_config(depth=18, backbone_width=0.25, fpn_channels=16, head_width=16, num_classes=3,
                          channels_last=False)
    assert config.levels == (3, 4, 5, 6, 7) and config.anchor_sizes == (32, 64, 128, 256, 512)
    model = build_model(config).eval()
    features = model.backbone(torch.zeros(1, 3, 256, 256))
    assert [tuple(f.shape[-2:]) for f in features] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(f.shape[1] == 16 for f in features)
    logits, deltas = model.head(features)
    anchors = model.anchor_generator([f.shape[-2:] for f in features])
    assert logits.shape == (1, sum(a.shape[0] for a in anchors), 3) == (1, 9 * 1364, 3)
    assert deltas.shape == (1, 9 * 1364, 4)


def test_label_anchors_positive_background_ignored_and_empty():
    model = build_model(_tiny())
    anchors = torch.cat(model.anchor_generator([(12, 12), (6, 6)]))
    box = anchors[100:101].clone()
    targets = [{"boxes": box, "labels": torch.tensor([7])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    classes, boxes = model.label_anchors(anchors, targets)
    assert classes.shape == (2, anchors.shape[0]) and boxes.shape == (2, anchors.shape[0], 4)
    assert classes[0, 100] == 7
    torch.testing.assert_close(boxes[0, 100], box[0])
    assert (classes[0] == Matcher.IGNORE).any() and (classes[0] == Matcher.BACKGROUND).any()
    assert torch.all(classes[1] == Matcher.BACKGROUND)


def test_losses_with_an_empty_image_and_impls_agree():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 40.0, 70.0, 70.0]]),
                "labels": torch.tensor([1, 4])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    results = {}
    for impl in ("focal", "torchvision", "reference"):
        torch.manual_seed(0)
        model = build_model(_tiny(loss_impl=impl)).train()
        losses = model(images, targets)
        assert set(losses) == {"loss_cls", "loss_box"}
        assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
        results[impl] = losses
    for impl in ("torchvision", "reference"):
        for name in ("loss_cls", "loss_box"):
            torch.testing.assert_close(results[impl][name], results["focal"][name], rtol=1e-4, atol=1e-6)
    # only background anchors: the box loss is exactly zero, the classification loss is not
    model = build_model(_tiny()).train()
    empty = model(images, [targets[1], targets[1]])
    assert empty["loss_box"].item() == 0.0 and empty["loss_cls"].item() > 0


def test_eval_mode_returns_capped_detections():
    model = build_model(dataclasses.replace(_tiny(), detections_per_image=7, score_threshold=0.0)).eval()
    with torch.no_grad():
        (out,) = model(torch.zeros(1, 3, 96, 96))
    assert set(out) == {"boxes", "scores", "labels"}
    assert out["boxes"].shape == (7, 4) and out["labels"].shape == (7,)
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])
    assert torch.all((out["boxes"] >= 0) & (out["boxes"] <= 96))
