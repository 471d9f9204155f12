import torch

from examples.retinanet.box_coder import BoxCoder
from examples.retinanet.postprocess import detections_for_image


def _logit(p):
    return torch.logit(torch.tensor(p))


def test_threshold_nms_and_class_wise_suppression():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    logits = torch.full((3, 2), -10.0)
    logits[0, 0] = _logit(0.9)   # kept
    logits[1, 0] = _logit(0.8)   # same class, IoU 0.82 with anchor 0: suppressed
    logits[1, 1] = _logit(0.7)   # other class at the same place: kept (class-wise NMS)
    logits[2, 1] = _logit(0.04)  # below the 0.05 threshold
    out = detections_for_image([logits], [torch.zeros(3, 4)], [anchors], (100, 100), BoxCoder())
    assert out["labels"].tolist() == [0, 1]
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(out["boxes"], anchors[[0, 1]])


def test_topk_per_level_and_detection_cap():
    # 300 far-apart anchors per level so that NMS removes nothing.
    xs = torch.arange(300, dtype=torch.float32) * 20
    anchors = torch.stack([xs, torch.zeros(300), xs + 10, torch.full((300,), 10.0)], dim=1)
    scores = torch.linspace(0.1, 0.9, 300)
    logits = torch.logit(scores).unsqueeze(1)  # K = 1
    deltas = torch.zeros(300, 4)
    out = detections_for_image([logits, logits], [deltas, deltas], [anchors, anchors], (20, 10000), BoxCoder(),
                               topk=50, max_detections=1000, nms_threshold=0.5)
    # top 50 of each level survive; identical boxes across levels suppress each other
    assert len(out["scores"]) == 50
    torch.testing.assert_close(out["scores"], scores[-50:].flip(0))
    capped = detections_for_image([logits], [deltas], [anchors], (20, 10000), BoxCoder(), topk=1000,
                                  max_detections=100)
    assert len(capped["scores"]) == 100
    assert torch.all(capped["scores"][:-1] >= capped["scores"][1:])


def test_boxes_are_decoded_and_clipped():
    anchors = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    deltas = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # shift right by one anchor width
    out = detections_for_image([torch.tensor([[5.0]])], [deltas], [anchors], (40, 40), BoxCoder())
    torch.testing.assert_close(out["boxes"], torch.tensor([[30.0, 10.0, 40.0, 30.0]]))


def test_nothing_above_threshold_gives_empty_result():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = detections_for_image([torch.full((1, 3), -9.0)], [torch.zeros(1, 4)], [anchors], (10, 10), BoxCoder())
    assert out["boxes"].shape == (0, 4) and out["labels"].numel() == 0
