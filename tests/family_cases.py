"""The table the tests of the sigmoid focal loss family share (FL, FL*, QFL, VFL): each loss with its
reference, module, target forms and hyper-parameters, so that one test body covers the four fused ops.

The forms and hyper-parameters of a row are chosen by what selects a compiled kernel
(tests/instantiations.py): each target form the loss takes and each fast path of its exponent
(0, 1, 2 and the general power), not by values that run the same code.

Every target builder returns ``(targets, kwargs)`` on a device in float64 (the tests round to the
dtype under test): ``targets`` is what both the fused op and its reference take (a tensor, or the
pair ``(ids, scores)``), ``kwargs`` the keyword arguments the form needs (``ignore_index``,
``label_smoothing``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

import focal
from focal import reference

SHAPE = (2, 3, 4)  # (N, anchors, classes)
OWN_IGNORE = 1000  # an ignore_index of our own, above every class id the tests use


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(device, shape=SHAPE, seed=0, scale=3.0):
    return (torch.randn(shape, generator=generator(seed), dtype=torch.float64) * scale).to(device)


def class_ids(device, shape=SHAPE, ignore_index=-100, background_index=-1):
    """Ids covering every kind of row: each class, background and ignored, in turn."""
    pattern = torch.tensor(list(range(shape[-1])) + [background_index, ignore_index])
    rows = math.prod(shape[:-1])
    return pattern.repeat(rows // len(pattern) + 1)[:rows].reshape(shape[:-1]).to(device)


def _hard(device, shape, seed=1):
    return torch.randint(0, 2, shape, generator=generator(seed)).to(device, torch.float64)


def _soft(device, shape, seed=2):
    return torch.rand(shape, generator=generator(seed), dtype=torch.float64).to(device)


def _with_zeros(device, shape, seed=3):
    """Soft targets of which about half are exactly 0 and some exactly 1 (VFL's two branches)."""
    g = generator(seed)
    soft = torch.rand(shape, generator=g, dtype=torch.float64)
    kind = torch.randint(0, 4, shape, generator=g)
    soft = torch.where(kind < 2, torch.zeros_like(soft), soft)
    soft = torch.where(kind == 3, torch.ones_like(soft), soft)
    return soft.to(device)


def _pair(device, shape, ignore_index=-100, seed=4):
    """(ids, scores): every kind of row; a positive row whose score is exactly 0; the scores of
    background and ignored rows are NaN, since the loss must never read them."""
    ids = class_ids(device, shape[:-1] + (shape[-1],), ignore_index)
    scores = torch.rand(ids.shape, generator=generator(seed), dtype=torch.float64).to(device)
    scores = torch.where(ids < 0, torch.full_like(scores, math.nan), scores)
    if ids.numel() and (ids >= 0).any():
        first_positive = int(torch.nonzero((ids >= 0).reshape(-1))[0])
        scores.view(-1)[first_positive] = 0.0
    return ids, scores


# name -> builder(device, shape) -> (targets, kwargs)
HARD_TARGETS = {  # the focal loss's and FL*'s: float targets, class ids, either with label smoothing
    "hard": lambda d, s: (_hard(d, s), {}),
    "soft": lambda d, s: (_soft(d, s), {}),
    "ids": lambda d, s: (class_ids(d, s), {}),
    "ids-own-ignore": lambda d, s: (class_ids(d, s, OWN_IGNORE), {"ignore_index": OWN_IGNORE}),
    "hard-smoothed": lambda d, s: (_hard(d, s), {"label_smoothing": 0.125}),
    "ids-smoothed": lambda d, s: (class_ids(d, s), {"label_smoothing": 0.25}),
}
QUALITY_TARGETS = {
    "dense": lambda d, s: (_soft(d, s), {}),
    "dense-zeros": lambda d, s: (_with_zeros(d, s), {}),
    "pair": lambda d, s: (_pair(d, s), {}),
    "pair-own-ignore": lambda d, s: (_pair(d, s, OWN_IGNORE), {"ignore_index": OWN_IGNORE}),
}


@dataclass(frozen=True)
class Loss:
    """One loss of the family as the tests see it."""

    name: str
    fused: Callable
    reference: Callable
    module: type
    targets: dict  # form name -> builder
    ids_form: str  # the form of class ids (with scores for the quality losses): detection's
    dense_form: str  # a form of soft float targets
    # Keyword arguments: the paper's, BCE-equivalent, the fast paths (0, 1, 2) and the general path;
    # the first three (the paper's, a second fast path, a general one) are the costlier tests' subset.
    hypers: list
    default: dict  # hyper-parameters used where the test is not about them

    def __str__(self) -> str:
        return self.name


FOCAL = Loss(
    "focal", focal.sigmoid_focal_loss, reference.sigmoid_focal_loss, focal.SigmoidFocalLoss, HARD_TARGETS,
    "ids", "soft",
    [dict(alpha=0.25, gamma=2.0), dict(alpha=None, gamma=0.0), dict(alpha=0.75, gamma=3.0),
     dict(alpha=0.0, gamma=1.0), dict(alpha=1.0, gamma=0.5)],
    dict(alpha=0.25, gamma=2.0),
)
# FL*'s gamma is a plain factor, compiled once for every value: its hyper-parameters vary beta and alpha.
STAR = Loss(
    "star", focal.sigmoid_focal_loss_star, reference.sigmoid_focal_loss_star, focal.SigmoidFocalLossStar,
    HARD_TARGETS, "ids", "soft",
    [dict(gamma=2.0, beta=1.0), dict(gamma=4.0, beta=0.0), dict(gamma=0.5, beta=-1.5, alpha=0.75),
     dict(gamma=1.5, beta=0.5, alpha=0.0)],
    dict(gamma=2.0, beta=1.0, alpha=0.25),
)
QFL = Loss(
    "qfl", focal.quality_focal_loss, reference.quality_focal_loss, focal.QualityFocalLoss, QUALITY_TARGETS,
    "pair", "dense-zeros",
    [dict(beta=2.0), dict(beta=0.0), dict(beta=3.0), dict(beta=1.0), dict(beta=0.5)],
    dict(beta=2.0),
)
VFL = Loss(
    "vfl", focal.varifocal_loss, reference.varifocal_loss, focal.VarifocalLoss, QUALITY_TARGETS,
    "pair", "dense-zeros",
    [dict(alpha=0.75, gamma=2.0), dict(alpha=0.75, gamma=0.0), dict(alpha=0.25, gamma=1.5),
     dict(alpha=0.5, gamma=1.0), dict(alpha=0.0, gamma=0.5)],
    dict(alpha=0.75, gamma=2.0),
)
LOSSES = [FOCAL, STAR, QFL, VFL]

# (loss, target form) over the whole table, with readable test ids.
LOSS_FORMS = [(loss, form) for loss in LOSSES for form in loss.targets]
LOSS_FORM_IDS = [f"{loss}-{form}" for loss, form in LOSS_FORMS]


def build_targets(loss: Loss, form: str, device, shape=SHAPE):
    return loss.targets[form](device, shape)


def cast_targets(targets, dtype):
    """Float parts of the targets in ``dtype`` (ids untouched)."""
    if isinstance(targets, tuple):
        ids, scores = targets
        return ids, scores.to(dtype)
    return targets.to(dtype) if targets.is_floating_point() else targets


def loss_and_grad(fn, x, targets, upstream=None, **kwargs):
    """The loss and d(sum(upstream * loss))/dx; a random upstream for "none" checks every element."""
    x = x.detach().clone().requires_grad_()
    loss = fn(x, targets, **kwargs)
    if x.numel() == 0:
        return loss.detach(), torch.zeros_like(x)
    scalar = loss.sum() if upstream is None or loss.dim() == 0 else (loss * upstream.to(loss.dtype)).sum()
    (grad,) = torch.autograd.grad(scalar, x)
    return loss.detach(), grad


def upstream_for(x, seed=9):
    """A different upstream gradient per element, powers of two so that scaling by it is exact in any
    dtype (the 16-bit gradient is then still rounded once)."""
    exponents = torch.randint(-1, 3, x.shape, generator=generator(seed))
    return (2.0 ** exponents.double()).to(x.device)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, what: str = "") -> None:
    """|got - want| <= atol + rtol |want| elementwise in float64, NaN matching NaN only; shapes equal.

    torch.testing.assert_close does the same at about a hundred times the cost, which the few
    thousand comparisons of these tests would feel."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double(), want.double()
    both_nan = torch.isnan(got) & torch.isnan(want)
    same_inf = torch.isinf(want) & (got == want)
    ok = ((got - want).abs() <= atol + rtol * want.abs()) | both_nan | same_inf
    if not bool(ok.all()):
        i = tuple(torch.nonzero(~ok)[0].tolist())
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ, first at {i}: got {got[i].item()!r}, "
            f"want {want[i].item()!r} (rtol={rtol}, atol={atol})"
        )
