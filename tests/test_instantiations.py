"""Every kernel instantiation of every loss op against the float64 reference.

An instantiation is what selects compiled code or a branch of it (tests/instantiations.py): the loss,
the logits' dtype, the target form, the exponent's fast path (0, 1, 2, general), the weight form, the
reduction and whether the gradient is computed. Each test takes one loss and dtype and runs the raw
op (``torch.ops.focal.*``) over the product of the rest on a small problem whose rows hold full
vectors, pairs of them and a tail at every vector width, with a positive in each part: the loss and
gradient of "none", "sum" and "mean" against the reference, and the loss without the gradient
bitwise equal to the loss with it. The other tests choose their cases by what they check; this one
makes sure that none of the code is left out (test_cpu_isa.py runs it for every instruction-set copy).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import focal  # noqa: F401  (loads the operators)
from family_cases import FOCAL, QFL, STAR, VFL, assert_close, generator
from focal import reference

@pytest.fixture(autouse=True)
def one_thread():
    """Problems this small run in one work item: no thread hand-offs (which cost milliseconds on a busy
    machine) for thousands of calls. The split across threads has tests of its own (bitwise equal sums
    for any thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EXPONENTS = (0.0, 1.0, 2.0, 2.5)  # the kernels' fast paths and the general power
REDUCTIONS = ("none", "sum", "mean")
ROWS, COLS = 5, 37
IDS = [-1, -100, 0, 18, 36]  # background, ignored, and a positive in the first, second and last vectors

# op name -> (row of tests/family_cases.py, target forms its kernels take, exponents, hyper-parameters of
# an exponent g). FL*'s gamma is a plain factor, compiled once for every value: one value of it.
SIGMOID_OPS = {
    "sigmoid_focal_loss": (FOCAL, ("float", "ids", "ids_smoothed"), EXPONENTS,
                           lambda g: dict(alpha=0.25, gamma=g)),
    "sigmoid_focal_loss_star": (STAR, ("float", "ids", "ids_smoothed"), (1.5,),
                                lambda g: dict(alpha=0.25, gamma=g, beta=0.5)),
    "quality_focal_loss": (QFL, ("float", "ids_scores"), EXPONENTS, lambda g: dict(beta=g)),
    "varifocal_loss": (VFL, ("float", "ids_scores"), EXPONENTS, lambda g: dict(alpha=0.75, gamma=g)),
}
SIGMOID_WEIGHTS = ("none", "class", "full", "row", "full+row")


def _tolerances(dtype, reduced: bool):
    """float32 math (float64 for float64 data), the "none" loss and the gradient rounded to dtype."""
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-12)
    return dict(rtol=1e-5 if reduced else 1e-5 + torch.finfo(dtype).eps, atol=4e-6)


def _raw_sigmoid(name, x, targets, scores, weight, row_weight, hyper, smoothing, reduction, compute_grad):
    tail = (-100, reduction, 1.0, compute_grad)
    op = getattr(torch.ops.focal, name).default
    if name == "sigmoid_focal_loss":
        return op(x, targets, weight, row_weight, None, hyper["alpha"], hyper["gamma"], smoothing, *tail)
    if name == "sigmoid_focal_loss_star":
        return op(x, targets, weight, row_weight, None, hyper["alpha"], hyper["gamma"], hyper["beta"], smoothing,
                  *tail)
    if name == "quality_focal_loss":
        return op(x, targets, scores, weight, row_weight, None, hyper["beta"], *tail)
    return op(x, targets, scores, weight, row_weight, None, hyper["alpha"], hyper["gamma"], *tail)


