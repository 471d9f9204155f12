"""The README's recipes for mmdetection and detectron2, whose packages need compiled dependencies and
cannot be installed here: each framework's classification loss, stated with the tensors laid out as
that framework lays them out (its label conventions, one-hot expansion, masks and normaliser, on top
of torchvision's ``sigmoid_focal_loss``, which both frameworks' pure-PyTorch paths equal), against
the one ``focal`` call the recipe puts in its place.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss

import focal

NUM_CLASSES = 80


def _head_outputs(seed: int, levels=((2, 8, 8), (2, 4, 4), (2, 2, 2)), anchors=3, dtype=torch.float64):
    """Per-level classification maps (N, A * C, H, W) of a dense head."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, anchors * NUM_CLASSES, h, w, generator=g, dtype=dtype) * 3 for n, h, w in levels]


def _labels(count: int, seed: int, background: int, ignore: int | None):
    """Anchor labels: about 5 % positives, 10 % ignored (when the framework has an ignore label), the
    rest background."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.rand(count, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=g)
    labels = torch.where(kind < 0.95, torch.full_like(labels, background), labels)
    if ignore is not None:
        labels = torch.where(kind > 0.9, torch.full_like(labels, ignore), labels)
    return labels


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within 1e-10, relative to the largest value: torchvision's formula forms ``1 - p_t`` by
    cancellation, so its tiny gradients at saturated logits are less accurate than that elementwise."""
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.detach().abs().max()))


@pytest.mark.parametrize("seed", [0, 1])
def test_mmdetection_recipe(seed):
    """mmdetection's RetinaHead: scores flattened to (N * anchors, C); labels with background
    ``num_classes``; ``label_weights`` 0 for the anchors it ignores; FocalLoss's ``avg_factor`` (the
    number of positives), divided as ``sum / (avg_factor + eps)`` with float32's eps."""
    maps = _head_outputs(seed)
    scores = torch.cat([m.permute(0, 2, 3, 1).reshape(-1, NUM_CLASSES) for m in maps])
    labels = _labels(scores.shape[0], seed, background=NUM_CLASSES, ignore=None)
    label_weights = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed + 7)) > 0.1).double()
    avg_factor = float((labels < NUM_CLASSES).sum())
    eps = torch.finfo(torch.float32).eps

    logits = scores.clone().requires_grad_()
    one_hot = F.one_hot(labels, NUM_CLASSES + 1)[:, :NUM_CLASSES].to(logits.dtype)
    stock = torchvision_focal_loss(logits, one_hot, alpha=0.25, gamma=2.0, reduction="none")
    stock = (stock * label_weights[:, None]).sum() / (avg_factor + eps)
    (stock_grad,) = torch.autograd.grad(stock, logits)

    logits = scores.clone().requires_grad_()
    ours = focal.sigmoid_focal_loss(
        logits, labels, alpha=0.25, gamma=2.0, reduction="sum", weight=label_weights[:, None],
        normalizer=avg_factor + eps, background_index=NUM_CLASSES,
    )
    (our_grad,) = torch.autograd.grad(ours, logits)
    _close(ours, stock)
    _close(our_grad, stock_grad)


@pytest.mark.parametrize("seed", [0, 1])
def test_detectron2_recipe(seed):
    """detectron2's RetinaNet: logits (N, anchors, C) concatenated over levels; labels with
    background ``num_classes`` and -1 for ignored anchors; the valid anchors' one-hot targets, summed,
    divided by the moving average of the number of positives."""
    maps = _head_outputs(seed)
    n = maps[0].shape[0]
    pred = torch.cat([m.reshape(n, 3, NUM_CLASSES, *m.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(n, -1, NUM_CLASSES)
                      for m in maps], dim=1)
    labels = _labels(pred.shape[0] * pred.shape[1], seed, background=NUM_CLASSES, ignore=-1).reshape(pred.shape[:2])
    normalizer = 0.9 * 37.0 + 0.1 * max(float(((labels >= 0) & (labels != NUM_CLASSES)).sum()), 1.0)

    logits = pred.clone().requires_grad_()
    valid = labels >= 0
    one_hot = F.one_hot(labels[valid], NUM_CLASSES + 1)[:, :-1].to(logits.dtype)
    stock = torchvision_focal_loss(logits[valid], one_hot, alpha=0.25, gamma=2.0, reduction="sum") / normalizer
    (stock_grad,) = torch.autograd.grad(stock, logits)

    logits = pred.clone().requires_grad_()
    ours = focal.sigmoid_focal_loss(
        logits, labels, alpha=0.25, gamma=2.0, reduction="sum", normalizer=normalizer,
        background_index=NUM_CLASSES, ignore_index=-1,
    )
    (our_grad,) = torch.autograd.grad(ours, logits)
    _close(ours, stock)
    _close(our_grad, stock_grad)


def test_per_class_alpha_recipe_is_the_one_hot_formula():
    """A per-class alpha, as requested of mmdetection, kornia and ultralytics: ``alpha[c]`` for the
    positives of class c, ``1 - alpha[c]`` for its negatives, over the one-hot target."""
    maps = _head_outputs(3)
    scores = torch.cat([m.permute(0, 2, 3, 1).reshape(-1, NUM_CLASSES) for m in maps])
    labels = _labels(scores.shape[0], 3, background=NUM_CLASSES, ignore=None)
    alpha = torch.rand(NUM_CLASSES, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    logits = scores.clone().requires_grad_()
    t = F.one_hot(labels, NUM_CLASSES + 1)[:, :NUM_CLASSES].to(logits.dtype)
    stock = torchvision_focal_loss(logits, t, alpha=-1, gamma=2.0, reduction="none")
    stock = ((alpha * t + (1 - alpha) * (1 - t)) * stock).sum()
    (stock_grad,) = torch.autograd.grad(stock, logits)

    logits = scores.clone().requires_grad_()
    ours = focal.sigmoid_focal_loss(logits, labels, alpha=alpha, reduction="sum", background_index=NUM_CLASSES)
    (our_grad,) = torch.autograd.grad(ours, logits)
    _close(ours, stock)
    _close(our_grad, stock_grad)
