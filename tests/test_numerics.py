"""Numerics: finite gradients at the largest logits, NaN propagation, output dtypes, 16-bit sums and
a dense float32 sweep.

The exact values of every loss at extreme and saturated logits, in every dtype, are checked in
tests/test_op_vs_oracle.py (against focal.reference, itself checked against mpmath in
tests/test_oracle.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import focal
import focal.reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


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


# --- infinite logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 1.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinite_logits_on_the_wrong_side_give_an_infinite_loss(dtype, gamma):
    """x = +inf with a target below 1, or -inf with one above 0, is infinitely wrong: the loss is
    +inf with float targets (as torchvision's is for +inf; its -inf gives NaN) and with class ids,
    where a logit on its target's side gives 0."""
    x = torch.tensor([[math.inf, math.inf, -math.inf, -math.inf]], dtype=dtype)
    t = torch.tensor([[0.0, 0.3, 1.0, 0.7]], dtype=dtype)
    loss = focal.sigmoid_focal_loss(x, t, 0.25, gamma)
    assert torch.equal(loss, torch.full((1, 4), math.inf, dtype=dtype)), loss
    x_ids = torch.tensor([[math.inf, -math.inf], [-math.inf, math.inf]], dtype=dtype)
    loss = focal.sigmoid_focal_loss(x_ids, torch.tensor([0, 1]), 0.25, gamma)  # positives at (0,0) and (1,1)
    assert torch.equal(loss, torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=dtype)), loss
    loss = focal.sigmoid_focal_loss(x_ids, torch.tensor([1, 0]), 0.25, gamma)
    assert torch.equal(loss, torch.full((2, 2), math.inf, dtype=dtype)), loss


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


@pytest.mark.parametrize("form", ["float targets", "class ids", "row weights"])
def test_float32_sum_keeps_small_terms_after_large_ones(form):
    """A reduced float32 loss within 1e-5 of its exact value where a few large terms (wrong-side
    negatives, FL = 75 each) come first and the rest are small (FL about 3e-6, below half an ulp of
    75): a running float32 sum that already holds a large term drops every small one after it, which
    over a work block of 16384 elements had cost 8e-5 of the sum."""
    rows, cols = 2048, 91
    x = torch.full((rows, cols), -4.14)
    x[::512, :8] = 100.0  # the first vector of every 512th row: large
    ids = torch.full((rows,), -1)
    kwargs = {}
    if form == "float targets":
        targets = torch.zeros(rows, cols)
    else:
        targets = ids
        if form == "row weights":
            kwargs["weight"] = torch.ones(rows, 1)
    total = focal.sigmoid_focal_loss(x, targets, reduction="sum", **kwargs)
    exact = focal.reference.sigmoid_focal_loss(x.double(), torch.zeros(rows, cols, dtype=torch.float64),
                                               reduction="sum")
    small = exact - 32 * 0.75 * 100.0
    assert small / exact > 1e-4  # dropping the small terms of one block in ten would break the contract
    assert abs(total.double().item() - exact.item()) <= 1e-5 * exact.item()


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


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 0.5])
@pytest.mark.parametrize("target", ["ids", 0.0, 1.0, 0.3, 1e-37])
def test_float32_outputs_where_exp_leaves_the_normal_range(target, gamma):
    """Logits of magnitude 80 to 110, where exp(-|x|) becomes subnormal and then 0: every output,
    subnormal ones included, within a few float32 ulps (the subnormal spacing below the normal range)
    of the float64 value rounded. The AVX2 kernel computes exp(-|x|) with a single power-of-two
    factor, flushed to 0 from |x| = 87.7 on, only for gamma 1 and 2, whose outputs all carry another
    such factor; gamma 0 and 0.5 keep subnormal outputs that need the exact exp."""
    magnitudes = torch.linspace(80.0, 110.0, 6000, dtype=torch.float64)
    x64 = torch.cat([-magnitudes, magnitudes]).float().double()
    if target == "ids":
        x64 = x64.reshape(-1, 10)
        targets = torch.arange(x64.shape[0]) % 11 - 1  # background and each class in turn
    else:
        targets = torch.full_like(x64, target).float()
    results = {}
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype).requires_grad_()
        t = targets if target == "ids" else targets.to(dtype)
        loss = focal.sigmoid_focal_loss(x, t, 0.25, gamma)
        loss.sum().backward()
        results[dtype] = (loss.detach().double(), x.grad.double())
    smallest = 2.0 ** -149
    for name, got, exact in zip(("loss", "grad"), results[torch.float32], results[torch.float64]):
        exact = exact.float().double()  # the float32 value the op should give, within a few ulps
        bound = 4e-6 * exact.abs() + 4 * smallest
        err = (got - exact).abs()
        worst = int((err - bound).argmax())
        assert (err <= bound).all(), (name, x64.reshape(-1)[worst].item(), got.reshape(-1)[worst].item(),
                                      exact.reshape(-1)[worst].item())
