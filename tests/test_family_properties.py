"""Property tests (hypothesis) of the sigmoid focal loss, FL*, QFL and VFL over shapes, dtypes, targets, weights and
hyper-parameters: each compares the fused op with an independent computation (the float64
reference on the same rounded inputs, the papers' formulas, its own "none" reduction, itself without
gradient or with another thread count)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from family_cases import FOCAL, QFL, STAR, VFL, assert_close, cast_targets, loss_and_grad

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
IGNORE = -100

# Hyper-parameters exactly representable in float32, so that the float64 comparisons are about the math.
exponents = st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0.0, 4.0, width=32))
unit = st.floats(0.0, 1.0, width=32)
HYPERS = {
    "focal": st.fixed_dictionaries({
        "alpha": st.one_of(st.sampled_from([None, -1, 0.0, 1.0]), st.integers(0, 4096).map(lambda k: k / 4096)),
        "gamma": exponents,
    }),
    "star": st.fixed_dictionaries({
        "gamma": st.one_of(st.sampled_from([1.0, 2.0, 4.0]), st.floats(0.125, 4.0, width=32)),
        "beta": st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-2.0, 2.0, width=32)),
        "alpha": st.one_of(st.none(), st.integers(0, 4096).map(lambda k: k / 4096)),
    }),
    "qfl": st.fixed_dictionaries({"beta": exponents}),
    "vfl": st.fixed_dictionaries({"alpha": unit, "gamma": exponents}),
}
LOSSES = {"focal": FOCAL, "star": STAR, "qfl": QFL, "vfl": VFL}
HARD_TARGET_LOSSES = ("focal", "star")


@st.composite
def shapes(draw, min_dims=1, max_dims=3):
    dims = draw(st.integers(min_dims, max_dims))
    shape = [draw(st.integers(0 if i < dims - 1 else 1, 5)) for i in range(dims)]
    return tuple(shape)


@st.composite
def floats_tensor(draw, shape, low, high, dtype=torch.float64):
    n = math.prod(shape)
    values = draw(st.lists(st.floats(low, high, allow_subnormal=False), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)


@st.composite
def targets_for(draw, loss_name, shape):
    """FL, FL*: hard, soft or class ids; QFL / VFL: dense with exact zeros and ones, or (ids, scores)."""
    n, rows = math.prod(shape), math.prod(shape[:-1])
    ids = st.lists(st.sampled_from(list(range(shape[-1])) + [-1, IGNORE]), min_size=rows, max_size=rows)
    if loss_name in HARD_TARGET_LOSSES:
        kind = draw(st.sampled_from(["hard", "soft", "ids"]))
        if kind == "ids":
            return torch.tensor(draw(ids), dtype=torch.long).reshape(shape[:-1])
        values = st.sampled_from([0.0, 1.0]) if kind == "hard" else st.floats(0.0, 1.0)
        return torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float64).reshape(shape)
    quality = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
    if draw(st.booleans()):
        return torch.tensor(draw(st.lists(quality, min_size=n, max_size=n)), dtype=torch.float64).reshape(shape)
    scores = torch.tensor(draw(st.lists(quality, min_size=rows, max_size=rows)), dtype=torch.float64)
    return torch.tensor(draw(ids), dtype=torch.long).reshape(shape[:-1]), scores.reshape(shape[:-1])


@st.composite
def weights_for(draw, shape):
    kind = draw(st.sampled_from(["none", "scalar", "class", "row", "full"]))
    if kind == "none":
        return None
    weight_shape = {"scalar": (), "class": shape[-1:], "row": shape[:-1] + (1,), "full": shape}[kind]
    return draw(floats_tensor(weight_shape, 0.0, 4.0))


def _tolerances(dtype, reduced: bool):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-12)
    rtol = 1e-5 if reduced else 1e-5 + torch.finfo(dtype).eps
    atol = 4e-6 if reduced or dtype != torch.float16 else 4e-6 + 6e-8
    return dict(rtol=rtol, atol=atol)


def _bce(x, t):
    """The binary cross entropy with logits as two non-negative terms, exact to rounding in float64.

    F.binary_cross_entropy_with_logits computes (1 - t) x + softplus(-x), which cancels for x << 0
    and t near sigmoid(x) (4e-8 relative at x = -20): too coarse an oracle for float64."""
    zero = torch.zeros_like(x)
    return t * torch.logaddexp(-x, zero) + (1 - t) * torch.logaddexp(x, zero)


def _is_ids(targets) -> bool:
    return isinstance(targets, tuple) or not targets.is_floating_point()


# `device` is a plain torch.device: sharing it between examples is harmless.
@settings(max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.sampled_from(list(LOSSES)), dtype=st.sampled_from(DTYPES),
       reduction=st.sampled_from(["none", "sum", "mean"]))
def test_matches_reference(device, data, name, dtype, reduction):
    """Values, gradients, dtypes and shapes against the float64 reference; the loss is >= 0."""
    loss = LOSSES[name]
    hyper = data.draw(HYPERS[name], label="hyper")
    if name == "qfl" and dtype != torch.float64:
        # Below beta = 1 the gradient |d|^(beta - 1) is unbounded as sigma nears y: float32 math
        # cannot follow the float64 reference there (test_family.py checks those betas in float64).
        assume(hyper["beta"] == 0 or hyper["beta"] >= 1)
    shape = data.draw(shapes(), label="shape")
    x = data.draw(floats_tensor(shape, -12.0, 12.0, dtype), label="x").to(device)
    targets = cast_targets(data.draw(targets_for(name, shape), label="targets"), dtype)
    targets = tuple(t.to(device) for t in targets) if isinstance(targets, tuple) else targets.to(device)
    weight = data.draw(weights_for(shape), label="weight")
    weight = None if weight is None else weight.to(device, dtype)
    normalizer = None
    if reduction != "mean":
        normalizer = data.draw(st.one_of(st.none(), st.floats(0.5, 100.0), st.floats(0.5, 100.0).map(torch.tensor)),
                               label="normalizer")
    kwargs = dict(hyper, reduction=reduction, weight=weight, normalizer=normalizer)

    got, grad = loss_and_grad(loss.fused, x, targets, **kwargs)
    ref_kwargs = dict(kwargs, weight=None if weight is None else weight.double())
    if isinstance(normalizer, torch.Tensor):
        ref_kwargs["normalizer"] = normalizer.double()
    ref, ref_grad = loss_and_grad(loss.reference, x.double(), cast_targets(targets, torch.float64), **ref_kwargs)

    assert got.shape == ref.shape == (shape if reduction == "none" else ())
    assert got.dtype == (dtype if reduction == "none" else (torch.float64 if dtype == torch.float64 else torch.float32))
    assert grad.dtype == dtype and grad.shape == shape
    empty_dense_mean = reduction == "mean" and not _is_ids(targets) and x.numel() == 0
    if not empty_dense_mean:  # the mean of nothing is NaN there, as torch.mean's
        assert (got >= 0).all(), got
    assert_close(got, ref, **_tolerances(dtype, reduction != "none"), what="loss")
    assert_close(grad, ref_grad, **_tolerances(dtype, False), what="grad")


@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]), hyper=HYPERS["star"])
def test_star_gradient_sign(data, dtype, hyper):
    """dFL*/dx = alpha_t y (p*_t - 1): negative for a positive, positive for a negative (0 < alpha < 1)."""
    assume(hyper["alpha"] is None or 0 < hyper["alpha"] < 1)
    shape = data.draw(shapes(), label="shape")
    x = data.draw(floats_tensor(shape, -8.0, 8.0, dtype), label="x")
    targets = data.draw(targets_for("star", shape), label="targets")
    if targets.is_floating_point():
        targets = targets.round().to(dtype)
        positive = targets == 1
    else:
        positive = targets.unsqueeze(-1) == torch.arange(shape[-1])
    kept = torch.ones(shape, dtype=torch.bool) if targets.is_floating_point() else (targets != IGNORE).unsqueeze(-1)
    kept = kept.expand(shape)
    _, grad = loss_and_grad(STAR.fused, x, targets, **hyper)
    assert (grad[positive & kept] < 0).all() and (grad[~positive & kept] > 0).all()
    assert (grad[~kept] == 0).all()


@given(data=st.data(), alpha=unit, gamma=exponents)
def test_vfl_is_q_times_bce_on_positives(data, alpha, gamma):
    shape = data.draw(shapes(), label="shape")
    x = data.draw(floats_tensor(shape, -12.0, 12.0), label="x")
    q = data.draw(targets_for("vfl", shape).filter(lambda t: isinstance(t, torch.Tensor)), label="q")
    loss, _ = loss_and_grad(VFL.fused, x, q, alpha=alpha, gamma=gamma)
    positive = q > 0
    bce = _bce(x, q)
    negative = alpha * torch.sigmoid(x) ** gamma * torch.logaddexp(x, torch.zeros_like(x))
    assert_close(loss[positive], (q * bce)[positive], rtol=1e-10, atol=1e-14, what="positives")
    assert_close(loss[~positive], negative[~positive], rtol=1e-10, atol=1e-14, what="negatives")


# beta near 0 makes the bound (rounding)^beta indistinguishable from 1: nothing to test there.
@given(x=st.lists(st.floats(-30.0, 30.0), min_size=1, max_size=24),
       beta=st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0.25, 4.0, width=32)))
def test_qfl_vanishes_at_its_target(x, beta):
    """y = sigma(x): the factor |y - sigma|^beta makes the loss (at most rounding)^beta times the BCE
    for beta > 0; at beta = 0 it is the BCE itself."""
    x = torch.tensor(x, dtype=torch.float64).reshape(-1, 1)
    y = torch.sigmoid(x)
    loss, _ = loss_and_grad(QFL.fused, x, y, beta=beta)
    bce = _bce(x, y)
    if beta == 0:
        assert_close(loss, bce, rtol=1e-12, atol=1e-300)
    else:
        assert (loss <= bce * (8 * torch.finfo(torch.float64).eps) ** beta * (1 + 1e-12)).all(), (loss, bce)


@given(data=st.data(), name=st.sampled_from(list(LOSSES)), dtype=st.sampled_from(DTYPES))
def test_sum_and_mean_follow_none(data, name, dtype):
    """"sum" is the sum of "none" (float32 accumulation for 16-bit data); "mean" is the sum over the
    elements that are not ignored (0 for class ids when all are, NaN for empty dense targets)."""
    loss = LOSSES[name]
    hyper = data.draw(HYPERS[name], label="hyper")
    shape = data.draw(shapes(), label="shape")
    x = data.draw(floats_tensor(shape, -12.0, 12.0, dtype), label="x")
    targets = cast_targets(data.draw(targets_for(name, shape), label="targets"), dtype)
    none = loss.fused(x, targets, reduction="none", **hyper)
    total = loss.fused(x, targets, reduction="sum", **hyper)
    mean = loss.fused(x, targets, reduction="mean", **hyper)
    # The 16-bit "none" is rounded per element, the sum is not: compare with the float32 op's "none".
    widened = cast_targets(targets, torch.float32) if dtype != torch.float64 else targets
    exact_none = loss.fused(x.float() if dtype != torch.float64 else x, widened, reduction="none", **hyper)
    assert_close(total, exact_none.double().sum(), rtol=1e-5, atol=1e-6, what="sum")
    if _is_ids(targets):
        ids = targets[0] if isinstance(targets, tuple) else targets
        kept = int((ids != IGNORE).sum()) * shape[-1]
        assert_close(mean, total / max(kept, 1), rtol=1e-6, atol=0, what="mean")
    elif x.numel() == 0:
        assert math.isnan(mean.item())
    else:
        assert_close(mean, total / x.numel(), rtol=1e-6, atol=0, what="mean")
    assert none.dtype == dtype and none.shape == shape


@given(data=st.data(), name=st.sampled_from(list(LOSSES)), dtype=st.sampled_from(DTYPES),
       reduction=st.sampled_from(["none", "sum", "mean"]))
def test_result_does_not_depend_on_grad_mode(data, name, dtype, reduction):
    """The loss is bitwise the same whether or not the gradient is computed alongside it (logits that
    do not require it, or under torch.no_grad)."""
    loss = LOSSES[name]
    hyper = data.draw(HYPERS[name], label="hyper")
    shape = data.draw(shapes(), label="shape")
    x = data.draw(floats_tensor(shape, -30.0, 30.0, dtype), label="x")
    targets = cast_targets(data.draw(targets_for(name, shape), label="targets"), dtype)
    with_grad = loss.fused(x.clone().requires_grad_(), targets, reduction=reduction, **hyper)
    without = loss.fused(x, targets, reduction=reduction, **hyper)
    with torch.no_grad():
        no_grad = loss.fused(x.clone().requires_grad_(), targets, reduction=reduction, **hyper)
    assert with_grad.requires_grad and not without.requires_grad and not no_grad.requires_grad
    assert torch.equal(with_grad.detach(), without) or (without.isnan().all() and with_grad.isnan().all())
    assert torch.equal(no_grad, without) or (without.isnan().all() and no_grad.isnan().all())


@settings(max_examples=10)
@given(name=st.sampled_from(list(LOSSES)), rows=st.integers(1000, 3000), cols=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_deterministic_across_thread_counts(name, rows, cols, seed):
    """Bitwise the same reduced loss and gradient with 1 and 2 threads: the sums have a fixed order."""
    loss = LOSSES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 4
    ids = torch.randint(-1, cols, (rows,), generator=g)
    ids[::7] = IGNORE
    targets = ids if name in HARD_TARGET_LOSSES else (ids, torch.rand(rows, generator=g))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append([loss_and_grad(loss.fused, x, targets, reduction=r, **loss.default)
                            for r in ("sum", "mean")])
    finally:
        torch.set_num_threads(threads)
    for (one, one_grad), (two, two_grad) in zip(*results):
        assert torch.equal(one, two) and torch.equal(one_grad, two_grad)