def _check_reductions(dtype, run, want_none, want_grad, mean_count, what):
    """The op's three reductions, with and without the gradient, against the reference's "none" loss
    and the gradient of its sum; "mean" divides both by ``mean_count``."""
    for reduction in REDUCTIONS:
        loss, grad = run(reduction, True)
        want = {"none": want_none, "sum": want_none.sum(), "mean": want_none.sum() / mean_count}[reduction]
        scale = 1 / mean_count if reduction == "mean" else 1.0
        assert loss.dtype == (dtype if reduction == "none" else torch.float64 if dtype == torch.float64
                              else torch.float32), what
        assert_close(loss, want, **_tolerances(dtype, reduction != "none"), what=f"{what} {reduction} loss")
        assert_close(grad, want_grad * scale, **_tolerances(dtype, False), what=f"{what} {reduction} grad")
        loss_only, no_grad = run(reduction, False)
        assert torch.equal(loss_only, loss) or (loss.isnan().all() and loss_only.isnan().all()), what
        assert no_grad.shape == (0,), what


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SIGMOID_OPS))
def test_sigmoid_family_instantiations(name, dtype):
    loss, forms, exponents, hyper_of = SIGMOID_OPS[name]
    g = generator(len(name))
    x = (torch.randn(ROWS, COLS, generator=g, dtype=torch.float64) * 3).to(dtype)
    soft = torch.rand(ROWS, COLS, generator=g, dtype=torch.float64)
    soft[::2] = soft[::2].round()  # hard and soft rows
    ids = torch.tensor(IDS)
    scores = (torch.rand(ROWS, generator=g, dtype=torch.float64)).to(dtype)
    class_weight = (torch.rand(COLS, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    full_weight = (torch.rand(ROWS, COLS, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    row_weight = (torch.rand(ROWS, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    weights = {"none": (None, None), "class": (class_weight, None), "full": (full_weight, None),
               "row": (None, row_weight), "full+row": (full_weight, row_weight)}
    for form, exponent, weight_form in itertools.product(forms, exponents, SIGMOID_WEIGHTS):
        hyper = hyper_of(exponent)
        smoothing = 0.125 if form == "ids_smoothed" else 0.0
        targets = soft.to(dtype) if form == "float" else ids
        weight, rows = weights[weight_form]
        # The reference takes one weight broadcast to the logits.
        ref_weight = torch.ones(ROWS, COLS, dtype=torch.float64)
        if weight is not None:
            ref_weight = ref_weight * weight.double()
        if rows is not None:
            ref_weight = ref_weight * rows.double().unsqueeze(-1)
        ref_targets = targets.double() if form == "float" else (ids, scores.double()) if form == "ids_scores" else ids
        extra = dict(label_smoothing=smoothing) if loss in (FOCAL, STAR) else {}
        xr = x.double().requires_grad_()
        want = loss.reference(xr, ref_targets, reduction="none", weight=ref_weight, **hyper, **extra)
        (want_grad,) = torch.autograd.grad(want.sum(), xr)
        mean_count = ROWS * COLS if form == "float" else sum(i != -100 for i in IDS) * COLS

        def run(reduction, compute_grad):
            pair_scores = scores if form == "ids_scores" else None
            return _raw_sigmoid(name, x, targets, pair_scores, weight, rows, hyper, smoothing, reduction, compute_grad)

        _check_reductions(dtype, run, want.detach(), want_grad, mean_count, f"{form} {hyper} weight={weight_form}")


SOFTMAX_LAYOUTS = {"rows": (ROWS, COLS), "spatial": (2, 6, 3, 5)}
SOFTMAX_WEIGHTS = ("none", "weight", "alpha", "weight+alpha")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_instantiations(dtype):
    op = torch.ops.focal.softmax_focal_loss.default
    for layout, shape in SOFTMAX_LAYOUTS.items():
        g = generator(len(shape))
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
        classes = shape[1]
        target_shape = shape[:1] + shape[2:]
        t = torch.randint(0, classes, target_shape, generator=g)
        t.view(-1)[::4] = -100
        class_weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        alpha = torch.rand(classes, generator=g, dtype=torch.float64)
        for smoothing, gamma, weight_form in itertools.product((0.0, 0.1), EXPONENTS, SOFTMAX_WEIGHTS):
            weight = class_weight if "weight" in weight_form else None
            alphas = alpha.to(dtype) if "alpha" in weight_form else None
            kwargs = dict(gamma=gamma, label_smoothing=smoothing,
                          weight=None if weight is None else weight.double(),
                          alpha=None if alphas is None else alphas.double())
            what = f"{layout} eps={smoothing} gamma={gamma} {weight_form}"
            expected = {}
            for reduction in ("none", "mean"):  # "sum" is the sum of "none"; "mean" divides by weights
                xr = x.double().requires_grad_()
                want = reference.softmax_focal_loss(xr, t, reduction=reduction, **kwargs)
                expected[reduction] = (want.detach(), torch.autograd.grad(want.sum(), xr)[0])
            expected["sum"] = (expected["none"][0].sum(), expected["none"][1])
            for reduction, (want, want_grad) in expected.items():
                loss, grad = op(x, t, weight, alphas, None, 1.0, gamma, smoothing, -100, reduction, 1.0, True)
                assert_close(loss, want, **_tolerances(dtype, reduction != "none"), what=f"{what} {reduction}")
                assert_close(grad, want_grad, **_tolerances(dtype, False), what=f"{what} {reduction} grad")
                loss_only, no_grad = op(x, t, weight, alphas, None, 1.0, gamma, smoothing, -100, reduction, 1.0, False)
                assert torch.equal(loss_only, loss) and no_grad.shape == (0,), what
