"""The references of the focal-loss family (softmax focal loss, FL*, QFL, VFL) against independent statements.

Every check compares `focal.reference` with something computed another way: `F.cross_entropy` and
`F.binary_cross_entropy_with_logits`, the papers' formulas written with `torch.log` of probabilities,
a row-by-row loop in Python floats, Appendix B's derivative of FL*, the other target form of the same
loss, or finite differences (gradcheck). All in float64 on the CPU; no compiled kernel is needed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from focal import reference

DTYPE = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loss_and_grad(fn, x, *args, upstream=None, **kwargs):
    """The loss and d(sum(upstream * loss))/dx: a random upstream gradient for "none" tests every element."""
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    scalar = loss.sum() if upstream is None else (loss * upstream).sum()
    (grad,) = torch.autograd.grad(scalar, x)
    return loss.detach(), grad


def _assert_same_loss_and_grad(fn_a, fn_b, x, upstream=None):
    loss_a, grad_a = _loss_and_grad(fn_a, x, upstream=upstream)
    loss_b, grad_b = _loss_and_grad(fn_b, x, upstream=upstream)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Softmax focal loss


def _softmax_problem(shape, ignore, seed=0):
    """Logits of `shape` (class dim 1, or 0 when unbatched), class-id targets, and the ignore_index used."""
    g = _generator(seed)
    num_classes = shape[1] if len(shape) > 1 else shape[0]
    target_shape = (shape[0],) + tuple(shape[2:]) if len(shape) > 1 else ()
    x = torch.randn(shape, generator=g, dtype=DTYPE) * 3
    target = torch.randint(0, num_classes, target_shape, generator=g)
    ignore_index = -100
    if ignore == "hit":  # the default ignore_index, on about a third of the elements
        target = torch.where(torch.rand(target_shape, generator=g) < 1 / 3, -100, target)
    elif ignore == "class":  # an ignore_index inside [0, C): that class is ignored
        ignore_index = 1
        target.view(-1)[0] = 1
    return x, target, ignore_index


SOFTMAX_SHAPES = {"N,C": (6, 5), "N,C,d1,d2": (3, 4, 2, 3)}


def _assert_softmax_at_gamma_0_is_cross_entropy(x, target, with_weight, ignore_index, label_smoothing, reduction):
    num_classes = x.shape[1] if x.dim() > 1 else x.shape[0]
    weight = torch.rand(num_classes, generator=_generator(1), dtype=DTYPE) + 0.1 if with_weight else None
    kwargs = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    upstream = torch.rand(target.shape, generator=_generator(2), dtype=DTYPE) if reduction == "none" else None
    _assert_same_loss_and_grad(
        lambda x: reference.softmax_focal_loss(x, target, alpha=None, gamma=0.0, **kwargs),
        lambda x: F.cross_entropy(x, target, **kwargs),
        x,
        upstream,
    )


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES.values(), ids=SOFTMAX_SHAPES.keys())
@pytest.mark.parametrize("with_weight", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("ignore", ["miss", "hit", "class"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_softmax_at_gamma_0_is_cross_entropy(shape, with_weight, ignore, label_smoothing, reduction):
    x, target, ignore_index = _softmax_problem(shape, ignore)
    _assert_softmax_at_gamma_0_is_cross_entropy(x, target, with_weight, ignore_index, label_smoothing, reduction)


@pytest.mark.parametrize("with_weight", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_softmax_unbatched_at_gamma_0_is_cross_entropy(with_weight, label_smoothing, reduction):
    """Input (C,) with a 0-dim target, as cross_entropy takes it (ignoring its one element is the
    all-ignored case, tested below)."""
    x, target, ignore_index = _softmax_problem((5,), "miss")
    _assert_softmax_at_gamma_0_is_cross_entropy(x, target, with_weight, ignore_index, label_smoothing, reduction)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 5),
    num_classes=st.integers(1, 6),
    extra_dims=st.lists(st.integers(1, 3), max_size=2),
    with_weight=st.booleans(),
    ignored_fraction=st.sampled_from([0.0, 0.5]),
    label_smoothing=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    reduction=st.sampled_from(["none", "sum", "mean"]),
    seed=st.integers(0, 2**16),
)
def test_softmax_at_gamma_0_is_cross_entropy_property(
    batch, num_classes, extra_dims, with_weight, ignored_fraction, label_smoothing, reduction, seed
):
    g = _generator(seed)
    shape = (batch, num_classes, *extra_dims)
    target_shape = (batch, *extra_dims)
    x = torch.randn(shape, generator=g, dtype=DTYPE) * 4
    target = torch.randint(0, num_classes, target_shape, generator=g)
    ignored = torch.rand(target_shape, generator=g) < ignored_fraction
    ignored.view(-1)[0] = False  # at least one kept element: the all-ignored mean is the one documented difference
    target = torch.where(ignored, -100, target)
    weight = torch.rand(num_classes, generator=g, dtype=DTYPE) + 0.05 if with_weight else None
    kwargs = dict(weight=weight, label_smoothing=label_smoothing, reduction=reduction)
    upstream = torch.rand(target_shape, generator=g, dtype=DTYPE) if reduction == "none" else None
    _assert_same_loss_and_grad(
        lambda x: reference.softmax_focal_loss(x, target, gamma=0.0, **kwargs),
        lambda x: F.cross_entropy(x, target, **kwargs),
        x,
        upstream,
    )


def test_softmax_mean_over_all_ignored_elements_is_zero():
    """The one documented difference from cross_entropy (NaN there): 0, with a zero gradient."""
    x = torch.randn(3, 4, dtype=DTYPE, requires_grad=True)
    target = torch.full((3,), -100)
    for weight in (None, torch.rand(4, dtype=DTYPE)):
        loss = reference.softmax_focal_loss(x, target, weight=weight, label_smoothing=0.1)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.equal(grad, torch.zeros_like(x))
    empty = reference.softmax_focal_loss(torch.randn(0, 4, dtype=DTYPE), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0


def _softmax_focal_by_rows(x, target, alpha, gamma, weight, ignore_index, label_smoothing, reduction):
    """The softmax focal loss one position at a time in Python floats, from its definition."""
    num_classes = x.shape[1]
    rows = x.movedim(1, -1).reshape(-1, num_classes).tolist()
    ids = target.reshape(-1).tolist()
    alphas = alpha.tolist() if isinstance(alpha, torch.Tensor) else [1.0 if alpha is None else alpha] * num_classes
    weights = [1.0] * num_classes if weight is None else weight.tolist()
    losses, denominator = [], 0.0
    for row, y in zip(rows, ids):
        if y == ignore_index:
            losses.append(0.0)
            continue
        top = max(row)
        log_sum = top + math.log(sum(math.exp(v - top) for v in row))
        total = 0.0
        for c, v in enumerate(row):
            log_p = v - log_sum
            q = (1 - label_smoothing) * (c == y) + label_smoothing / num_classes
            total -= q * weights[c] * alphas[c] * (1 - math.exp(log_p)) ** gamma * log_p
        losses.append(total)
        denominator += weights[y]
    loss = torch.tensor(losses, dtype=DTYPE).reshape(target.shape)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / denominator


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.7])
@pytest.mark.parametrize("alpha", ["none", "number", "per-class"])
@pytest.mark.parametrize("shape", [(7, 4), (2, 3, 4)], ids=["N,C", "N,C,d1"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_softmax_matches_a_loop_over_rows(gamma, alpha, shape, reduction):
    x, target, ignore_index = _softmax_problem(shape, "hit", seed=3)
    num_classes = shape[1]
    alpha_value = {"none": None, "number": 0.25, "per-class": torch.linspace(0.1, 0.9, num_classes, dtype=DTYPE)}
    weight = torch.rand(num_classes, generator=_generator(4), dtype=DTYPE) + 0.1
    for label_smoothing in (0.0, 0.15):
        for w in (None, weight):
            args = (alpha_value[alpha], gamma)
            kwargs = dict(weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing)
            loss = reference.softmax_focal_loss(x, target, *args, reduction, **kwargs)
            expected = _softmax_focal_by_rows(x, target, *args, w, ignore_index, label_smoothing, reduction)
            torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_softmax_alpha_scales_without_entering_the_mean():
    x, target, _ = _softmax_problem((6, 3), "hit", seed=5)
    alpha = torch.tensor([0.2, 0.5, 0.8], dtype=DTYPE)
    plain = reference.softmax_focal_loss(x, target, None, 2.0, "none")
    kept = target != -100
    safe = torch.where(kept, target, 0)
    torch.testing.assert_close(reference.softmax_focal_loss(x, target, alpha, 2.0, "none"), alpha[safe] * plain)
    torch.testing.assert_close(reference.softmax_focal_loss(x, target, 0.25, 2.0, "none"), 0.25 * plain)
    torch.testing.assert_close(
        reference.softmax_focal_loss(x, target, alpha, 2.0, "mean"), (alpha[safe] * plain).sum() / kept.sum()
    )


def test_softmax_normalizer_divides_the_loss():
    x, target, _ = _softmax_problem((5, 4), "hit", seed=6)
    total = reference.softmax_focal_loss(x, target, reduction="sum")
    for normalizer in (2.5, torch.tensor(2.5, dtype=DTYPE), torch.tensor([2.5])):
        torch.testing.assert_close(
            reference.softmax_focal_loss(x, target, reduction="sum", normalizer=normalizer), total / 2.5
        )


def test_softmax_rejects_float_targets():
    with pytest.raises(ValueError, match="integer class ids"):
        reference.softmax_focal_loss(torch.randn(3, 4), torch.rand(3, 4))


# --------------------------------------------------------------------------------------------------
# FL* (Appendix A)


def _binary_problem(shape=(6, 4), seed=0, scale=3.0):
    g = _generator(seed)
    x = torch.randn(shape, generator=g, dtype=DTYPE) * scale
    hard = torch.randint(0, 2, shape, generator=g).to(DTYPE)
    soft = torch.rand(shape, generator=g, dtype=DTYPE)
    ids = torch.randint(-1, shape[-1], shape[:-1], generator=g)
    ids.view(-1)[0] = -100
    ids.view(-1)[1] = -1
    return x, hard, soft, ids


PAPER_AND_OTHER_STAR_SETTINGS = [(2.0, 1.0), (4.0, 0.0), (1.0, 0.0), (0.5, -1.5)]


@pytest.mark.parametrize("gamma, beta", PAPER_AND_OTHER_STAR_SETTINGS)
def test_star_is_appendix_a(gamma, beta):
    x, hard, _, _ = _binary_problem()
    y = 2 * hard - 1
    expected = -torch.log(torch.sigmoid(gamma * y * x + beta)) / gamma
    torch.testing.assert_close(reference.sigmoid_focal_loss_star(x, hard, gamma, beta), expected)


@pytest.mark.parametrize("gamma, beta", PAPER_AND_OTHER_STAR_SETTINGS)
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_star_derivative_is_appendix_b(gamma, beta, alpha):
    """dFL*/dx = y (p*_t - 1), p*_t = sigmoid(gamma x_t + beta), y in {-1, +1}; times alpha_t."""
    x, hard, _, _ = _binary_problem(seed=1)
    _, grad = _loss_and_grad(reference.sigmoid_focal_loss_star, x, hard, gamma, beta, alpha)
    y = 2 * hard - 1
    appendix_b = y * (torch.sigmoid(gamma * y * x + beta) - 1)
    alpha_t = 1.0 if alpha is None else alpha * hard + (1 - alpha) * (1 - hard)
    torch.testing.assert_close(grad, alpha_t * appendix_b)


def test_star_soft_targets_mix_the_hard_cases_and_give_bce_at_gamma_1_beta_0():
    x, _, soft, _ = _binary_problem(seed=2)
    ones, zeros = torch.ones_like(soft), torch.zeros_like(soft)
    star = reference.sigmoid_focal_loss_star
    torch.testing.assert_close(
        star(x, soft, 2.0, 1.0), soft * star(x, ones, 2.0, 1.0) + (1 - soft) * star(x, zeros, 2.0, 1.0)
    )
    _assert_same_loss_and_grad(
        lambda x: star(x, soft, 1.0, 0.0),
        lambda x: F.binary_cross_entropy_with_logits(x, soft, reduction="none"),
        x,
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_star_class_ids_equal_one_hot_targets(reduction):
    x, _, _, ids = _binary_problem(seed=3)
    kept = ids != -100
    one_hot = F.one_hot(ids.clamp(min=0), x.shape[-1]).to(DTYPE) * (ids >= 0).unsqueeze(-1)
    weight = torch.rand(x.shape[-1], generator=_generator(4), dtype=DTYPE)
    row_keep = kept.unsqueeze(-1).to(DTYPE)
    kwargs = dict(alpha=0.25, weight=weight, label_smoothing=0.1)
    by_ids, grad_ids = _loss_and_grad(reference.sigmoid_focal_loss_star, x, ids, reduction=reduction, **kwargs)
    by_floats, grad_floats = _loss_and_grad(
        reference.sigmoid_focal_loss_star, x, one_hot, reduction="none", **{**kwargs, "weight": weight * row_keep}
    )
    denominator = kept.sum() * x.shape[-1]
    expected = {"none": by_floats, "sum": by_floats.sum(), "mean": by_floats.sum() / denominator}[reduction]
    torch.testing.assert_close(by_ids, expected)
    torch.testing.assert_close(grad_ids, grad_floats / (denominator if reduction == "mean" else 1))
    assert torch.equal(grad_ids[~kept], torch.zeros_like(grad_ids[~kept]))


def test_star_alpha_and_label_smoothing_follow_the_sigmoid_focal_loss():
    x, hard, _, _ = _binary_problem(seed=5)
    star = reference.sigmoid_focal_loss_star
    alpha_t = 0.25 * hard + 0.75 * (1 - hard)
    torch.testing.assert_close(star(x, hard, alpha=0.25), alpha_t * star(x, hard))
    torch.testing.assert_close(star(x, hard, alpha=-1), star(x, hard))
    torch.testing.assert_close(star(x, hard, label_smoothing=0.2), star(x, hard * 0.8 + 0.1))


def test_star_rejects_gamma_zero():
    with pytest.raises(ValueError, match="gamma"):
        reference.sigmoid_focal_loss_star(torch.randn(2, 3), torch.rand(2, 3), gamma=0.0)


# --------------------------------------------------------------------------------------------------
# QFL and VFL


def _quality_problem(shape=(8, 5), seed=0):
    """Logits, the pair (ids, scores) with background, ignored rows and NaN scores where they must not
    be read, the dense targets they stand for, and the rows that are kept."""
    g = _generator(seed)
    x = torch.randn(shape, generator=g, dtype=DTYPE) * 3
    ids = torch.randint(-1, shape[-1], shape[:-1], generator=g)
    ids.view(-1)[:3] = torch.tensor([-1, -100, 0])
    scores = torch.rand(shape[:-1], generator=g, dtype=DTYPE)
    kept = ids != -100
    dense = F.one_hot(ids.clamp(min=0), shape[-1]).to(DTYPE) * scores.unsqueeze(-1) * (ids >= 0).unsqueeze(-1)
    scores = torch.where(ids >= 0, scores, torch.nan)
    return x, (ids, scores), dense, kept


QUALITY_LOSSES = {
    "qfl": lambda x, t, **kw: reference.quality_focal_loss(x, t, 2.0, **kw),
    "qfl-beta-0.7": lambda x, t, **kw: reference.quality_focal_loss(x, t, 0.7, **kw),
    "vfl": lambda x, t, **kw: reference.varifocal_loss(x, t, 0.75, 2.0, **kw),
    "vfl-gamma-1.5": lambda x, t, **kw: reference.varifocal_loss(x, t, 0.5, 1.5, **kw),
}


@pytest.mark.parametrize("loss_fn", QUALITY_LOSSES.values(), ids=QUALITY_LOSSES.keys())
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape", [(8, 5), (2, 4, 3)])
def test_quality_pair_targets_equal_dense_targets(loss_fn, reduction, shape):
    x, pair, dense, kept = _quality_problem(shape, seed=1)
    weight = torch.rand(shape[-1], generator=_generator(2), dtype=DTYPE)
    row_keep = kept.unsqueeze(-1).to(DTYPE)
    by_pair, grad_pair = _loss_and_grad(loss_fn, x, pair, reduction=reduction, weight=weight)
    by_dense, grad_dense = _loss_and_grad(loss_fn, x, dense, reduction="none", weight=weight * row_keep)
    denominator = kept.sum() * shape[-1]
    expected = {"none": by_dense, "sum": by_dense.sum(), "mean": by_dense.sum() / denominator}[reduction]
    assert torch.isfinite(by_pair).all()  # the NaN scores of background and ignored rows are not read
    torch.testing.assert_close(by_pair, expected)
    torch.testing.assert_close(grad_pair, grad_dense / (denominator if reduction == "mean" else 1))
    assert torch.equal(grad_pair[~kept], torch.zeros_like(grad_pair[~kept]))


@pytest.mark.parametrize("loss_fn", QUALITY_LOSSES.values(), ids=QUALITY_LOSSES.keys())
def test_quality_mean_follows_the_sigmoid_focal_loss(loss_fn):
    x, (ids, scores), dense, _ = _quality_problem(seed=3)
    all_ignored = (torch.full_like(ids, -100), scores)
    assert loss_fn(x, all_ignored, reduction="mean").item() == 0.0
    torch.testing.assert_close(loss_fn(x, dense, reduction="mean"), loss_fn(x, dense).mean())
    assert torch.isnan(loss_fn(x[:0], dense[:0], reduction="mean"))  # as torch.mean of nothing


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 3.0])
def test_qfl_is_the_gfl_formula(beta):
    x, _, y, _ = _quality_problem(seed=4)
    y = torch.where(y == 0, torch.rand(y.shape, generator=_generator(5), dtype=DTYPE) * 0.2, y)  # no exact 0
    sigma = torch.sigmoid(x)
    expected = -((y - sigma).abs() ** beta) * ((1 - y) * torch.log(1 - sigma) + y * torch.log(sigma))
    torch.testing.assert_close(reference.quality_focal_loss(x, y, beta), expected)


def test_qfl_at_beta_0_is_bce_with_soft_targets():
    x, _, y, _ = _quality_problem(seed=6)
    _assert_same_loss_and_grad(
        lambda x: reference.quality_focal_loss(x, y, beta=0.0, reduction="mean"),
        lambda x: F.binary_cross_entropy_with_logits(x, y),
        x,
    )


@pytest.mark.parametrize("alpha, gamma", [(0.75, 2.0), (0.5, 0.5), (1.0, 0.0)])
def test_vfl_is_the_varifocalnet_formula(alpha, gamma):
    x, _, q, _ = _quality_problem(seed=7)
    q[0, 1] = 0.0
    q[1, 2] = 1.0
    p = torch.sigmoid(x)
    loss = reference.varifocal_loss(x, q, alpha, gamma)
    negatives = q == 0
    assert negatives.any() and (~negatives).any()
    expected_negative = -alpha * p**gamma * torch.log(1 - p)
    expected_positive = -q * (q * torch.log(p) + (1 - q) * torch.log(1 - p))
    torch.testing.assert_close(loss[negatives], expected_negative[negatives])
    torch.testing.assert_close(loss[~negatives], expected_positive[~negatives])
    bce = F.binary_cross_entropy_with_logits(x, q, reduction="none")
    torch.testing.assert_close(loss[~negatives], (q * bce)[~negatives])


def test_vfl_positive_with_zero_score_is_a_negative():
    x = torch.randn(3, 4, dtype=DTYPE)
    ids = torch.tensor([2, 0, -1])
    scores = torch.tensor([0.0, 0.6, 0.3], dtype=DTYPE)
    loss = reference.varifocal_loss(x, (ids, scores))
    torch.testing.assert_close(loss[0], reference.varifocal_loss(x[:1], torch.zeros(1, 4, dtype=DTYPE))[0])


@pytest.mark.parametrize("loss_fn", QUALITY_LOSSES.values(), ids=QUALITY_LOSSES.keys())
def test_quality_weight_and_normalizer(loss_fn):
    x, pair, _, _ = _quality_problem(seed=8)
    row_weight = torch.rand(x.shape[0], 1, generator=_generator(9), dtype=DTYPE)
    plain = loss_fn(x, pair)
    for normalizer in (3.0, torch.tensor(3.0, dtype=DTYPE), torch.tensor([3.0])):
        torch.testing.assert_close(
            loss_fn(x, pair, reduction="sum", weight=row_weight, normalizer=normalizer), (plain * row_weight).sum() / 3
        )


def test_quality_targets_reject_what_they_cannot_read():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="shape"):
        reference.quality_focal_loss(x, (torch.zeros(4, dtype=torch.long), torch.rand(3)))
    with pytest.raises(ValueError, match="shape"):
        reference.varifocal_loss(x, (torch.zeros(4, 3, dtype=torch.long), torch.rand(4, 3)))
    with pytest.raises(ValueError, match="scores"):
        reference.quality_focal_loss(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="pair"):
        reference.varifocal_loss(x, (torch.zeros(4, dtype=torch.long),))


# --------------------------------------------------------------------------------------------------
# All four: NaN and finite differences (their values at saturated logits: tests/test_oracle.py)

SATURATED = torch.tensor(
    [
        [1e4, -1e4, 0.0, 3.0],
        [-1e4, 1e4, -1e4, 1e4],
        [1e4, 1e4, 1e4, 1e4],
        [-1e4, -1e4, -1e4, -1e4],
        [-1e4, 2.0, 1e4, -5.0],
    ],
    dtype=DTYPE,
)
SATURATED_IDS = torch.tensor([0, 1, 3, 2, 0])
SATURATED_SCORES = torch.tensor([0.9, 1.0, 0.4, 0.0, 0.7], dtype=DTYPE)
SATURATED_DENSE = F.one_hot(SATURATED_IDS, 4).to(DTYPE) * SATURATED_SCORES.unsqueeze(-1)

ALL_FOUR = {
    "softmax": lambda x, **kw: reference.softmax_focal_loss(x, SATURATED_IDS, reduction="none", **kw),
    "softmax-smoothed-alpha": lambda x, **kw: reference.softmax_focal_loss(
        x, SATURATED_IDS, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DTYPE), reduction="none", label_smoothing=0.1, **kw
    ),
    "star-ids": lambda x, gamma: reference.sigmoid_focal_loss_star(x, SATURATED_IDS, max(gamma, 0.25), 1.0),
    "star-soft": lambda x, gamma: reference.sigmoid_focal_loss_star(x, SATURATED_DENSE, max(gamma, 0.25), 0.0, 0.25),
    "qfl-pair": lambda x, gamma: reference.quality_focal_loss(x, (SATURATED_IDS, SATURATED_SCORES), gamma),
    "qfl-dense": lambda x, gamma: reference.quality_focal_loss(x, SATURATED_DENSE, gamma),
    "vfl-pair": lambda x, gamma: reference.varifocal_loss(x, (SATURATED_IDS, SATURATED_SCORES), 0.75, gamma),
    "vfl-dense": lambda x, gamma: reference.varifocal_loss(x, SATURATED_DENSE, 0.75, gamma),
}


@pytest.mark.parametrize("name", ALL_FOUR.keys())
def test_nan_logit_gives_nan_only_where_it_enters(name):
    x = SATURATED.clone()
    x[4, 1] = torch.nan
    loss = ALL_FOUR[name](x, gamma=2.0)
    nan = torch.isnan(loss)
    if name.startswith("softmax"):  # the softmax couples a row: the whole row's loss, a scalar per row
        assert nan.tolist() == [False, False, False, False, True]
    else:
        expected = torch.zeros_like(nan)
        expected[4, 1] = True
        assert torch.equal(nan, expected)


def _gradcheck_cases():
    g = _generator(11)
    x = torch.randn(4, 3, generator=g, dtype=DTYPE) * 1.5
    x_nd = torch.randn(2, 3, 2, generator=g, dtype=DTYPE) * 1.5
    ids = torch.tensor([0, -1, 2, -100])
    soft_ids = torch.tensor([2, 0, 1, -100])
    scores = torch.tensor([0.7, 0.3, 0.9, 0.5], dtype=DTYPE)
    soft = torch.rand(4, 3, generator=g, dtype=DTYPE)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=DTYPE)
    return {
        "softmax": (x, lambda x: reference.softmax_focal_loss(x, soft_ids, gamma=2.0)),
        "softmax-everything": (
            x_nd,
            lambda x: reference.softmax_focal_loss(
                x, torch.tensor([[0, 2], [-100, 1]]), torch.tensor([0.2, 0.5, 0.8], dtype=DTYPE), 1.5,
                weight=weight, label_smoothing=0.2,
            ),
        ),
        "star-ids": (x, lambda x: reference.sigmoid_focal_loss_star(x, ids, 2.0, 1.0, 0.25, "mean")),
        "star-soft": (x, lambda x: reference.sigmoid_focal_loss_star(x, soft, 4.0, 0.0, weight=weight)),
        "qfl-pair": (x, lambda x: reference.quality_focal_loss(x, (soft_ids, scores), 2.0, "sum", weight=weight)),
        "qfl-dense": (x, lambda x: reference.quality_focal_loss(x, soft, 2.5)),
        "vfl-pair": (x, lambda x: reference.varifocal_loss(x, (soft_ids, scores), 0.75, 2.0, "mean")),
        "vfl-dense": (x, lambda x: reference.varifocal_loss(x, soft * (soft > 0.4), 0.75, 1.5, normalizer=2.0)),
    }


@pytest.mark.parametrize("name", _gradcheck_cases().keys())
def test_gradcheck_and_gradgradcheck(name):
    x, fn = _gradcheck_cases()[name]
    x = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))
