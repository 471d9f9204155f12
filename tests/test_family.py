"""The sigmoid focal loss, FL*, QFL and VFL as fused ops against their float64 references in
`focal.reference`.

One table (tests/family_cases.py) drives every test over the four losses: values and gradients in
float64 (tight) and in float32 / float16 / bfloat16 (the float32 math rounded once), over target
forms, weights, reductions, normalisers, shapes and hyper-parameters; the closed forms the papers
give (the focal loss's and FL*'s Appendix B derivatives, BCE at FL's gamma 0, FL*'s gamma 1 beta 0
and QFL's beta 0, VFL's q * BCE);
saturated and NaN logits; empty inputs; opcheck, gradcheck and gradgradcheck, torch.compile,
torch.func, and the modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from focal import reference
from family_cases import (
    assert_close,
    LOSS_FORM_IDS,
    LOSS_FORMS,
    LOSSES,
    FOCAL,
    QFL,
    SHAPE,
    STAR,
    VFL,
    build_targets,
    cast_targets,
    class_ids,
    generator,
    logits,
    loss_and_grad,
    upstream_for,
)

REDUCTIONS = ["none", "sum", "mean"]
# Tests of what the Python layer does before the kernels (shapes, layouts, normalisers, modules,
# forward mode) run each loss on its class ids and on soft float targets, not on every target form.
TWO_FORMS = [(loss, form) for loss in LOSSES for form in (loss.ids_form, loss.dense_form)]
TWO_FORM_IDS = [f"{loss}-{form}" for loss, form in TWO_FORMS]
FLOAT64_TOL = dict(rtol=1e-10, atol=1e-13)
FLOAT64_GRAD_TOL = dict(rtol=1e-9, atol=1e-13)


def _compare(loss, form, device, reduction, hyper, *, x=None, dtype=torch.float64, shape=SHAPE, upstream=True,
             **extra):
    """Fused loss and gradient in ``dtype`` against the float64 reference on the same rounded values."""
    x = logits(device, shape) if x is None else x
    x = x.to(dtype)
    targets, kwargs = build_targets(loss, form, device, x.shape)
    targets = cast_targets(targets, dtype)
    kwargs.update(hyper, reduction=reduction, **extra)
    up = upstream_for(x) if upstream and reduction == "none" else None
    got_loss, got_grad = loss_and_grad(loss.fused, x, targets, up, **kwargs)

    ref_kwargs = dict(kwargs)
    for name in ("weight", "normalizer"):
        if isinstance(ref_kwargs.get(name), torch.Tensor) and ref_kwargs[name].is_floating_point():
            ref_kwargs[name] = ref_kwargs[name].double()
    ref_loss, ref_grad = loss_and_grad(loss.reference, x.double(), cast_targets(targets, torch.float64), up,
                                       **ref_kwargs)
    assert got_loss.shape == ref_loss.shape == (tuple(x.shape) if reduction == "none" else ())
    reduced_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got_loss.dtype == (dtype if reduction == "none" else reduced_dtype)
    assert got_grad.dtype == dtype and got_grad.shape == x.shape
    return got_loss.double(), got_grad.double(), ref_loss, ref_grad


# --- float64: every target form, reduction and hyper-parameter -----------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,form", LOSS_FORMS, ids=LOSS_FORM_IDS)
def test_float64_matches_reference_for_every_hyperparameter(device, loss, form, reduction):
    for hyper in loss.hypers:
        got, got_grad, ref, ref_grad = _compare(loss, form, device, reduction, hyper)
        assert_close(got, ref, **FLOAT64_TOL, what=f"{hyper}")
        assert_close(got_grad, ref_grad, **FLOAT64_GRAD_TOL, what=f"{hyper}")


def _weights(device):
    g = generator(5)
    return {
        "per-class": torch.tensor([0.5, 2.0, 0.0, 1.5], dtype=torch.float64, device=device),
        "per-row": (torch.rand(SHAPE[:-1] + (1,), generator=g, dtype=torch.float64) * 2).to(device),
        "full": (torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2).to(device),
        "broadcast-middle": (torch.rand((1, 3, 1), generator=g, dtype=torch.float64) + 0.5).to(device),
        "broadcast-batch": (torch.rand((2, 1, 4), generator=g, dtype=torch.float64) * 2).to(device),
        "scalar": torch.tensor(1.5, dtype=torch.float64, device=device),
    }


WEIGHTS = ["per-class", "per-row", "full", "broadcast-middle", "broadcast-batch", "scalar"]


# The kernels take a weight per class, per row or per element: every form meets those three; the
# broadcasts that the Python layer expands (into a full or per-row weight) are checked once per loss.
WEIGHT_CASES = [(loss, form, w) for loss, form in LOSS_FORMS for w in WEIGHTS[:3]] + [
    (loss, loss.ids_form, w) for loss in LOSSES for w in WEIGHTS[3:]]


@pytest.mark.parametrize("loss,form,weight", WEIGHT_CASES, ids=[f"{lo}-{f}-{w}" for lo, f, w in WEIGHT_CASES])
def test_float64_weights(device, loss, form, weight):
    for reduction in ("none", "mean"):
        got, got_grad, ref, ref_grad = _compare(loss, form, device, reduction, loss.default,
                                                weight=_weights(device)[weight])
        assert_close(got, ref, **FLOAT64_TOL)
        assert_close(got_grad, ref_grad, **FLOAT64_GRAD_TOL)


NORMALIZERS = {
    "number": lambda d: 3.0,
    "int-tensor": lambda d: torch.tensor(4, device=d),
    "cpu-tensor": lambda d: torch.tensor([2.5]),
}


@pytest.mark.parametrize("normalizer", list(NORMALIZERS))
@pytest.mark.parametrize("loss,form", TWO_FORMS, ids=TWO_FORM_IDS)
def test_float64_normalizer(device, loss, form, normalizer):
    for reduction in ("none", "sum"):  # with "mean" a normaliser is refused (test_family_errors.py)
        got, got_grad, ref, ref_grad = _compare(loss, form, device, reduction, loss.default,
                                                normalizer=NORMALIZERS[normalizer](device))
        assert_close(got, ref, **FLOAT64_TOL)
        assert_close(got_grad, ref_grad, **FLOAT64_GRAD_TOL)
        plain, plain_grad, _, _ = _compare(loss, form, device, reduction, loss.default)
        divisor = float(NORMALIZERS[normalizer]("cpu"))
        assert_close(got, plain / divisor, rtol=1e-12, atol=0)
        assert_close(got_grad, plain_grad / divisor, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(4,), (5, 4), (2, 3, 4), (2, 1, 3, 4)], ids=str)
@pytest.mark.parametrize("loss,form", TWO_FORMS, ids=TWO_FORM_IDS)
def test_float64_logits_of_every_rank(device, loss, form, shape):
    for reduction in REDUCTIONS:
        got, got_grad, ref, ref_grad = _compare(loss, form, device, reduction, loss.default, shape=shape)
        assert_close(got, ref, **FLOAT64_TOL)
        assert_close(got_grad, ref_grad, **FLOAT64_GRAD_TOL)


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
@pytest.mark.parametrize("loss,form", TWO_FORMS, ids=TWO_FORM_IDS)
def test_non_contiguous_logits(device, loss, form, layout):
    base = logits(device, (4, 2, 3), seed=3)
    x = {
        "transposed": base.permute(1, 2, 0),  # (2, 3, 4), classes last, not contiguous
        "strided": logits(device, (2, 3, 8), seed=4)[..., ::2],
        "expanded": logits(device, (1, 3, 4), seed=5).expand(2, 3, 4),
    }[layout]
    assert not x.is_contiguous() and x.shape == SHAPE
    for reduction in ("none", "mean"):
        got, got_grad, ref, ref_grad = _compare(loss, form, device, reduction, loss.default, x=x)
        assert_close(got, ref, **FLOAT64_TOL)
        assert_close(got_grad, ref_grad, **FLOAT64_GRAD_TOL)
        contiguous, contiguous_grad, _, _ = _compare(loss, form, device, reduction, loss.default, x=x.contiguous())
        assert torch.equal(got, contiguous) and torch.equal(got_grad, contiguous_grad)


# --- float32, float16, bfloat16: the float32 math, rounded once ----------------------------------


def _tolerances(dtype, reduced: bool):
    """As test_properties.py: float32 math, the "none" loss and the gradient rounded to dtype; soft
    targets' p - t cancels, so an absolute allowance of a few float32 ulps of the (<= 2) weights."""
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-12)
    rtol = 1e-5 if reduced else 1e-5 + torch.finfo(dtype).eps
    atol = 2e-6 if reduced or dtype != torch.float16 else 2e-6 + 6e-8
    return dict(rtol=rtol, atol=atol)


