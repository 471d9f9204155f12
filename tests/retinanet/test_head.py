import math

import torch

from examples.retinanet.head import RetinaNetHead, permute_to_N_HWA_K


def test_prior_bias_and_gaussian_init():
    head = RetinaNetHead(in_channels=32, num_anchors=9, num_classes=10, width=32, prior_prob=0.01)
    torch.testing.assert_close(head.cls_score.bias, torch.full((90,), -math.log(99.0)))
    assert torch.all(head.bbox_pred.bias == 0)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 + 4 + 2
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.std().item() - 0.01) < 0.001 and abs(weights.mean().item()) < 0.001
    for conv in convs:
        if conv is not head.cls_score:
            assert torch.all(conv.bias == 0)


def test_initial_probability_is_prior():
    head = RetinaNetHead(in_channels=16, num_anchors=9, num_classes=3, width=16)
    logits, _ = head([torch.randn(2, 16, 4, 4)])
    probs = torch.sigmoid(logits)
    assert abs(probs.mean().item() - 0.01) < 0.002


def test_no_prior_keeps_zero_bias():
    head = RetinaNetHead(in_channels=8, num_anchors=9, num_classes=3, width=8, prior_prob=0.0)
    assert torch.all(head.cls_score.bias == 0)


def test_output_shapes_group_norm_and_separate_towers():
    head = RetinaNetHead(in_channels=16, num_anchors=9, num_classes=5, width=16, norm="gn")
    features = [torch.randn(2, 16, 6, 7), torch.randn(2, 16, 3, 4)]
    logits, deltas = head(features)
    total = (6 * 7 + 3 * 4) * 9
    assert logits.shape == (2, total, 5) and deltas.shape == (2, total, 4)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in head.cls_subnet)
    cls_params = {id(p) for p in head.cls_subnet.parameters()}
    assert not cls_params & {id(p) for p in head.box_subnet.parameters()}


def test_permute_to_N_HWA_K_layout():
    n, a, k, h, w = 2, 3, 4, 2, 5
    x = torch.arange(n * a * k * h * w, dtype=torch.float32).view(n, a * k, h, w)
    out = permute_to_N_HWA_K(x, k)
    assert out.shape == (n, h * w * a, k)
    # element (image 1, y=1, x=3, anchor 2, class 0) comes from channel 2*k + 0 at (1, 3)
    torch.testing.assert_close(out[1, (1 * w + 3) * a + 2, 0], x[1, 2 * k, 1, 3])
