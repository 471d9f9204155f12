import torch
import torch.nn.functional as F

from examples.retinanet.loss import BACKGROUND, IGNORE_INDEX, box_regression_loss, classification_loss


def direct_focal_loss(logits, classes, alpha, gamma):
    """Equation (5) of the paper, one element at a time in float64."""
    total = 0.0
    n, r, k = logits.shape
    for i in range(n):
        for j in range(r):
            if classes[i, j] == IGNORE_INDEX:
                continue
            for c in range(k):
                p = torch.sigmoid(logits[i, j, c].double()).item()
                positive = classes[i, j] == c
                p_t = p if positive else 1 - p
                alpha_t = alpha if positive else 1 - alpha
                total += -alpha_t * (1 - p_t) ** gamma * torch.log(torch.tensor(p_t)).item()
    return total


def _example():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 3, generator=g) * 2
    classes = torch.tensor([[0, 2, BACKGROUND, IGNORE_INDEX, BACKGROUND, 1, IGNORE_INDEX],
                            [BACKGROUND, BACKGROUND, 1, BACKGROUND, IGNORE_INDEX, BACKGROUND, BACKGROUND]])
    return logits, classes


def test_focal_loss_matches_direct_computation_for_every_impl():
    logits, classes = _example()
    normalizer = (classes >= 0).sum().clamp(min=1).float()
    for alpha, gamma in [(0.25, 2.0), (0.75, 0.0)]:
        expected = direct_focal_loss(logits, classes, alpha, gamma) / normalizer.item()
        for impl in ("focal", "reference", "torchvision"):
            got = classification_loss(logits, classes, normalizer, alpha, gamma, impl)
            assert got.dim() == 0
            assert abs(got.item() - expected) < 1e-4 * max(1.0, expected), (impl, alpha, gamma)


def test_focal_loss_gradients_agree_between_impls():
    logits, classes = _example()
    normalizer = torch.tensor(4.0)
    grads = []
    for impl in ("focal", "torchvision"):
        x = logits.clone().requires_grad_(True)
        classification_loss(x, classes, normalizer, 0.25, 2.0, impl).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    # ignored anchors receive no gradient
    assert torch.all(grads[0][classes == IGNORE_INDEX] == 0)


def test_box_loss_only_on_foreground_and_normalised():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    foreground = torch.tensor([[True, False, False, True, False], [False, False, True, False, False]])
    normalizer = torch.tensor(3.0)
    got = box_regression_loss(pred, target, foreground, normalizer, "smooth_l1", beta=0.11)
    expected = F.smooth_l1_loss(pred[foreground], target[foreground], beta=0.11, reduction="sum") / 3.0
    torch.testing.assert_close(got, expected)
    got_l1 = box_regression_loss(pred, target, foreground, normalizer, "l1")
    torch.testing.assert_close(got_l1, (pred[foreground] - target[foreground]).abs().sum() / 3.0)
    # background predictions may be anything, even non-finite, without touching the loss
    pred[~foreground] = float("nan")
    assert torch.isfinite(box_regression_loss(pred, target, foreground, normalizer, "smooth_l1"))


def test_giou_box_loss_is_zero_for_perfect_boxes():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]]])
    foreground = torch.tensor([[True, True]])
    zero = box_regression_loss(boxes, boxes, foreground, torch.tensor(2.0), "giou",
                               pred_boxes=boxes, gt_boxes=boxes)
    assert abs(zero.item()) < 1e-6
    shifted = boxes + torch.tensor([3.0, 0.0, 3.0, 0.0])
    assert box_regression_loss(boxes, boxes, foreground, torch.tensor(2.0), "giou",
                               pred_boxes=shifted, gt_boxes=boxes).item() > 0.1