HALF_AND_SINGLE = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=str)
@pytest.mark.parametrize("loss,form", LOSS_FORMS, ids=LOSS_FORM_IDS)
def test_reduced_precision_matches_float64_reference(device, loss, form, dtype):
    """Every target form and hyper-parameter in 16/32-bit (test_instantiations.py crosses every kernel
    instantiation with weights and reductions)."""
    for hyper in loss.hypers:
        for reduction, weight in (("none", None), ("mean", "per-class")):
            w = None if weight is None else _weights(device)[weight].to(dtype)
            got, got_grad, ref, ref_grad = _compare(loss, form, device, reduction, hyper, dtype=dtype, weight=w)
            assert_close(got, ref, **_tolerances(dtype, reduction != "none"), what=f"{hyper} {reduction}")
            assert_close(got_grad, ref_grad, **_tolerances(dtype, False), what=f"{hyper} {reduction}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss,form", LOSS_FORMS, ids=LOSS_FORM_IDS)
def test_half_precision_is_the_float32_result_rounded_once(loss, form, dtype):
    """Bitwise: the 16-bit op is the float32 op on the widened inputs, rounded by torch's conversion."""
    x = logits("cpu", (16, 37), seed=6, scale=6.0).to(dtype)
    targets, kwargs = build_targets(loss, form, "cpu", x.shape)
    targets = cast_targets(targets, dtype)
    for hyper in loss.hypers:
        half, half_grad = loss_and_grad(loss.fused, x, targets, **kwargs, **hyper)
        single, single_grad = loss_and_grad(loss.fused, x.float(), cast_targets(targets, torch.float32), **kwargs,
                                            **hyper)
        assert torch.equal(half, single.to(dtype)), hyper
        assert torch.equal(half_grad, single_grad.to(dtype)), hyper


