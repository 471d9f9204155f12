import torch

from examples.retinanet.matcher import Matcher

BG, IGN = Matcher.BACKGROUND, Matcher.IGNORE


def test_thresholds_and_ignore_band():
    iou = torch.tensor([
        [0.7, 0.5, 0.45, 0.4, 0.39, 0.0],
        [0.2, 0.1, 0.0, 0.0, 0.0, 0.3],
    ])
    matched = Matcher(0.5, 0.4, allow_low_quality_matches=False)(iou)
    assert matched.tolist() == [0, 0, IGN, IGN, BG, BG]


def test_best_ground_truth_wins():
    iou = torch.tensor([[0.6, 0.55], [0.8, 0.52]])
    matched = Matcher(0.5, 0.4, allow_low_quality_matches=False)(iou)
    assert matched.tolist() == [1, 0]


def test_low_quality_matches_give_every_box_its_best_anchors():
    iou = torch.tensor([
        [0.9, 0.1, 0.0, 0.0],
        [0.0, 0.3, 0.3, 0.1],  # best IoU 0.3, tied on anchors 1 and 2
    ])
    without = Matcher(0.5, 0.4, allow_low_quality_matches=False)(iou)
    assert without.tolist() == [0, BG, BG, BG]
    with_lq = Matcher(0.5, 0.4, allow_low_quality_matches=True)(iou)
    assert with_lq.tolist() == [0, 1, 1, BG]


def test_box_overlapping_nothing_stays_unmatched():
    iou = torch.tensor([[0.0, 0.0, 0.0]])
    assert Matcher()(iou).tolist() == [BG, BG, BG]


def test_empty_image_is_all_background():
    matched = Matcher()(torch.zeros(0, 7))
    assert matched.dtype == torch.int64
    assert matched.tolist() == [BG] * 7
