"""Numerics: extreme logits, saturation, NaN propagation and output dtypes.

The oracle here is the loss evaluated with mpmath at 50 significant digits, written so that nothing
cancels (1 - p is computed as sigmoid(-x)), for which no exponent is too large or too small.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

import focal
from focal import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GAMMAS = [0.0, 0.5, 1.0, 2.0, 2.5]


def _exact(x: float, t: float, alpha: float, gamma: float) -> tuple[float, float]:
    """FL and dFL/dx at (x, t), exactly, rounded to float64 (which only over/underflows the result)."""
    with mpmath.workdps(50):
        x, t = mpmath.mpf(x), mpmath.mpf(t)
        p = 1 / (1 + mpmath.exp(-x))
        one_minus_p = 1 / (1 + mpmath.exp(x))
        softplus = lambda z: mpmath.log1p(mpmath.exp(z)) if z < 0 else z + mpmath.log1p(mpmath.exp(-z))  # noqa: E731
        ce = t * softplus(-x) + (1 - t) * softplus(x)
        q = p * (1 - t) + one_minus_p * t  # 1 - p_t
        alpha_t = 1 if alpha < 0 else alpha * t + (1 - alpha) * (1 - t)
        loss = alpha_t * q**gamma * ce
        dq = p * one_minus_p * (1 - 2 * t)
        dce = p * (1 - t) - one_minus_p * t  # p - t
        modulating_grad = 0 if gamma == 0 else gamma * q ** (gamma - 1) * dq
        grad = alpha_t * (modulating_grad * ce + q**gamma * dce)
        return float(loss), float(grad)


def _extreme_logits(dtype) -> list[float]:
    big = torch.finfo(dtype).max
    values = [0.0, 1e-3, 0.5, 1.0, 3.0, 5.0, 17.0, 30.0, 100.0, 1e4, big]
    return sorted({v for m in values for v in (m, -m)})


def _tolerances(dtype):
    """rtol for values computed in float32 (float64) and rounded to dtype; atol: its smallest subnormals."""
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-300)
    compute_rtol = 2e-6
    finfo = torch.finfo(dtype)
    return dict(rtol=compute_rtol + finfo.eps, atol=2 * finfo.smallest_normal * finfo.eps + 1e-44)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("target", [0.0, 1.0, 0.3, 0.9])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_finite_logit_gives_the_exact_loss_and_gradient(dtype, target, gamma):
    alpha = 0.25
    x = torch.tensor(_extreme_logits(dtype), dtype=dtype, requires_grad=True)
    t = torch.full_like(x, target).detach()
    loss = focal.sigmoid_focal_loss(x, t, alpha, gamma)
    loss.sum().backward()
    assert loss.dtype == x.grad.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), (loss, x.grad)
    assert (loss >= 0).all()

    # The op sees the logits and targets rounded to dtype; so does the oracle.
    exact = [_exact(xi, ti, alpha, gamma) for xi, ti in zip(x.detach().double().tolist(), t.double().tolist())]
    expected_loss = torch.tensor([e[0] for e in exact], dtype=torch.float64)
    expected_grad = torch.tensor([e[1] for e in exact], dtype=torch.float64)
    tol = _tolerances(dtype)
    torch.testing.assert_close(loss.detach().double(), expected_loss, **tol)
    torch.testing.assert_close(x.grad.double(), expected_grad, **tol)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_finite_logit_with_class_ids(dtype, gamma):
    """The class-id path (positives, negatives, background) at every extreme logit."""
    logits = _extreme_logits(dtype)
    x = torch.tensor(logits, dtype=dtype).repeat(3, 1).requires_grad_()  # (3 rows, len(logits) classes)
    ids = torch.tensor([0, len(logits) - 1, -1])
    loss = focal.sigmoid_focal_loss(x, ids, 0.25, gamma)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    onehot = torch.zeros(x.shape, dtype=torch.float64)
    onehot[0, 0] = onehot[1, -1] = 1
    rows = zip(x.detach().double().tolist(), onehot.tolist())
    exact = [[_exact(xi, ti, 0.25, gamma) for xi, ti in zip(xr, tr)] for xr, tr in rows]
    tol = _tolerances(dtype)
    expected_loss = torch.tensor([[e[0] for e in r] for r in exact], dtype=torch.float64)
    expected_grad = torch.tensor([[e[1] for e in r] for r in exact], dtype=torch.float64)
    torch.testing.assert_close(loss.detach().double(), expected_loss, **tol)
    torch.testing.assert_close(x.grad.double(), expected_grad, **tol)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 2.5])
@pytest.mark.parametrize("magnitude", [100.0, 1e4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturated_logits(dtype, magnitude, gamma):
    """Correct side: the loss underflows to exactly 0. Wrong side: FL = alpha_t |x| and dFL/dx = alpha_t y.

    On the wrong side p_t = sigmoid(-|x|) ~ e^-|x|, so (1 - p_t)^gamma = 1, CE = |x| + log1p(e^-|x|), and
    the Appendix B derivative alpha_t y (1 - p_t)^gamma (gamma p_t log p_t + p_t - 1) is -alpha_t y.
    """
    x = torch.tensor([magnitude, -magnitude, -magnitude, magnitude], dtype=dtype, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype)  # two correct, then two wrong
    loss = focal.sigmoid_focal_loss(x, t, 0.25, gamma)
    loss.sum().backward()
    mag = x[0].item()  # magnitude as rounded to dtype (1e4 is 9984 in bfloat16)
    if dtype == torch.float64 and magnitude == 100.0:
        # e^-100 is a normal float64: FL = alpha_t log1p(e^-100) sigmoid(-100)^gamma ~ alpha_t e^(-100 (1 + gamma)).
        for alpha_t, value in zip([0.25, 0.75], loss[:2].tolist()):
            assert value == pytest.approx(alpha_t * math.exp(-100 * (1 + gamma)), rel=1e-12)
    else:
        # The exact value is below the smallest subnormal of dtype (e^-150 at best).
        assert loss[0].item() == 0.0 and loss[1].item() == 0.0
    assert x.grad[:2].abs().max().item() <= 1e-30
    # Wrong side: positive at -|x| (alpha_t = .25), negative at +|x| (alpha_t = .75).
    rtol = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
    assert loss[2].item() == pytest.approx(0.25 * mag, rel=rtol)
    assert loss[3].item() == pytest.approx(0.75 * mag, rel=rtol)
    assert x.grad[2].item() == pytest.approx(-0.25, rel=rtol)
    assert x.grad[3].item() == pytest.approx(0.75, rel=rtol)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gamma_below_one_has_finite_gradients_at_saturation(dtype, gamma):
    """d/dx (1 - p_t)^gamma has a (1 - p_t)^(gamma - 1) factor, infinite when 1 - p_t underflows to 0.

    The exact derivative is still finite (it tends to 0 on the correct side), and so must be ours.
    """
    big = torch.finfo(dtype).max
    x = torch.tensor([20.0, 40.0, 90.0, 200.0, 800.0, big], dtype=dtype)
    x = torch.cat([x, -x]).requires_grad_()
    for targets in (torch.cat([torch.ones(6), torch.zeros(6)]), torch.tensor([0] * 6 + [-1] * 6)):
        if targets.is_floating_point():
            inputs, t = x, targets.to(dtype)
        else:  # class ids: each row is one class, every logit on its correct side
            inputs, t = x.unsqueeze(-1), (targets * 0 - 1) + (x > 0).long()
        x.grad = None
        loss = focal.sigmoid_focal_loss(inputs, t, 0.25, gamma, "sum")
        loss.backward()
        assert torch.isfinite(x.grad).all(), x.grad
        assert x.grad.abs().max().item() < 1e-2  # e^(-20 gamma) at most: all of them are on the correct side
        assert math.isfinite(loss.item())


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.75])
def test_gamma_below_one_matches_appendix_b(gamma):
    # Appendix B as written (p_t - 1) cancels in float64 as p_t -> 1: with |x| <= 12 it keeps ~11 digits.
    x = torch.linspace(-12, 12, 49, dtype=torch.float64).requires_grad_()
    t = (torch.arange(49) % 2).double()
    focal.sigmoid_focal_loss(x, t, 0.25, gamma, "sum").backward()
    expected = reference.sigmoid_focal_loss_grad(x.detach(), t, 0.25, gamma, "sum")
    torch.testing.assert_close(x.grad, expected, rtol=1e-9, atol=1e-300)


def test_no_clamp_artefacts():
    # x = 17, t = 0: p = sigmoid(17) rounds to 1 in float32, but FL = .75 * 1^2 * softplus(17)
    # = .75 * (17 + log1p(e^-17)) = 12.75 + 3.1e-8. Computing log(1 - p) with p clamped to
    # [eps, 1 - eps] would give .75 * -log(eps) instead: 12.09 for eps = 1e-7.
    x = torch.tensor([17.0], requires_grad=True)
    loss = focal.sigmoid_focal_loss(x, torch.zeros(1), alpha=0.25, gamma=2.0)
    assert loss.item() == pytest.approx(12.75, rel=1e-6)
    loss.backward()
    # dFL/dx = .75 * (q^2 + 2 q CE p (1 - p)) with q = p ~ 1: .75 to 1e-6 (the second term is ~1e-6).
    assert x.grad.item() == pytest.approx(0.75 * (1 + 2 * 17 * math.exp(-17)), rel=1e-6)
    # and the mirror image: x = -17 for a positive, alpha_t = .25: 4.25.
    loss = focal.sigmoid_focal_loss(torch.tensor([-17.0]), torch.ones(1), alpha=0.25, gamma=2.0)
    assert loss.item() == pytest.approx(4.25, rel=1e-6)


# --- NaN ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 1.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["hard", "soft", "ids", "ids-smoothed"])
def test_nan_logits_give_nan(dtype, kind, gamma):
    x = torch.zeros(3, 5, dtype=dtype)
    x[1, 2] = math.nan
    x.requires_grad_()
    if kind == "hard":
        t, kwargs = (torch.arange(15).reshape(3, 5) % 2).to(dtype), {}
    elif kind == "soft":
        t, kwargs = torch.full((3, 5), 0.3, dtype=dtype), {}
    else:
        t, kwargs = torch.tensor([0, 2, -1]), {"label_smoothing": 0.1 if kind == "ids-smoothed" else 0.0}
    loss = focal.sigmoid_focal_loss(x, t, 0.25, gamma, **kwargs)
    loss.sum().backward()
    assert math.isnan(loss[1, 2].item()) and math.isnan(x.grad[1, 2].item())
    others = torch.ones(3, 5, dtype=torch.bool)
    others[1, 2] = False
    assert torch.isfinite(loss[others]).all() and torch.isfinite(x.grad[others]).all()
    for reduction in ("sum", "mean"):
        x.grad = None
        reduced = focal.sigmoid_focal_loss(x, t, 0.25, gamma, reduction, **kwargs)
        reduced.backward()
        assert math.isnan(reduced.item())
        assert math.isnan(x.grad[1, 2].item())


@pytest.mark.parametrize("where", ["targets", "weight"])
def test_nan_targets_or_weights_give_nan(where):
    x = torch.randn(2, 3, requires_grad=True)
    t = torch.rand(2, 3)
    w = torch.ones(2, 3)
    (t if where == "targets" else w)[0, 1] = math.nan
    loss = focal.sigmoid_focal_loss(x, t, weight=w)
    loss.sum().backward()
    assert math.isnan(loss[0, 1].item()) and math.isnan(x.grad[0, 1].item())
    assert math.isnan(focal.sigmoid_focal_loss(x.detach(), t, weight=w, reduction="sum").item())


def test_nan_in_ignored_rows_contributes_nothing():
    # Ignored rows contribute neither loss nor gradient, whatever their logits hold (e.g. padding).
    x = torch.randn(3, 4)
    x[1] = math.nan
    x.requires_grad_()
    ids = torch.tensor([2, -100, -1])
    loss = focal.sigmoid_focal_loss(x, ids, reduction="sum")
    loss.backward()
    assert math.isfinite(loss.item())
    assert (x.grad[1] == 0).all() and torch.isfinite(x.grad).all()
    kept = torch.tensor([0, 2])
    expected = focal.sigmoid_focal_loss(x.detach()[kept], ids[kept], reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --- output dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["float", "ids"])
def test_output_dtypes(device, dtype, reduction, kind):
    x = torch.randn(4, 3, device=device).to(dtype).requires_grad_()
    t = torch.tensor([0, 2, -1, 1], device=device) if kind == "ids" else torch.rand(4, 3, device=device).to(dtype)
    loss = focal.sigmoid_focal_loss(x, t, reduction=reduction)
    if reduction == "none":
        assert loss.dtype == dtype and loss.shape == x.shape
    else:
        assert loss.shape == ()
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert loss.device == x.grad.device == x.device


def test_large_half_sum_does_not_overflow():
    # 64 wrong-side negatives at x = 60000: each FL = .75 * 60000 = 45000 fits float16 (max 65504),
    # their sum 2.88e6 does not; the float32 reduction holds it.
    x = torch.full((8, 8), 60000.0, dtype=torch.float16)
    t = torch.zeros(8, 8, dtype=torch.float16)
    none = focal.sigmoid_focal_loss(x, t)
    assert none.dtype == torch.float16 and (none == 45000).all()
    total = focal.sigmoid_focal_loss(x, t, reduction="sum")
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(64 * 45000.0, rel=1e-6)
    assert focal.sigmoid_focal_loss(x, t, reduction="mean").item() == pytest.approx(45000.0, rel=1e-6)
    ids = torch.full((8,), -1)  # the same through class ids: every class a negative
    assert focal.sigmoid_focal_loss(x, ids, reduction="sum").item() == pytest.approx(64 * 45000.0, rel=1e-6)


def test_reduced_half_loss_keeps_float32_precision():
    # 2^14 elements of FL = .75 * softplus(2) each; in float16 a running sum would stall at 2048 + ...
    x = torch.full((128, 128), 2.0, dtype=torch.float16)
    total = focal.sigmoid_focal_loss(x, torch.zeros_like(x), gamma=0.0, reduction="sum")
    expected = 128 * 128 * 0.75 * math.log1p(math.exp(2.0))
    assert total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 2.5])
@pytest.mark.parametrize("target", [0.0, 1.0, 0.3])
def test_float32_kernel_matches_float64_kernel_on_a_dense_sweep(target, gamma):
    """The float32 CPU path (its own vectorised exp and log) against the float64 path (libm-grade
    exp and log), on 400k logits covering every exponent that matters, both sides of saturation."""
    x32 = torch.linspace(-120.0, 120.0, 400_001, dtype=torch.float32)
    t32 = torch.full_like(x32, target)
    results = {}
    for dtype in (torch.float32, torch.float64):
        x = x32.to(dtype).clone().requires_grad_()
        loss = focal.sigmoid_focal_loss(x, t32.to(dtype), 0.25, gamma)
        loss.sum().backward()
        results[dtype] = (loss.detach().double(), x.grad.double())
    # Relative accuracy wherever the exact value is a normal float32. A soft target's gradient
    # (p - t) + ... cancels near p = t, so it also gets an absolute allowance of a few float32 ulps
    # of its terms; losses and hard-target gradients are sums of same-signed terms and get none.
    tiny = torch.finfo(torch.float32).tiny
    cancellation = 1e-6 if target not in (0.0, 1.0) else 0.0
    for name, got, exact, atol in zip(
        ("loss", "grad"), results[torch.float32], results[torch.float64], (0.0, cancellation)
    ):
        err = (got - exact).abs()
        bound = 4e-6 * exact.abs() + 2 * tiny + atol
        worst = int((err - bound).argmax())
        assert (err <= bound).all(), (name, x32[worst].item(), got[worst].item(), exact[worst].item())