# --- the papers' closed forms, computed here independently ---------------------------------------


@pytest.mark.parametrize("gamma,beta", [(2.0, 1.0), (4.0, 0.0), (1.0, 0.0), (0.5, -1.5), (3.0, 2.0)])
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("form", ["hard", "ids"])
def test_star_derivative_is_appendix_b(device, form, gamma, beta, alpha):
    """dFL*/dx = alpha_t y (p*_t - 1), p*_t = sigmoid(gamma y x + beta), y = +-1 (Appendix B)."""
    x = logits(device, scale=2.0)
    targets, _ = build_targets(STAR, form, device)
    if form == "ids":
        positive = (targets.unsqueeze(-1) == torch.arange(SHAPE[-1], device=device)).double()
        kept = (targets != -100).unsqueeze(-1).double()
    else:
        positive, kept = targets, torch.ones_like(targets)
    y = 2 * positive - 1
    alpha_t = 1.0 if alpha is None else alpha * positive + (1 - alpha) * (1 - positive)
    appendix_b = alpha_t * y * (torch.sigmoid(gamma * y * x + beta) - 1) * kept
    appendix_a = alpha_t * -torch.log(torch.sigmoid(gamma * y * x + beta)) / gamma * kept
    loss, grad = loss_and_grad(STAR.fused, x, targets, gamma=gamma, beta=beta, alpha=alpha)
    assert_close(grad, appendix_b, rtol=1e-9, atol=1e-14)
    assert_close(loss, appendix_a, rtol=1e-9, atol=1e-14)
    if form == "hard":  # the sign: negative for positives, positive for negatives
        assert (grad[positive == 1] < 0).all() and (grad[positive == 0] > 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", ["hard", "ids", "ids-own-ignore"])
def test_focal_derivative_is_appendix_b(device, form, reduction):
    """The focal loss's gradient is the paper's closed form (Appendix B, written out in
    focal.reference.sigmoid_focal_loss_grad) for every exponent path, weighted and normalised."""
    x = logits(device)
    targets, kwargs = build_targets(FOCAL, form, device)
    kwargs.update(reduction=reduction, weight=_weights(device)["per-row" if form == "hard" else "per-class"])
    if reduction != "mean":
        kwargs["normalizer"] = 3.0
    for hyper in FOCAL.hypers:
        _, grad = loss_and_grad(FOCAL.fused, x, targets, **kwargs, **hyper)
        appendix_b = reference.sigmoid_focal_loss_grad(x, targets, **kwargs, **hyper)
        assert_close(grad, appendix_b, rtol=1e-9, atol=1e-13, what=f"{hyper}")


def test_focal_appendix_b_by_hand():
    """x = 0, a positive, alpha 0.25, gamma 2: p_t = 1/2, so FL = alpha (1 - p_t)^2 log 2 and
    dFL/dx = alpha y (1 - p_t)^2 (gamma p_t log p_t + p_t - 1) = 0.25 * 0.25 * (-log 2 - 0.5)."""
    x = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    loss = FOCAL.fused(x, torch.ones(1, 1, dtype=torch.float64), reduction="sum")
    loss.backward()
    assert_close(x.grad, torch.full((1, 1), 0.0625 * (-math.log(2) - 0.5), dtype=torch.float64), rtol=1e-14, atol=0)
    assert_close(loss.detach(), torch.tensor(0.0625 * math.log(2), dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "alpha,gamma,label_smoothing",
    [(0.3, 2.0, 0.0), (0.25, 2.3, 0.0), (0.25, 0.7, 0.1), (0.1, 1.1, 0.05), (0.25, 2.0, 1.0)],
)
@pytest.mark.parametrize("form", ["hard", "ids"])
def test_float64_keeps_hyperparameters_exact(device, form, alpha, gamma, label_smoothing):
    """float64 logits get float64 results: alpha, gamma and the smoothing (up to 1) are not rounded
    to float32 on the way; rounding 0.3 to float32 changes it by ~1e-8 relative, far more than
    float64 math may lose."""
    x = logits(device)
    targets, _ = build_targets(FOCAL, form, device)
    kwargs = dict(alpha=alpha, gamma=gamma, label_smoothing=label_smoothing)
    got, got_grad = loss_and_grad(FOCAL.fused, x, targets, **kwargs)
    want, want_grad = loss_and_grad(FOCAL.reference, x, targets, **kwargs)
    assert_close(got, want, **FLOAT64_TOL)
    assert_close(got_grad, want_grad, **FLOAT64_GRAD_TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("loss,hyper", [(FOCAL, dict(gamma=0.0, alpha=None)), (STAR, dict(gamma=1.0, beta=0.0)),
                                        (QFL, dict(beta=0.0))], ids=["focal", "star", "qfl"])
@pytest.mark.parametrize("form", ["hard", "soft", "dense-zeros"])
def test_bce_special_cases(device, loss, hyper, form, dtype):
    """FL at gamma 0 without alpha, FL* at gamma 1, beta 0 and QFL at beta 0 are the binary cross
    entropy with (soft) targets."""
    x = logits(device).to(dtype)
    builder = {"hard": STAR.targets["hard"], "soft": STAR.targets["soft"], "dense-zeros": QFL.targets["dense-zeros"]}
    targets = builder[form](device, SHAPE)[0].to(dtype)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    for reduction in REDUCTIONS:
        got, got_grad = loss_and_grad(loss.fused, x, targets, reduction=reduction, **hyper)
        bce, bce_grad = loss_and_grad(F.binary_cross_entropy_with_logits, x, targets, reduction=reduction)
        assert_close(got, bce, **tol)
        assert_close(got_grad, bce_grad, **tol)


@pytest.mark.parametrize("alpha,gamma", [(0.75, 2.0), (0.5, 0.0), (1.0, 1.0), (0.25, 1.5)])
@pytest.mark.parametrize("form", ["dense-zeros", "pair"])
def test_vfl_is_q_times_bce_on_positives_and_focal_on_negatives(device, form, alpha, gamma):
    x = logits(device)
    targets, kwargs = build_targets(VFL, form, device)
    loss, grad = loss_and_grad(VFL.fused, x, targets, alpha=alpha, gamma=gamma, **kwargs)
    if isinstance(targets, tuple):
        ids, scores = targets
        q = torch.where(ids.unsqueeze(-1) == torch.arange(SHAPE[-1], device=device), scores.unsqueeze(-1), 0.0)
        kept = (ids != -100).unsqueeze(-1).expand_as(x)
    else:
        q, kept = targets, torch.ones_like(x, dtype=torch.bool)
    p = torch.sigmoid(x)
    positive_loss = q * F.binary_cross_entropy_with_logits(x, q, reduction="none")
    negative_loss = alpha * p**gamma * -torch.log1p(-p)
    expected = torch.where(q > 0, positive_loss, negative_loss) * kept
    expected_grad = torch.where(q > 0, q * (p - q), alpha * p**gamma * (gamma * (1 - p) * -torch.log1p(-p) + p)) * kept
    assert_close(loss, expected, rtol=1e-10, atol=1e-14)
    assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_qfl_vanishes_where_sigma_equals_the_target(device, beta):
    """At y = sigma the modulating factor |y - sigma|^beta is 0 (beta > 0): no loss, and for beta >= 1
    (the kernel's choice at beta = 1, where there is no derivative) no gradient; at beta = 0 it is BCE."""
    x = torch.tensor([[0.0, 0.0], [0.0, 3.0]], dtype=torch.float64, device=device)
    y = torch.tensor([[0.5, 0.5], [0.5, 0.2]], dtype=torch.float64, device=device)  # sigmoid(0) = 0.5 exactly
    loss, grad = loss_and_grad(QFL.fused, x, y, beta=beta)
    at_target = y == torch.sigmoid(x)
    assert at_target.sum() == 3
    assert (loss[at_target] == 0).all() and loss[1, 1] > 0
    assert (grad[at_target] == 0).all() and grad[1, 1] > 0
    bce, _ = loss_and_grad(QFL.fused, x, y, beta=0.0)
    assert (bce[at_target] == math.log(2)).all()


# --- saturation, NaN, empty ----------------------------------------------------------------------

SATURATING = {
    torch.float32: [1e4, 1e30, 3e38],
    torch.float64: [1e4, 1e30, 3e38, 1e300],
    torch.float16: [1e4, 6e4],
    torch.bfloat16: [1e4, 1e30, 3e38],
}


@pytest.mark.parametrize("dtype", list(SATURATING), ids=str)
@pytest.mark.parametrize("loss,form", LOSS_FORMS, ids=LOSS_FORM_IDS)
def test_saturated_logits_are_finite_and_exact(device, loss, form, dtype):
    magnitudes = SATURATING[dtype]
    row = torch.tensor([v for m in magnitudes for v in (m, -m)] + [0.0, 1.0], dtype=torch.float64)
    x = row.repeat(6, 1).to(device, dtype)  # (6 rows, C) with every row of every kind
    for hyper in loss.hypers:
        got, got_grad, ref, ref_grad = _compare(loss, form, device, "none", hyper, x=x, dtype=dtype, upstream=False)
        assert torch.isfinite(got).all() and torch.isfinite(got_grad).all(), (hyper, got, got_grad)
        finite = torch.isfinite(ref) & torch.isfinite(ref_grad)
        tol = _tolerances(dtype, False)
        assert_close(got[finite], ref[finite], **tol, what=f"{hyper}")
        assert_close(got_grad[finite], ref_grad[finite], **tol, what=f"{hyper}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss,form", LOSS_FORMS, ids=LOSS_FORM_IDS)
def test_nan_logits_give_nan_exactly_there(device, loss, form, dtype):
    x = logits(device, (6, 4), seed=7).to(dtype)
    targets, kwargs = build_targets(loss, form, device, x.shape)
    targets = cast_targets(targets, dtype)
    ids = (targets[0] if isinstance(targets, tuple) else targets) if form.startswith(("ids", "pair")) else None
    kept_rows = torch.ones(6, dtype=torch.bool, device=device)
    if ids is not None:
        kept_rows = ids != kwargs.get("ignore_index", -100)
    x[0, 1] = x[3, 2] = math.nan  # rows 0 and 3 are kept in every form
    x[5, 0] = math.nan  # row 5 is ignored in the id forms: no NaN may come out of it
    expected_nan = torch.zeros(6, 4, dtype=torch.bool, device=device)
    expected_nan[0, 1] = expected_nan[3, 2] = True
    expected_nan[5, 0] = bool(kept_rows[5])
    for hyper in loss.hypers:
        loss_none, grad = loss_and_grad(loss.fused, x, targets, **kwargs, **hyper)
        assert torch.equal(torch.isnan(loss_none), expected_nan), (hyper, loss_none)
        assert torch.equal(torch.isnan(grad), expected_nan), (hyper, grad)
        for reduction in ("sum", "mean"):
            reduced, reduced_grad = loss_and_grad(loss.fused, x, targets, reduction=reduction, **kwargs, **hyper)
            assert math.isnan(reduced.item())
            assert torch.isnan(reduced_grad[expected_nan]).all()
            assert not torch.isnan(reduced_grad[~expected_nan]).any()


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0,), (2, 0, 4)], ids=str)
@pytest.mark.parametrize("loss,form", TWO_FORMS, ids=TWO_FORM_IDS)
def test_empty_inputs(device, loss, form, shape):
    """Empty logits give empty (or reduced) results as the reference: the mean of nothing is 0 with
    class ids, NaN with dense targets (torch.mean)."""
    for reduction in REDUCTIONS:
        got, got_grad, ref, ref_grad = _compare(loss, form, device, reduction, loss.default, shape=shape,
                                                x=torch.zeros(shape, dtype=torch.float64, device=device))
        assert_close(got, ref, rtol=1e-12, atol=0, what=reduction)
        if reduction == "mean":
            assert (got.item() == 0.0) if form.startswith(("ids", "pair")) else math.isnan(got.item())
        assert got_grad.shape == shape


