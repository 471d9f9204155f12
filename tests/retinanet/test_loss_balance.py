"""loss_balance: the loss and gradient of positives, hard and easy negatives, per loss."""

import argparse
import math

import pytest
import torch

from examples.retinanet.config import build_model, fast_config
from examples.retinanet.loss import BACKGROUND, IGNORE_INDEX
from examples.retinanet.loss_balance import accumulate, group_losses, measure, parse_loss, sample_groups, table


def test_groups_partition_the_valid_samples():
    logits = torch.tensor([[3.0, -4.0], [-1.0, -5.0], [0.0, 0.0]])
    classes = torch.tensor([1, BACKGROUND, IGNORE_INDEX])
    groups = sample_groups(logits, classes, easy=0.1)
    assert groups["positive"].tolist() == [[False, True], [False, False], [False, False]]
    # sigmoid(3) and sigmoid(-1) are above 0.1: hard; sigmoid(-5) below: easy; the ignored row is in none
    assert groups["hard negative"].tolist() == [[True, False], [True, False], [False, False]]
    assert groups["easy negative"].tolist() == [[False, False], [False, True], [False, False]]


def test_group_losses_are_the_per_sample_losses_summed():
    logits = torch.tensor([[3.0, -4.0], [-1.0, -5.0]])
    classes = torch.tensor([1, BACKGROUND])
    groups = sample_groups(logits, classes, easy=0.1)
    losses = group_losses(logits, classes, 0.0, -1.0, groups, normalizer=2.0)

    def ce(x, y):  # binary cross entropy of a logit, written out
        return math.log1p(math.exp(-x)) if y else math.log1p(math.exp(x))

    assert float(losses["positive"]) == pytest.approx(ce(-4.0, 1) / 2)
    assert float(losses["hard negative"]) == pytest.approx((ce(3.0, 0) + ce(-1.0, 0)) / 2)
    assert float(losses["easy negative"]) == pytest.approx(ce(-5.0, 0) / 2)
    fl = group_losses(logits, classes, 2.0, 0.25, groups, normalizer=2.0)
    p = torch.sigmoid(torch.tensor(-5.0)).item()
    assert float(fl["easy negative"]) == pytest.approx(0.75 * p**2 * ce(-5.0, 0) / 2)


def test_at_the_prior_init_easy_negatives_dominate_ce_but_not_the_focal_loss():
    torch.manual_seed(0)
    model = build_model(fast_config(backbone_width=0.25, fpn_channels=16, head_width=16, num_classes=10))
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[20.0, 20.0, 44.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[50.0, 10.0, 80.0, 40.0]]), "labels": torch.tensor([7])}]
    result = accumulate([measure(model, images, targets, [("CE", 0.0, -1.0), ("FL", 2.0, 0.25)])])
    assert result["samples"]["positive"] >= 2 and result["samples"]["hard negative"] == 0
    ce, fl = result["losses"]["CE"], result["losses"]["FL"]
    # p is about 0.01 everywhere: 1620 * 10 negatives per image of -log(.99) each, against a few
    # positives of -log(.01) each; both divided by the positive count
    positives, easy = result["samples"]["positive"], result["samples"]["easy negative"]
    assert 2 * 1620 * 10 - 1000 < positives + easy <= 2 * 1620 * 10  # all but a few ignored anchors
    assert ce["positive"]["loss"] == pytest.approx(-math.log(0.01), rel=0.02)
    assert ce["easy negative"]["loss"] == pytest.approx(easy * -math.log(0.99) / positives, rel=0.02)
    assert fl["easy negative"]["loss"] == pytest.approx(0.75 * 0.01**2 * ce["easy negative"]["loss"], rel=0.05)
    assert ce["easy negative"]["loss"] > 3 * ce["positive"]["loss"]
    assert fl["easy negative"]["loss"] < 0.01 * fl["positive"]["loss"]
    assert ce["easy negative"]["grad_norm"] > fl["easy negative"]["grad_norm"] * 100
    assert "| CE |" in table(result) and "| FL |" in table(result)


def test_parse_loss():
    assert parse_loss("FL=2,0.25") == ("FL", 2.0, 0.25)
    assert parse_loss("CE=0,-1") == ("CE", 0.0, -1.0)
    for bad in ("FL", "FL=2", "FL=-1,0.25", "FL=2,1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_loss(bad)
