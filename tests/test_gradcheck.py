"""The fused op against the math: float64 gradcheck, and values and gradients against the reference.

`torch.autograd.gradcheck` compares the op's analytic gradient (computed in the forward pass and
scaled in backward) with finite differences of its own forward. The same configurations are then
compared directly with `focal.reference`: its autograd gradient (any target) and the paper's
Appendix B derivative `reference.sigmoid_focal_loss_grad` (hard targets).
"""

from __future__ import annotations

import pytest
import torch

import focal
from focal import reference

SHAPE = (2, 3, 4)  # (N, anchors, classes): rows are the leading dimensions
IGNORE = -100


def _logits(device, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(device)


def _hard(device, shape=SHAPE, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=g).to(device, torch.float64)


def _soft(device, shape=SHAPE, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(device)


def _ids(device, shape=SHAPE, ignore_index=IGNORE):
    """Class ids covering every kind of row: each class, background (-1) and ignored."""
    classes = shape[-1]
    pattern = torch.tensor(list(range(classes)) + [-1, ignore_index])
    rows = torch.tensor(shape[:-1]).prod().item()
    return pattern.repeat(rows // len(pattern) + 1)[:rows].reshape(shape[:-1]).to(device)


# name -> (targets builder, extra keyword arguments builder); all on `device`.
CASES = {
    "float-hard": (_hard, lambda d: {}),
    "float-soft": (_soft, lambda d: {}),
    "class-ids": (_ids, lambda d: {}),
    "class-ids-own-ignore-index": (
        lambda d: _ids(d, ignore_index=7),
        lambda d: {"ignore_index": 7},
    ),
    "weight-per-class": (
        _ids,
        lambda d: {"weight": torch.tensor([0.5, 2.0, 0.0, 1.5], dtype=torch.float64, device=d)},
    ),
    "weight-per-row": (_hard, lambda d: {"weight": _soft(d, SHAPE[:-1] + (1,), seed=3) * 2}),
    "weight-full": (_soft, lambda d: {"weight": _soft(d, seed=4) * 2}),
    "weight-full-hard": (_hard, lambda d: {"weight": _soft(d, seed=6) * 3}),
    "weight-broadcast-middle": (_ids, lambda d: {"weight": _soft(d, (1, 3, 1), seed=5) + 0.5}),
    "weight-broadcast-batch": (_soft, lambda d: {"weight": _soft(d, (2, 1, 4), seed=7) * 2}),
    "weight-scalar": (_ids, lambda d: {"weight": torch.tensor(1.5, dtype=torch.float64, device=d)}),
    "normalizer-float": (_ids, lambda d: {"normalizer": 3.0}),
    "normalizer-tensor": (_hard, lambda d: {"normalizer": torch.tensor(5.0, dtype=torch.float64, device=d)}),
    "normalizer-int-tensor": (_ids, lambda d: {"normalizer": torch.tensor(4, device=d)}),
    "normalizer-cpu-tensor": (_soft, lambda d: {"normalizer": torch.tensor([2.5])}),
    # Smoothing values exact in binary; test_float64_keeps_hyperparameters_exact covers the others.
    "label-smoothing-float": (_hard, lambda d: {"label_smoothing": 0.125}),
    "label-smoothing-soft": (_soft, lambda d: {"label_smoothing": 0.375}),
    "label-smoothing-ids": (_ids, lambda d: {"label_smoothing": 0.25}),
    "label-smoothing-one": (_ids, lambda d: {"label_smoothing": 1.0}),
}
REDUCTIONS = ["none", "sum", "mean"]
HYPER = [  # (alpha, gamma): the fast paths 0, 1, 2 and the general pow, with and without alpha
    (0.25, 2.0),
    (None, 0.0),
    (-1, 1.0),
    (0.0, 0.5),
    (1.0, 1.5),
    (0.75, 3.0),
    (0.5, 0.25),
]

# Binary targets, for which the Appendix B derivative applies.
HARD_CASES = {
    name for name, (make_targets, _) in CASES.items() if make_targets is not _soft and "smoothing" not in name
}

# A normalizer is refused with "mean" (tested in test_errors), so those pairs are not generated.
CASE_REDUCTIONS = [
    (name, reduction)
    for name in CASES
    for reduction in REDUCTIONS
    if not (name.startswith("normalizer") and reduction == "mean")
]


def _config(name, device):
    make_targets, make_kwargs = CASES[name]
    return make_targets(device), make_kwargs(device)


@pytest.mark.parametrize("name,reduction", CASE_REDUCTIONS)
def test_gradcheck(device, name, reduction):
    targets, kwargs = _config(name, device)
    x = _logits(device).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: focal.sigmoid_focal_loss(x, targets, reduction=reduction, **kwargs), (x,)
    )


@pytest.mark.parametrize("alpha,gamma", HYPER)
@pytest.mark.parametrize("name", ["float-hard", "float-soft", "class-ids", "label-smoothing-ids"])
def test_gradcheck_alpha_gamma(device, name, alpha, gamma):
    targets, kwargs = _config(name, device)
    x = _logits(device).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: focal.sigmoid_focal_loss(x, targets, alpha, gamma, "sum", **kwargs), (x,)
    )


def _forward_backward(fn, x, targets, reduction, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, targets, reduction=reduction, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


@pytest.mark.parametrize("alpha,gamma", HYPER)
@pytest.mark.parametrize("name,reduction", CASE_REDUCTIONS)
def test_matches_reference(device, name, reduction, alpha, gamma):
    targets, kwargs = _config(name, device)
    x = _logits(device)
    kwargs.update(alpha=alpha, gamma=gamma)
    loss, grad = _forward_backward(focal.sigmoid_focal_loss, x, targets, reduction, **kwargs)
    ref_loss, ref_grad = _forward_backward(reference.sigmoid_focal_loss, x, targets, reduction, **kwargs)
    assert loss.dtype == ref_loss.dtype == torch.float64
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-13)

    if name in HARD_CASES:
        # Hard targets: the paper's closed form (Appendix B) gives the same gradient.
        appendix_b = reference.sigmoid_focal_loss_grad(x, targets, reduction=reduction, **kwargs)
        torch.testing.assert_close(grad, appendix_b, rtol=1e-9, atol=1e-13)


def test_appendix_b_by_hand():
    # x = 0, positive, alpha = .25, gamma = 2: p_t = 1/2, so
    # dFL/dx = alpha * y * (1 - p_t)^2 * (gamma p_t log p_t + p_t - 1) = .25 * .25 * (-log 2 - .5).
    x = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    loss = focal.sigmoid_focal_loss(x, torch.ones(1, 1, dtype=torch.float64), reduction="sum")
    loss.backward()
    expected = 0.25 * 0.25 * (-torch.log(torch.tensor(2.0, dtype=torch.float64)) - 0.5)
    torch.testing.assert_close(x.grad, expected.reshape(1, 1), rtol=1e-14, atol=0)
    # and FL = alpha (1 - p_t)^2 log 2 = .25 * .25 * log 2
    torch.testing.assert_close(loss.detach(), 0.0625 * torch.log(torch.tensor(2.0, dtype=torch.float64)))


@pytest.mark.parametrize(
    "alpha,gamma,label_smoothing",
    [(0.3, 2.0, 0.0), (0.25, 2.3, 0.0), (0.25, 0.7, 0.0), (0.25, 2.0, 0.1), (0.1, 1.1, 0.05)],
)
@pytest.mark.parametrize("target_kind", ["float", "ids"])
def test_float64_keeps_hyperparameters_exact(device, target_kind, alpha, gamma, label_smoothing):
    """float64 logits get float64 results: alpha, gamma and eps are not rounded to float32 on the way.

    Rounding 0.3 to float32 changes it by ~1e-8 relative, far more than float64 math may lose.
    """
    x = _logits(device)
    targets = _hard(device) if target_kind == "float" else _ids(device)
    kwargs = dict(alpha=alpha, gamma=gamma, label_smoothing=label_smoothing)
    loss, grad = _forward_backward(focal.sigmoid_focal_loss, x, targets, "none", **kwargs)
    ref_loss, ref_grad = _forward_backward(reference.sigmoid_focal_loss, x, targets, "none", **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-13)