# --- registration: opcheck, gradcheck, gradgradcheck ---------------------------------------------


def _raw_args(name, device, dtype=torch.float32, targets="ids", weight=None, row_weight=False, normalizer=None,
              reduction="sum", scale=1.0, compute_grad=True, lead=(), rows=6, cols=5, **hyper):
    """The raw op's arguments in schema order (csrc/focal_ops.h); logits require grad when the
    gradient is asked for, so that opcheck also runs the op's autograd."""
    g = generator(rows * 100 + cols)
    shape = (*lead, rows, cols)
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype).requires_grad_(compute_grad)
    scores = None
    if targets == "ids":
        t = torch.randint(-1, cols, shape[:-1], generator=g)
        if rows:
            t[..., 0] = -100
        t = t.to(device)
        if name in QUALITY_OPS:
            scores = torch.rand(shape[:-1], generator=g).to(device, dtype)
    else:
        t = torch.rand(shape, generator=g)
        t = (t.round() if targets == "hard" else t * (t > 0.4)).to(device, dtype)
    w = None
    if weight is not None:
        w = torch.rand(cols if weight == "class" else shape, generator=g).to(device, dtype)
    rw = torch.rand(shape[:-1], generator=g).to(device, dtype) if row_weight else None
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device)
    tail = (reduction, scale, compute_grad)
    if name == "sigmoid_focal_loss":
        return (x, t, w, rw, normalizer, hyper.get("alpha", 0.25), hyper.get("gamma", 2.0),
                hyper.get("label_smoothing", 0.0), -100, *tail)
    if name == "sigmoid_focal_loss_star":
        return (x, t, w, rw, normalizer, hyper.get("alpha", 0.25), hyper.get("gamma", 2.0), hyper.get("beta", 1.0),
                hyper.get("label_smoothing", 0.0), -100, *tail)
    if name == "quality_focal_loss":
        return (x, t, scores, w, rw, normalizer, hyper.get("beta", 2.0), -100, *tail)
    return (x, t, scores, w, rw, normalizer, hyper.get("alpha", 0.75), hyper.get("gamma", 2.0), -100, *tail)


