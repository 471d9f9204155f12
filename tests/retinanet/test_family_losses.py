"""RetinaNet trained with a relative of the focal loss (--cls-loss focal_star | qfl | vfl)."""

import pytest
import torch

import focal
from examples.retinanet import loss as loss_module
from examples.retinanet.config import build_model, fast_config

IMAGES = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
TARGETS = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 40.0, 70.0, 70.0]]), "labels": torch.tensor([1, 4])},
           {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


def _tiny(**overrides):
    return fast_config(backbone_width=0.25, fpn_channels=16, head_width=16, **overrides)


def test_quality_scores_are_the_iou_of_foreground_anchors_only():
    pred = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]]])
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 4.0, 4.0]]])
    foreground = torch.tensor([[True, True, False]])
    scores = loss_module.quality_scores(pred.requires_grad_(), gt, foreground)
    torch.testing.assert_close(scores, torch.tensor([[1.0, 50.0 / 150.0, 0.0]]))
    assert not scores.requires_grad


@pytest.mark.parametrize("cls_loss", ["focal_star", "qfl", "vfl"])
def test_each_family_loss_trains_a_step_with_the_fused_op(cls_loss):
    torch.manual_seed(0)
    model = build_model(_tiny(cls_loss=cls_loss)).train()
    losses = model(IMAGES, TARGETS)
    total = losses["loss_cls"] + losses["loss_box"]
    assert torch.isfinite(total) and losses["loss_cls"] > 0
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_family_loss_matches_its_reference_on_the_models_targets():
    """QFL through the model equals focal.reference.quality_focal_loss on the same logits, class ids
    and IoU scores, with the ignored anchors left out and the positives' count as normaliser."""
    torch.manual_seed(0)
    model = build_model(_tiny(cls_loss="qfl")).train()
    captured = {}
    original = loss_module.family_classification_loss

    def spy(config, cls_logits, gt_classes, normalizer, quality=None):
        captured.update(logits=cls_logits.detach(), ids=gt_classes, norm=normalizer, quality=quality)
        return original(config, cls_logits, gt_classes, normalizer, quality)

    import examples.retinanet.model as model_module

    model_module.family_classification_loss = spy
    try:
        value = model(IMAGES, TARGETS)["loss_cls"]
    finally:
        model_module.family_classification_loss = original
    c = captured
    assert (c["quality"][c["ids"] >= 0] > 0).any() and (c["quality"][c["ids"] < 0] == 0).all()
    want = focal.reference.quality_focal_loss(c["logits"].double(), (c["ids"], c["quality"].double()), 2.0, "sum",
                                              normalizer=c["norm"].double(), ignore_index=loss_module.IGNORE_INDEX)
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)


def test_family_losses_need_the_fused_op():
    with pytest.raises(ValueError, match="cls_loss"):
        _tiny(cls_loss="qfl", loss_impl="torchvision")
    with pytest.raises(ValueError, match="cls_loss"):
        _tiny(cls_loss="softmax")
