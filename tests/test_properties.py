"""Properties of the sigmoid focal loss alone (hypothesis) over shapes, dtypes, hyper-parameters,
targets and weights, and its shapes, long rows, target dtypes and normaliser forms.

Every property compares the fused op with an independent computation: torchvision's function, the
op's own one-hot float path, or soft targets smoothed by hand. Those it shares with FL*, QFL and VFL
(the float64 reference, "sum" and "mean" against "none", the loss with and without its gradient)
are in test_family_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import assume, given
from hypothesis import strategies as st

import focal
from focal import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MAX_ELEMENTS = 96

# alpha, gamma and label smoothing are drawn exactly representable in float32 (alpha a multiple of
# 2^-12, so that 1 - alpha is too), so that the float64 comparisons below are about the math;
# test_family.py::test_float64_keeps_hyperparameters_exact checks values that are not.
unit_float32 = st.floats(0.0, 1.0, width=32)
alphas = st.one_of(st.sampled_from([None, -1, 0.0, 0.25, 0.5, 1.0]), st.integers(0, 4096).map(lambda k: k / 4096))
gammas = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0]), st.floats(0.0, 1.0, width=32), st.floats(0.0, 4.0, width=32)
)
smoothings = st.one_of(st.just(0.0), unit_float32)


@st.composite
def shapes(draw, min_dims=0, max_dims=4):
    """Shapes from 0-D to 4-D with at most MAX_ELEMENTS elements, empty ones included."""
    dims = draw(st.integers(min_dims, max_dims))
    shape = []
    for _ in range(dims):
        shape.append(draw(st.integers(0, 6)))
        if math.prod(shape) > MAX_ELEMENTS:
            shape[-1] = 1
    return tuple(shape)


@st.composite
def tensors(draw, shape, low, high, dtype=torch.float64):
    n = math.prod(shape)
    values = draw(st.lists(st.floats(low, high, allow_subnormal=False), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)


@st.composite
def targets_for(draw, shape, kind, ignore_index=-100):
    n = math.prod(shape)
    if kind == "hard":
        return torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n)),
                            dtype=torch.float64).reshape(shape)
    if kind == "soft":
        return draw(tensors(shape, 0.0, 1.0))
    rows, classes = shape[:-1], shape[-1]
    choices = list(range(classes)) + [-1, ignore_index]
    ids = draw(st.lists(st.sampled_from(choices), min_size=math.prod(rows), max_size=math.prod(rows)))
    return torch.tensor(ids, dtype=torch.long).reshape(rows)


@st.composite
def weights_for(draw, shape):
    kind = draw(st.sampled_from(["none", "scalar", "class", "row", "full"]))
    if kind == "none" or (kind != "scalar" and len(shape) == 0):
        return None
    weight_shape = {
        "scalar": (),
        "class": shape[-1:] if shape else (),
        "row": shape[:-1] + (1,),
        "full": shape,
    }[kind]
    return draw(tensors(weight_shape, 0.0, 4.0))


def _tolerances(dtype, reduced: bool):
    """Loss/grad computed in float32 (float64), then the "none" loss and the grad rounded to dtype."""
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-12, equal_nan=True)
    rtol = 1e-5 if reduced else 1e-5 + torch.finfo(dtype).eps
    # p - t cancels for soft targets: absolute error ~ float32 eps times the (<= 4) weights.
    atol = 1e-6 if reduced or dtype != torch.float16 else 1e-6 + 6e-8
    return dict(rtol=rtol, atol=atol, equal_nan=True)


def _loss_and_grad(fn, x, targets, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, targets, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x) if x.numel() else (torch.zeros_like(x),)
    return loss.detach(), grad


@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]),
       alpha=st.sampled_from([-1.0, 0.0, 0.25, 0.5, 0.75, 1.0]), gamma=gammas,
       reduction=st.sampled_from(["none", "sum", "mean"]), kind=st.sampled_from(["hard", "soft"]))
def test_torchvision_parity(data, dtype, alpha, gamma, reduction, kind):
    """A drop-in for torchvision.ops.sigmoid_focal_loss: same values and gradients (float targets).

    torchvision is evaluated in float64: in float32 its 1 - p_t cancels, so it is the less exact of
    the two; the comparison is about what both compute.
    """
    shape = data.draw(shapes(min_dims=1), label="shape")
    x = data.draw(tensors(shape, -12.0, 12.0, dtype), label="x")
    targets = data.draw(targets_for(shape, kind), label="targets").to(dtype)
    loss, grad = _loss_and_grad(focal.sigmoid_focal_loss, x, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    tv_loss, tv_grad = _loss_and_grad(torchvision.ops.sigmoid_focal_loss, x.double(), targets.double(),
                                      alpha=alpha, gamma=gamma, reduction=reduction)
    assert loss.shape == tv_loss.shape
    tol = _tolerances(dtype, reduction != "none")
    torch.testing.assert_close(loss.double(), tv_loss, **tol)
    torch.testing.assert_close(grad.double(), tv_grad, **tol)


@given(data=st.data(), dtype=st.sampled_from(DTYPES), alpha=alphas, gamma=gammas,
       ignore_index=st.sampled_from([-100, -2, 1000]), label_smoothing=smoothings)
def test_class_ids_equal_one_hot(data, dtype, alpha, gamma, ignore_index, label_smoothing):
    """Class ids give what their one-hot float targets give, ignored rows being weighted by 0.

    The mean over class ids divides by the non-ignored elements only.
    """
    shape = data.draw(shapes(min_dims=1), label="shape")
    x = data.draw(tensors(shape, -12.0, 12.0, dtype), label="x")
    ids = data.draw(targets_for(shape, "ids", ignore_index), label="ids")
    weight = data.draw(weights_for(shape), label="weight")
    weight = None if weight is None else weight.to(dtype)

    kept = ids != ignore_index
    positive = (ids >= 0) & kept
    onehot = (ids.unsqueeze(-1) == torch.arange(shape[-1])) & positive.unsqueeze(-1)
    onehot = onehot.to(dtype)
    keep = kept.unsqueeze(-1).to(dtype)
    float_weight = keep if weight is None else torch.broadcast_to(weight, shape) * keep
    common = dict(alpha=alpha, gamma=gamma, label_smoothing=label_smoothing)

    loss, grad = _loss_and_grad(focal.sigmoid_focal_loss, x, ids, ignore_index=ignore_index, weight=weight, **common)
    float_loss, float_grad = _loss_and_grad(focal.sigmoid_focal_loss, x, onehot, weight=float_weight, **common)
    tol = _tolerances(dtype, False)
    torch.testing.assert_close(loss.double(), float_loss.double(), **tol)
    torch.testing.assert_close(grad.double(), float_grad.double(), **tol)

    total = focal.sigmoid_focal_loss(x, ids, reduction="sum", ignore_index=ignore_index, weight=weight, **common)
    float_total = focal.sigmoid_focal_loss(x, onehot, reduction="sum", weight=float_weight, **common)
    torch.testing.assert_close(total, float_total, **_tolerances(dtype, True))
    mean = focal.sigmoid_focal_loss(x, ids, reduction="mean", ignore_index=ignore_index, weight=weight, **common)
    kept_elements = int(kept.sum()) * shape[-1]
    # A batch whose rows are all ignored has a mean of 0 (the denominator is at least 1).
    torch.testing.assert_close(mean, total / max(kept_elements, 1), **_tolerances(dtype, True))


@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]), alpha=alphas, gamma=gammas,
       eps=unit_float32, kind=st.sampled_from(["hard", "soft", "ids"]),
       reduction=st.sampled_from(["none", "sum", "mean"]))
def test_label_smoothing_equals_smoothed_targets(data, dtype, alpha, gamma, eps, kind, reduction):
    shape = data.draw(shapes(min_dims=1), label="shape")
    x = data.draw(tensors(shape, -12.0, 12.0, dtype), label="x")
    targets = data.draw(targets_for(shape, kind), label="targets")
    if kind == "ids":
        # -1 and class ids only: an ignored row's smoothed targets would not be ignored.
        targets = targets.clamp(min=-1)
        hard = torch.zeros(shape, dtype=torch.float64)
        for index in torch.nonzero(targets >= 0).tolist():
            hard[tuple(index) + (targets[tuple(index)].item(),)] = 1.0
    else:
        targets = targets.to(dtype)
        hard = targets.double()
    smoothed = (hard * (1 - eps) + eps / 2).to(dtype)
    # The mean of nothing differs on purpose (0 for class ids, NaN for float targets): tested below.
    assume(not (reduction == "mean" and x.numel() == 0))
    common = dict(alpha=alpha, gamma=gamma, reduction=reduction)
    loss, grad = _loss_and_grad(focal.sigmoid_focal_loss, x, targets, label_smoothing=eps, **common)
    soft_loss, soft_grad = _loss_and_grad(focal.sigmoid_focal_loss, x, smoothed, **common)
    tol = _tolerances(dtype, reduction != "none")
    torch.testing.assert_close(loss, soft_loss, **tol)
    torch.testing.assert_close(grad, soft_grad, **tol)


@pytest.mark.parametrize(
    "shape",
    [(), (1,), (5,), (1, 1), (0,), (0, 4), (4, 0), (3, 1), (1, 7), (2, 3, 4), (2, 0, 3), (2, 3, 2, 5), (1, 2, 1, 3)],
    ids=str,
)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_every_shape(shape, reduction):
    """Every rank from 0-D to 4-D, empty and single elements, against the reference (the dtype
    rotates: the shape's handling does not depend on it; test_family.py covers every dtype)."""
    g = torch.Generator().manual_seed(len(shape))
    dtype = DTYPES[(len(shape) + math.prod(shape) + len(reduction)) % len(DTYPES)]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    targets = [torch.rand(shape, generator=g, dtype=torch.float64).round().to(dtype)]
    if shape and shape[-1]:
        targets.append(torch.randint(-1, shape[-1], shape[:-1], generator=g))
    for t in targets:
        loss, grad = _loss_and_grad(focal.sigmoid_focal_loss, x, t, reduction=reduction)
        ref_t = t.double() if t.is_floating_point() else t
        ref_loss, ref_grad = _loss_and_grad(reference.sigmoid_focal_loss, x.double(), ref_t, reduction=reduction)
        assert loss.shape == (shape if reduction == "none" else ())
        assert grad.shape == shape
        tol = _tolerances(dtype, reduction != "none")
        torch.testing.assert_close(loss.double(), ref_loss, **tol)
        torch.testing.assert_close(grad.double(), ref_grad, **_tolerances(dtype, False))


@pytest.mark.parametrize("kind", ["hard", "ids"])
@pytest.mark.parametrize("shape", [(1, 20000), (3, 16385), (16385, 1), (5, 4099)], ids=str)
def test_long_rows_and_many_rows(shape, kind):
    """Rows longer than the CPU kernel's work item, and work items that end mid-row."""
    g = torch.Generator().manual_seed(shape[0])
    x = torch.randn(shape, generator=g) * 4
    if kind == "ids":
        t = torch.randint(-1, shape[1], shape[:1], generator=g)
        t[::3] = -100
    else:
        t = torch.rand(shape, generator=g).round()
    weight = torch.rand(shape[1], generator=g)
    for reduction in ("none", "sum", "mean"):
        loss, grad = _loss_and_grad(focal.sigmoid_focal_loss, x, t, reduction=reduction, weight=weight)
        ref_t = t.double() if t.is_floating_point() else t
        ref_loss, ref_grad = _loss_and_grad(reference.sigmoid_focal_loss, x.double(), ref_t, reduction=reduction,
                                            weight=weight.double())
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_other_target_dtypes():
    """bool targets are float targets; int32 / int16 / uint8 ids are class ids."""
    x = torch.randn(6, 4)
    hard = torch.rand(6, 4) > 0.5
    by_bool = focal.sigmoid_focal_loss(x, hard)
    assert torch.equal(by_bool, focal.sigmoid_focal_loss(x, hard.float()))
    ids = torch.tensor([0, 3, -1, 2, -1, 1])
    expected = focal.sigmoid_focal_loss(x, ids)
    for dtype in (torch.int32, torch.int16, torch.int8):
        assert torch.equal(focal.sigmoid_focal_loss(x, ids.to(dtype)), expected)
    positive = ids.clamp(min=0).to(torch.uint8)
    assert torch.equal(focal.sigmoid_focal_loss(x, positive), focal.sigmoid_focal_loss(x, positive.long()))


@pytest.mark.parametrize(
    "normalizer",
    [4, 4.0, torch.tensor(4.0), torch.tensor(4), torch.tensor([4.0]), torch.tensor(4.0, dtype=torch.float16),
     torch.tensor(4.0, dtype=torch.float64)],
    ids=["int", "float", "tensor", "int-tensor", "one-element", "half-tensor", "double-tensor"],
)
def test_normalizer_forms(normalizer):
    x = torch.randn(6, 4, requires_grad=True)
    ids = torch.tensor([0, 3, -1, 2, -100, 1])
    loss = focal.sigmoid_focal_loss(x, ids, reduction="sum", normalizer=normalizer)
    (grad,) = torch.autograd.grad(loss, x)
    plain = focal.sigmoid_focal_loss(x, ids, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain, x)
    torch.testing.assert_close(loss, plain / 4, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, plain_grad / 4, rtol=1e-6, atol=0)