RAW_SAMPLES = {
    "ids-sum": dict(),
    "ids-none-row-weight-3d": dict(reduction="none", row_weight=True, lead=(2,)),
    "ids-mean-no-grad-bfloat16": dict(reduction="mean", compute_grad=False, dtype=torch.bfloat16),
    "dense-none-general-float64": dict(targets="soft", reduction="none", gamma=1.5, beta=1.5, alpha=0.5,
                                       dtype=torch.float64),
    "hard-full-weight-normalizer-float16": dict(targets="hard", weight="full", normalizer=torch.tensor(7.0),
                                                scale=0.5, dtype=torch.float16, label_smoothing=0.1),
    "empty": dict(rows=0),
    "dense-none-int-normalizer-no-grad": dict(targets="soft", reduction="none", normalizer=torch.tensor(3),
                                              compute_grad=False),
}
# The fake kernel and the autograd registration are one for the four ops (focal/ops.py): the samples
# that change the outputs' shapes and dtypes run on the focal loss, one per target form on the others.
OTHER_OPS_SAMPLES = ["ids-sum", "dense-none-general-float64"]
OPCHECK_CASES = [("sigmoid_focal_loss", sample) for sample in RAW_SAMPLES] + [
    (name, sample) for name in ["sigmoid_focal_loss_star", "quality_focal_loss", "varifocal_loss"]
    for sample in OTHER_OPS_SAMPLES]
