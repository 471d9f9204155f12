import math

import torch

from examples.retinanet.box_coder import BoxCoder


def _random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 100
    wh = torch.rand(n, 2, generator=generator) * 50 + 2
    return torch.cat([xy, xy + wh], dim=1)


def test_round_trip():
    g = torch.Generator().manual_seed(0)
    anchors, boxes = _random_boxes(64, g), _random_boxes(64, g)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights)
        deltas = coder.encode(boxes, anchors)
        torch.testing.assert_close(coder.decode(deltas, anchors), boxes, rtol=1e-5, atol=1e-3)


def test_identity_and_known_values():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    torch.testing.assert_close(coder.encode(anchor, anchor), torch.zeros(1, 4))
    box = torch.tensor([[5.0, 0.0, 15.0, 40.0]])  # shifted right by w/2, twice as tall, centre down h/2
    torch.testing.assert_close(coder.encode(box, anchor), torch.tensor([[0.5, 0.5, 0.0, math.log(2.0)]]))


def test_decode_clamps_huge_scales_and_broadcasts():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[[0.0, 0.0, 100.0, 100.0]]])  # (N=1, R=1, 4)
    boxes = coder.decode(deltas, anchors)
    assert boxes.shape == (1, 1, 4)
    assert torch.isfinite(boxes).all()
    torch.testing.assert_close(boxes[0, 0, 2] - boxes[0, 0, 0], torch.tensor(1000.0))