QUALITY_OPS = ("quality_focal_loss", "varifocal_loss")
RAW_OPS = ["sigmoid_focal_loss", "sigmoid_focal_loss_star", *QUALITY_OPS]


@pytest.mark.parametrize("name,sample", OPCHECK_CASES, ids=[f"{n}-{s}" for n, s in OPCHECK_CASES])
def test_opcheck(device, name, sample):
    """Schema, fake kernel, autograd registration and AOT dispatch with dynamic shapes."""
    spec = dict(RAW_SAMPLES[sample])
    if name in QUALITY_OPS:
        spec.pop("label_smoothing", None)  # the quality losses take none
    torch.library.opcheck(getattr(torch.ops.focal, name).default, _raw_args(name, device, **spec))


@pytest.mark.parametrize("name", RAW_OPS)
def test_raw_op_returns_loss_and_gradient(name):
    fused = {"sigmoid_focal_loss": FOCAL, "sigmoid_focal_loss_star": STAR, "quality_focal_loss": QFL,
             "varifocal_loss": VFL}[name]
    args = _raw_args(name, "cpu")
    op = getattr(torch.ops.focal, name).default
    loss, grad = op(*args)
    x = args[0].detach().clone().requires_grad_()
    targets = (args[1], args[2]) if name in QUALITY_OPS else args[1]
    expected = fused.fused(x, targets, reduction="sum", **fused.default)
    expected.backward()
    assert_close(loss, expected.detach(), rtol=1e-6, atol=0)
    assert_close(grad, x.grad, rtol=1e-6, atol=0)
    loss_only, no_grad = op(*args[:-1], False)
    assert torch.equal(loss_only, loss) and no_grad.shape == (0,)


GRAD_SHAPE = (6, 2)  # 12 logits, every kind of row with class ids: 0, 1, background, ignored, 0, 1
GRADCHECK_CASES = {
    "none": ("none", None, None),
    "sum-per-class": ("sum", lambda d: torch.tensor([0.5, 2.0], dtype=torch.float64, device=d), None),
    "mean-full": ("mean", lambda d: torch.rand(GRAD_SHAPE, generator=generator(15), dtype=torch.float64).to(d), None),
    "sum-per-row-tensor-normalizer": (
        "sum", lambda d: torch.rand((6, 1), generator=generator(16), dtype=torch.float64).to(d) + 0.5,
        lambda d: torch.tensor(3.0, device=d),
    ),
    "none-scalar-weight-number-normalizer": ("none", lambda d: torch.tensor(1.5, dtype=torch.float64, device=d),
                                             lambda d: 3.0),
}


def _gradcheck_problem(loss, form, device, case):
    reduction, weight, normalizer = GRADCHECK_CASES[case]
    x = logits(device, GRAD_SHAPE, scale=1.5).requires_grad_()
    targets, kwargs = build_targets(loss, form, device, GRAD_SHAPE)
    kwargs.update(reduction=reduction)
    if weight is not None:
        kwargs["weight"] = weight(device)
    if normalizer is not None:
        kwargs["normalizer"] = normalizer(device)
    return x, targets, kwargs


# gradcheck runs float64 only; each target form meets one reduction / weight / normaliser case, in turn.
GRADCHECK_FORMS = [(loss, form, list(GRADCHECK_CASES)[i % len(GRADCHECK_CASES)])
                   for i, (loss, form) in enumerate(LOSS_FORMS)]


@pytest.mark.parametrize("loss,form,case", GRADCHECK_FORMS, ids=[f"{lo}-{f}-{c}" for lo, f, c in GRADCHECK_FORMS])
def test_gradcheck(device, loss, form, case):
    """The fused analytic gradient against finite differences of the fused forward."""
    x, targets, kwargs = _gradcheck_problem(loss, form, device, case)
    for hyper in loss.hypers[:3]:  # every hyper-parameter's gradient is compared with the reference above
        assert torch.autograd.gradcheck(lambda x: loss.fused(x, targets, **kwargs, **hyper), (x,))


GRADGRAD_FORMS = [(loss, form, ("none", "sum-per-row-tensor-normalizer")[i % 2])
                  for i, (loss, form) in enumerate(LOSS_FORMS)]


@pytest.mark.parametrize("loss,form,case", GRADGRAD_FORMS, ids=[f"{lo}-{f}-{c}" for lo, f, c in GRADGRAD_FORMS])
def test_gradgradcheck(device, loss, form, case):
    """Second derivatives (create_graph=True) against finite differences of the first, with a fast
    (random projection) gradgradcheck: the double backward recomputes through the reference."""
    x, targets, kwargs = _gradcheck_problem(loss, form, device, case)
    for hyper in loss.hypers[:3]:
        if loss is QFL and 0 < hyper["beta"] < 2:
            # |y - sigma|^beta has an unbounded second derivative near y = sigma for beta < 2;
            # finite differences there measure nothing but their step.
            continue
        fn = lambda x: loss.fused(x, targets, **kwargs, **hyper)  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("loss,form,case", GRADCHECK_FORMS, ids=[f"{lo}-{f}-{c}" for lo, f, c in GRADCHECK_FORMS])
def test_hessian_matches_the_reference(loss, form, case):
    """The second derivatives (create_graph=True) are those of focal.reference differentiated twice,
    for every exponent path, target form, weight and normaliser."""
    x, targets, kwargs = _gradcheck_problem(loss, form, "cpu", case)
    x = x.detach()
    for hyper in loss.hypers:
        got = torch.autograd.functional.hessian(lambda x: loss.fused(x, targets, **kwargs, **hyper).sum(), x)
        want = torch.autograd.functional.hessian(lambda x: loss.reference(x, targets, **kwargs, **hyper).sum(), x)
        assert got.abs().max() > 0, hyper  # never silently zero
        assert_close(got, want, rtol=1e-8, atol=1e-11, what=f"{hyper}")


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_func_hessian(loss):
    """torch.func.hessian (jacfwd of jacrev) differentiates the op's backward again under transforms."""
    x = logits("cpu", (3, 4))
    targets = torch.rand(3, 4, generator=generator(17), dtype=torch.float64)
    got = torch.func.hessian(lambda x: loss.fused(x, targets, reduction="sum", **loss.default))(x)
    want = torch.func.hessian(lambda x: loss.reference(x, targets, reduction="sum", **loss.default))(x)
    assert_close(got, want, rtol=1e-8, atol=1e-11)


# --- torch.compile, torch.func, modules -----------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_compile_fullgraph_forward_and_backward(device, loss):
    form = loss.ids_form

    def loss_fn(x, targets, weight):
        ids = targets[0] if isinstance(targets, tuple) else targets
        num_pos = (ids >= 0).sum().clamp(min=1)  # a tensor: no host sync
        return loss.fused(x, targets, reduction="sum", weight=weight, normalizer=num_pos, **loss.default)

    torch._dynamo.reset()
    # Inductor's code around a custom op is the same for the four: generated once, traced for the others.
    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor" if loss is FOCAL else "aot_eager")
    targets, _ = build_targets(loss, form, device)
    targets = cast_targets(targets, torch.float32)
    weight = torch.rand(SHAPE[-1], generator=generator(8)).to(device)
    for seed in (0, 1):
        x = logits(device, seed=seed).float()
        eager, eager_grad = loss_and_grad(loss_fn, x, targets, weight=weight)
        got, got_grad = loss_and_grad(compiled, x, targets, weight=weight)
        assert_close(got, eager, rtol=1e-6, atol=1e-7)
        assert_close(got_grad, eager_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_compile_dense_targets_none_reduction(device, loss):
    form = loss.dense_form
    hyper = loss.hypers[2]  # a general path

    def loss_fn(x, targets):
        return loss.fused(x, targets, **hyper)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    targets, _ = build_targets(loss, form, device)
    x = logits(device).float()
    eager, eager_grad = loss_and_grad(loss_fn, x, targets.float(), upstream_for(x).float())
    got, got_grad = loss_and_grad(compiled, x, targets.float(), upstream_for(x).float())
    assert_close(got, eager, rtol=1e-6, atol=1e-7)
    assert_close(got_grad, eager_grad, rtol=1e-6, atol=1e-7)


def _batched_targets(loss, device, batch=3):
    """Targets for (batch, rows, C) logits, with a per-sample leading dimension."""
    stacked = [build_targets(loss, loss.ids_form, device, (4, 4))[0] for _ in range(batch)]
    if not isinstance(stacked[0], tuple):
        return torch.stack(stacked)
    return torch.stack([s[0] for s in stacked]), torch.stack([s[1] for s in stacked])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_func_grad_vmap_and_per_sample_gradients(device, loss, reduction):
    x = logits(device, (3, 4, 4), seed=2)
    targets = _batched_targets(loss, device)

    def sample_loss(x, t):
        return loss.fused(x, t, reduction=reduction, **loss.default).sum()

    def reference_loss(x, t):
        return loss.reference(x, t, reduction=reduction, **loss.default).sum()

    def sample(b):
        return (targets[0][b], targets[1][b]) if isinstance(targets, tuple) else targets[b]

    got = torch.func.vmap(sample_loss)(x, targets)
    per_sample = torch.func.vmap(torch.func.grad(sample_loss))(x, targets)
    for b in range(3):
        assert_close(got[b], reference_loss(x[b], sample(b)), rtol=1e-10, atol=1e-13)
        want = torch.func.grad(reference_loss)(x[b], sample(b))
        assert_close(torch.func.grad(sample_loss)(x[b], sample(b)), want, rtol=1e-10, atol=1e-13)
        assert_close(per_sample[b], want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,form", TWO_FORMS, ids=TWO_FORM_IDS)
def test_forward_mode_jvp(device, loss, form, reduction):
    x = logits(device)
    v = torch.randn(x.shape, generator=generator(12), dtype=torch.float64).to(device)
    targets, kwargs = build_targets(loss, form, device)
    kwargs.update(loss.default, reduction=reduction)
    _, want = torch.func.jvp(lambda x: loss.reference(x, targets, **kwargs), (x,), (v,))
    _, got = torch.func.jvp(lambda x: loss.fused(x, targets, **kwargs), (x,), (v,))
    assert want.abs().max() > 0
    assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss,form", TWO_FORMS, ids=TWO_FORM_IDS)
def test_module_equals_function(device, loss, form):
    x = logits(device).float().requires_grad_()
    targets, kwargs = build_targets(loss, form, device)
    targets = cast_targets(targets, torch.float32)
    weight = _weights(device)["per-class"].float()
    for hyper in loss.hypers:
        for reduction, normalizer in (("none", 2.0), ("sum", torch.tensor(3.0)), ("mean", None)):
            module = loss.module(**hyper, reduction=reduction, **kwargs)
            assert all(f"{k}={v}" in repr(module) for k, v in hyper.items())
            by_module = module(x, targets, weight=weight, normalizer=normalizer)
            by_function = loss.fused(x, targets, reduction=reduction, weight=weight, normalizer=normalizer,
                                     **kwargs, **hyper)
            assert torch.equal(by_module, by_function)
            (g_module,) = torch.autograd.grad(by_module.sum(), x)
            (g_function,) = torch.autograd.grad(by_function.sum(), x)
            assert torch.equal(g_module, g_function)
    assert list(loss.module().parameters()) == [] and list(loss.module().buffers()) == []


def test_pair_scores_of_background_and_ignored_rows_are_not_read():
    x = logits("cpu", (6, 4))
    ids = class_ids("cpu", (6, 4))
    scores = torch.rand(6, dtype=torch.float64, generator=generator(14))
    garbage = torch.where(ids < 0, torch.full_like(scores, math.nan), scores)
    for loss in (QFL, VFL):
        for reduction in REDUCTIONS:
            clean, clean_grad = loss_and_grad(loss.fused, x, (ids, scores), reduction=reduction)
            dirty, dirty_grad = loss_and_grad(loss.fused, x, (ids, garbage), reduction=reduction)
            assert torch.equal(clean, dirty) and torch.equal(clean_grad, dirty_grad)
