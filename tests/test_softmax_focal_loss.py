"""focal.softmax_focal_loss: the fused operator against its float64 reference and F.cross_entropy.

The oracle is focal.reference.softmax_focal_loss evaluated in float64 on the very values the op sees
(16-bit logits widened), differentiated by autograd. That reference takes the gradient of the row
maximum through torch.amax, which splits it between tied maxima: at exact ties its gradient is not
the derivative of the loss. Problems here therefore give every row a unique maximum (`untie`); ties
themselves are tested against F.cross_entropy, whose gradient is right there.
"""

from __future__ import annotations


import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import focal
from conftest import requires_cuda
from focal import reference

OP = torch.ops.focal.softmax_focal_loss.default
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
GAMMAS = [0.0, 1.0, 2.0, 2.5]  # the kernels' exponent paths: 0, 1, 2 and the general power
# (N, C) with vector tails, segmentation layouts (classes `inner` apart), unbatched (C,)
SHAPES = {
    "N,C": (9, 37),
    "N,C=80": (5, 80),
    "N,C=1": (4, 1),
    "N,C,d": (3, 5, 7),
    "N,C,H,W": (2, 21, 5, 9),
    "C": (13,),
}


# ---- helpers --------------------------------------------------------------------------------------


def class_dim(shape) -> int:
    return 0 if len(shape) == 1 else 1


def untie(x: torch.Tensor) -> torch.Tensor:
    """x with the maximum of every row (along the class dimension) raised by 1: unique, in x's dtype."""
    d = class_dim(x.shape)
    idx = x.argmax(d, keepdim=True)
    return x.scatter(d, idx, x.gather(d, idx) + 1)


def problem(shape, dtype, seed=0, ignore="hit", scale=3.0):
    """Untied logits of `shape` in `dtype`, class ids (about a fifth ignored with -100 when
    ignore='hit'), and ignore_index."""
    g = torch.Generator().manual_seed(seed)
    d = class_dim(shape)
    classes = shape[d]
    target_shape = tuple(s for i, s in enumerate(shape) if i != d)
    x = untie((torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype))
    t = torch.randint(0, classes, target_shape, generator=g)
    if ignore == "hit" and t.dim() > 0:
        t = torch.where(torch.rand(target_shape, generator=g) < 0.2, torch.full_like(t, -100), t)
    return x, t


def tolerances(dtype):
    """(rtol, atol relative to the largest value) of outputs computed in float32 (float64) math and
    rounded once to `dtype`."""
    if dtype == torch.float64:
        return 1e-10, 1e-12
    return torch.finfo(dtype).eps + 2e-5, 2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps / 4


def reference_loss_and_grad(x, t, upstream=None, **kwargs):
    """The float64 reference's loss and d(sum(upstream * loss))/dx at the values of x."""
    xd = x.detach().double().requires_grad_()
    kw = dict(kwargs)
    for name in ("weight", "alpha"):
        if isinstance(kw.get(name), torch.Tensor):
            kw[name] = kw[name].double()
    loss = reference.softmax_focal_loss(xd, t, **kw)
    (grad,) = torch.autograd.grad(loss.sum() if upstream is None else (loss * upstream).sum(), xd)
    return loss.detach(), grad


def op_loss_and_grad(x, t, upstream=None, **kwargs):
    xo = x.detach().clone().requires_grad_()
    loss = focal.softmax_focal_loss(xo, t, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum() if upstream is None else (loss * upstream.to(loss.dtype)).sum(), xo)
    return loss.detach(), grad


def assert_matches_reference(x, t, dtype, upstream=None, **kwargs):
    loss, grad = op_loss_and_grad(x, t, upstream, **kwargs)
    want_loss, want_grad = reference_loss_and_grad(x, t, upstream, **kwargs)
    rtol, atol = tolerances(dtype)
    reduced = kwargs.get("reduction", "mean") != "none"
    reduced_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == (reduced_dtype if reduced else dtype)
    assert grad.dtype == dtype and grad.shape == x.shape
    loss_rtol = rtol if not reduced or dtype == torch.float64 else 2e-5  # reduced losses are float32 sums
    loss_atol = atol * want_loss.abs().max().item() + 1e-30
    torch.testing.assert_close(loss.double(), want_loss, rtol=loss_rtol, atol=loss_atol)
    torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=atol * want_grad.abs().max().item() + 1e-30)


# ---- against the reference ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, shape):
    """Every dtype and shape (test_instantiations.py crosses every kernel instantiation); the rest
    of the arguments rotate over the cases: gamma path, weight, alpha (none, a number, a tensor),
    label smoothing, reduction."""
    i = DTYPES.index(dtype) + len(DTYPES) * list(SHAPES.values()).index(shape)
    gamma = GAMMAS[(i + i // len(DTYPES)) % len(GAMMAS)]
    x, t = problem(shape, dtype, seed=i)
    classes = shape[class_dim(shape)]
    g = torch.Generator().manual_seed(100 + i)
    weight = [None, torch.rand(classes, generator=g) + 0.2][i % 2]
    alpha = [None, 0.25, torch.rand(classes, generator=g, dtype=torch.float64)][i % 3]
    smoothing = [0.0, 0.1, 0.0, 1.0][i % 4] if classes > 1 else 0.0
    reduction = ["none", "mean", "sum"][(i // 2) % 3]
    upstream = torch.rand(t.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    assert_matches_reference(x, t, dtype, upstream, alpha=alpha, gamma=gamma, reduction=reduction, weight=weight,
                             label_smoothing=smoothing)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ignore_index_inside_the_classes(dtype, smoothing):
    """An ignore_index in [0, C) ignores that class's elements, whose probability still enters the
    smoothing term of the others."""
    x, t = problem((40, 6), dtype, ignore="none")
    assert (t == 2).any()
    assert_matches_reference(x, t, dtype, ignore_index=2, label_smoothing=smoothing, weight=torch.rand(6) + 0.5)


@pytest.mark.parametrize("normalizer", ["number", "cpu_tensor", "int_tensor"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_normalizer(normalizer, reduction):
    x, t = problem((20, 7), torch.float32)
    value = {"number": 7.5, "cpu_tensor": torch.tensor(7.5), "int_tensor": torch.tensor([8])}[normalizer]
    assert_matches_reference(x, t, torch.float32, reduction=reduction, normalizer=value, alpha=0.5)


def test_long_rows_and_many_rows():
    """Rows longer than a work item, and more rows than one item holds (several parallel items)."""
    for shape in [(3, 20000), (5000, 21), (2, 3, 70, 70)]:
        x, t = problem(shape, torch.float32, scale=2.0)
        assert_matches_reference(x, t, torch.float32, reduction="sum", gamma=2.0)


# ---- F.cross_entropy at gamma = 0 -----------------------------------------------------------------

CE_SHAPES = {"N,C": (6, 5), "N,C,d1,d2": (3, 4, 2, 3), "C": (5,)}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("ignore", ["none", "hit", "class"])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("shape", CE_SHAPES.values(), ids=CE_SHAPES.keys())
def test_gamma_0_is_cross_entropy(shape, with_weight, ignore, smoothing, reduction):
    """Every argument combination of cross_entropy, values and gradients, in float64 (ties in the
    logits included: half of them are rounded to integers)."""
    g = torch.Generator().manual_seed(len(shape) * 7 + int(with_weight))
    classes = shape[class_dim(shape)]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    x = torch.where(torch.rand(shape, generator=g) < 0.5, x.round(), x)
    t_shape = tuple(s for i, s in enumerate(shape) if i != class_dim(shape))
    t = torch.randint(0, classes, t_shape, generator=g)
    ignore_index = -100
    if ignore == "hit" and t.dim() > 0:
        t.view(-1)[::3] = -100
    elif ignore == "class":
        ignore_index = 1
        if t.dim() > 0:
            t.view(-1)[0] = 1
    weight = torch.rand(classes, generator=g, dtype=torch.float64) + 0.1 if with_weight else None
    kwargs = dict(weight=weight, ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)
    if reduction == "mean" and bool((t == ignore_index).all()):
        pytest.skip("every element ignored: the documented difference (0 here, NaN for cross_entropy)")
    upstream = torch.rand(t.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    loss, grad = op_loss_and_grad(x, t, upstream, gamma=0.0, **kwargs)
    xc = x.clone().requires_grad_()
    want = F.cross_entropy(xc, t, **kwargs)
    (want_grad,) = torch.autograd.grad(want.sum() if upstream is None else (want * upstream).sum(), xc)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(200, 80), (4, 21, 16, 16)])
def test_gamma_0_is_cross_entropy_in_float32(shape):
    x, t = problem(shape, torch.float32)
    loss, grad = op_loss_and_grad(x, t, gamma=0.0, label_smoothing=0.1)
    xc = x.clone().requires_grad_()
    want = F.cross_entropy(xc, t, label_smoothing=0.1)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, xc.grad, rtol=1e-4, atol=1e-7)


def test_module_equals_function():
    x, t = problem((2, 6, 4, 4), torch.float32, ignore="none")
    weight, alpha = torch.rand(6) + 0.5, torch.rand(6)
    criterion = focal.SoftmaxFocalLoss(alpha, gamma=1.5, weight=weight, ignore_index=3, label_smoothing=0.05)
    want = focal.softmax_focal_loss(x, t, alpha, 1.5, weight=weight, ignore_index=3, label_smoothing=0.05)
    assert torch.equal(criterion(x, t), want)
    assert set(dict(criterion.named_buffers())) == {"weight", "alpha"}
    summed = focal.SoftmaxFocalLoss(0.25, reduction="sum")
    assert torch.equal(summed(x, t, normalizer=4.0), focal.softmax_focal_loss(x, t, 0.25, reduction="sum") / 4)
    assert "gamma=2.0" in repr(summed)


def test_all_ignored_and_empty():
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.full((4,), -100)
    loss = focal.softmax_focal_loss(x, t)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(4, 3))
    empty = torch.randn(0, 3, requires_grad=True)
    for reduction, want in (("mean", torch.tensor(0.0)), ("sum", torch.tensor(0.0)), ("none", torch.zeros(0))):
        assert torch.equal(focal.softmax_focal_loss(empty, torch.zeros(0, dtype=torch.long), reduction=reduction), want)


def test_non_contiguous_input_and_int32_target():
    x, t = problem((6, 11, 5), torch.float32)
    xt = x.transpose(0, 2).contiguous().transpose(0, 2)
    assert not xt.is_contiguous()
    want_loss, want_grad = op_loss_and_grad(x, t, reduction="sum")
    loss, grad = op_loss_and_grad(xt, t.int(), reduction="sum")
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)


# ---- numerics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturated_logits_are_finite_and_exact(dtype, gamma):
    """Logits of +-1e4 (every exp underflows but the maximum's), and a near-certain target (1 - p of
    about e^-30, where 1 - p by subtraction is 0 in float32): finite, equal to the reference."""
    x = torch.tensor(
        [[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 3.0, -2.0], [30.0, 0.0, -1.0, -1e4], [0.0, 30.0, 1.0, 2.0]], dtype=dtype
    )
    for t in (torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 2, 1])):
        for smoothing in (0.0, 0.1):
            loss, grad = op_loss_and_grad(x, t, gamma=gamma, reduction="none", label_smoothing=smoothing)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            assert_matches_reference(x, t, dtype, gamma=gamma, reduction="none", label_smoothing=smoothing)
    # 1 - p of the certain class is e^-20 (e^-30 in float64), not 0: its focal term is (1 - p)^(gamma + 1)
    if dtype in (torch.float32, torch.float64):
        z = 30.0 if dtype == torch.float64 else 20.0
        loss, _ = op_loss_and_grad(torch.tensor([[z, 0.0]], dtype=dtype), torch.tensor([0]), gamma=gamma,
                                   reduction="none")
        e = torch.tensor(-z, dtype=torch.float64).exp()
        exact = (e / (1 + e)) ** gamma * e.log1p()  # (1 - p)^gamma (-log p)
        torch.testing.assert_close(loss.double()[0], exact, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_nan_in_a_row_gives_nan_for_that_element_only():
    x, t = problem((6, 9), torch.float32, ignore="none")
    x[1, 4] = float("nan")
    x[3, 0] = float("nan")
    t[3] = -100  # an ignored element contributes neither loss nor gradient, NaN or not
    for smoothing in (0.0, 0.1):
        loss, grad = op_loss_and_grad(x, t, reduction="none", label_smoothing=smoothing)
        assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
        assert loss[3] == 0 and torch.equal(grad[3], torch.zeros(9))
        rows = [0, 2, 4, 5]
        assert torch.isfinite(loss[rows]).all() and torch.isfinite(grad[rows]).all()
        assert torch.isnan(focal.softmax_focal_loss(x, t, label_smoothing=smoothing))
    # the same along positions of a segmentation layout
    xs, ts = problem((2, 5, 3, 4), torch.float32, ignore="none")
    xs[1, 2, 0, 3] = float("nan")
    loss, grad = op_loss_and_grad(xs, ts, reduction="none")
    assert torch.isnan(loss[1, 0, 3]) and torch.isnan(grad[1, :, 0, 3]).all()
    assert torch.isnan(loss).sum() == 1 and torch.isnan(grad).sum() == 5


def test_minus_infinity_logits_are_excluded_classes():
    """A class at -inf has probability 0, as in cross_entropy."""
    x = torch.tensor([[0.5, float("-inf"), 2.0], [float("-inf"), 1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0, 1])
    loss, grad = op_loss_and_grad(x, t, gamma=0.0, reduction="sum")
    xc = x.clone().requires_grad_()
    want = F.cross_entropy(xc, t, reduction="sum")
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grad, xc.grad)


# ---- autograd, registration, compile --------------------------------------------------------------

GRADCHECK_CASES = {
    "rows": dict(shape=(5, 4), kwargs=dict(gamma=2.0, alpha=0.25)),
    "rows-general-gamma-smoothing-weight": dict(shape=(5, 4), kwargs=dict(gamma=1.5, label_smoothing=0.2)),
    "segmentation-none-alpha-tensor": dict(shape=(2, 3, 2, 2), kwargs=dict(gamma=0.5, reduction="none")),
    "unbatched-sum-normalizer": dict(shape=(6,), kwargs=dict(gamma=1.0, reduction="sum",
                                                             normalizer=torch.tensor(3.0))),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES.values(), ids=GRADCHECK_CASES.keys())
def test_gradcheck_and_gradgradcheck(case):
    shape = case["shape"]
    x, t = problem(shape, torch.float64, ignore="hit")
    classes = shape[class_dim(shape)]
    kwargs = dict(case["kwargs"], weight=torch.rand(classes, dtype=torch.float64) + 0.5)
    if "alpha-tensor" in str(case):
        kwargs["alpha"] = torch.rand(classes, dtype=torch.float64)
    x.requires_grad_()
    fn = lambda x: focal.softmax_focal_loss(x, t, **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_hessian_equals_the_reference(smoothing):
    """Second derivatives, also through a non-contiguous input (the op sees a copy of it)."""
    x, t = problem((3, 4, 2), torch.float64)
    kwargs = dict(gamma=1.5, alpha=torch.rand(4, dtype=torch.float64), weight=torch.rand(4, dtype=torch.float64) + 0.5,
                  label_smoothing=smoothing)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    got = torch.autograd.functional.hessian(lambda x: focal.softmax_focal_loss(x, t, **kwargs), xt)
    want = torch.autograd.functional.hessian(lambda x: reference.softmax_focal_loss(x, t, **kwargs), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_forward_mode_and_torch_func_hessian(reduction):
    """torch.func.jvp and forward_ad give the directional derivative; jacfwd(jacrev) (forward over
    reverse) the reference's Hessian."""
    x, t = problem((3, 5, 2), torch.float64)
    kwargs = dict(gamma=2.0, reduction=reduction, label_smoothing=0.1)
    tangent = torch.randn(x.shape, dtype=torch.float64)
    _, got = torch.func.jvp(lambda x: focal.softmax_focal_loss(x, t, **kwargs), (x,), (tangent,))
    _, want = torch.func.jvp(lambda x: reference.softmax_focal_loss(x, t, **kwargs), (x,), (tangent,))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        got_dual = fwAD.unpack_dual(focal.softmax_focal_loss(dual, t, **kwargs)).tangent
    torch.testing.assert_close(got_dual, want, rtol=1e-10, atol=1e-12)
    if reduction == "sum":
        got_h = torch.func.jacfwd(torch.func.jacrev(lambda x: focal.softmax_focal_loss(x, t, **kwargs)))(x)
        want_h = torch.func.hessian(lambda x: reference.softmax_focal_loss(x, t, **kwargs))(x)
        torch.testing.assert_close(got_h, want_h, rtol=1e-10, atol=1e-12)


def test_second_derivative_after_in_place_change_is_an_error():
    x, t = problem((4, 3), torch.float64)
    x.requires_grad_()
    y = x * 1.0
    loss = focal.softmax_focal_loss(y, t)
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("case", ["none-plain", "mean-weighted", "sum-no-grad"])
def test_opcheck(case):
    """Schema, fake kernel, autograd and AOT dispatch: each reduction once, with and without the
    weights, normaliser and gradient."""
    x, t = problem((6, 5, 3), torch.float32, ignore="none")
    x.requires_grad_()
    reduction = case.split("-")[0]
    args = {
        "none-plain": (x, t, None, None, None, 1.0, 2.0, 0.0, -100, reduction, 1.0, True),
        "mean-weighted": (x, t, torch.rand(5), torch.rand(5), None, 0.5, 1.5, 0.1, 0, reduction, 2.0, True),
        "sum-no-grad": (x.detach(), t, None, None, torch.tensor(2.0), 1.0, 0.0, 0.0, -100, reduction, 1.0, False),
    }[case]
    torch.library.opcheck(OP, args)


def test_compile_fullgraph():
    x, t = problem((16, 10), torch.float32)
    weight = torch.rand(10) + 0.5

    def step(x):
        return focal.softmax_focal_loss(x, t, 0.5, 2.0, weight=weight, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = compiled(xa)
    got.backward()
    want = step(xb)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_backward_twice_and_loss_scale():
    """retain_graph keeps the saved gradient intact; a grad_output other than 1 scales it."""
    x, t = problem((8, 6), torch.float32)
    x.requires_grad_()
    loss = focal.softmax_focal_loss(x, t)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3.0, x)
    torch.testing.assert_close(g2, 3.0 * g1)


def test_no_gradient_is_computed_without_autograd():
    x, t = problem((8, 6), torch.float32)
    _, grad = OP(x, t, None, None, None, 1.0, 2.0, 0.0, -100, "mean", 1.0, False)
    assert grad.shape == (0,)
    with torch.no_grad():
        assert focal.softmax_focal_loss(x.requires_grad_(), t).grad_fn is None


def test_per_sample_gradients_with_vmap():
    x, t = problem((4, 5, 6), torch.float64)

    def loss_of(sample, target):
        return focal.softmax_focal_loss(sample.unsqueeze(0), target.unsqueeze(0), gamma=2.0)

    got = torch.func.vmap(torch.func.grad(loss_of))(x, t)
    for i in range(4):
        _, want = op_loss_and_grad(x[i : i + 1], t[i : i + 1], gamma=2.0)
        torch.testing.assert_close(got[i], want[0])


def test_ties_against_cross_entropy():
    """Tied maxima (common in 16-bit logits): 1 - p of each tied class counts the other."""
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [5.0, 5.0, -1.0, 5.0]], dtype=torch.float64)
    t = torch.tensor([1, 0, 3])
    loss, grad = op_loss_and_grad(x, t, gamma=0.0, reduction="none")
    xc = x.clone().requires_grad_()
    want = F.cross_entropy(xc, t, reduction="none")
    want.sum().backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(grad, xc.grad, rtol=1e-14, atol=1e-15)


# ---- properties ----------------------------------------------------------------------------------


@st.composite
def problems(draw):
    layout = draw(st.sampled_from(["rows", "positions", "unbatched"]))
    classes = draw(st.integers(1, 40))
    n = draw(st.integers(1, 6))
    shape = {"rows": (n, classes), "positions": (n, classes, draw(st.integers(1, 20))), "unbatched": (classes,)}[layout]
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    x, t = problem(shape, torch.float64, seed=seed, scale=scale)
    return x, t


@given(data=problems(), smoothing=st.sampled_from([0.0, 0.1]), with_weight=st.booleans())
def test_property_gamma_0_is_cross_entropy(data, smoothing, with_weight):
    x, t = data
    classes = x.shape[class_dim(x.shape)]
    weight = torch.linspace(0.5, 2.0, classes, dtype=torch.float64) if with_weight else None
    loss = focal.softmax_focal_loss(x, t, gamma=0.0, reduction="sum", weight=weight, label_smoothing=smoothing)
    want = F.cross_entropy(x, t, reduction="sum", weight=weight, label_smoothing=smoothing)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


@given(data=problems(), gamma=st.floats(0.0, 5.0), smoothing=st.sampled_from([0.0, 0.3]))
def test_property_loss_nonnegative_and_gradient_rows_sum_to_zero(data, gamma, smoothing):
    """Softmax is invariant to adding a constant to a row, so every row of the gradient sums to 0
    (with or without smoothing); every term of the loss is >= 0."""
    x, t = data
    loss, grad = op_loss_and_grad(x, t, gamma=gamma, reduction="none", label_smoothing=smoothing)
    assert (loss >= 0).all()
    row_sums = grad.sum(class_dim(x.shape))
    torch.testing.assert_close(row_sums, torch.zeros_like(row_sums), rtol=0, atol=1e-12)


@given(data=problems(), gammas=st.lists(st.floats(0.0, 5.0), min_size=2, max_size=2, unique=True))
def test_property_loss_decreases_with_gamma(data, gammas):
    """(1 - p)^gamma <= 1 falls as gamma grows: the focal loss of every element is non-increasing in gamma."""
    x, t = data
    low, high = sorted(gammas)
    a = focal.softmax_focal_loss(x, t, gamma=low, reduction="none")
    b = focal.softmax_focal_loss(x, t, gamma=high, reduction="none")
    assert (b <= a * (1 + 1e-12)).all()


# ---- determinism, instruction sets ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3000, 33), (4, 7, 60, 70)])
def test_reduced_loss_is_bitwise_identical_for_any_thread_count(shape):
    x, t = problem(shape, torch.float32)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(focal.softmax_focal_loss(x, t, gamma=2.0, reduction="sum", label_smoothing=0.1))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(r, results[0]) for r in results)


# ---- errors --------------------------------------------------------------------------------------

ERRORS = {
    "float target": (dict(target=torch.rand(4)), TypeError, "integer class ids"),
    "target shape": (dict(target=torch.zeros(4, 2, dtype=torch.long)), ValueError, r"shape of input without"),
    "out-of-range id": (dict(target=torch.tensor([0, 1, 5, 2])), ValueError, r"class id 5 at flat position 2"),
    "negative id": (dict(target=torch.tensor([0, -1, 1, 2])), ValueError, r"class id -1 at flat position 1"),
    "weight shape": (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(5,\)"),
    "weight dtype": (dict(weight=torch.ones(5, dtype=torch.long)), TypeError, "weight must be a floating"),
    "alpha negative": (dict(alpha=-0.5), ValueError, "alpha must be a finite number >= 0"),
    "alpha shape": (dict(alpha=torch.ones(3)), ValueError, r"alpha must have shape \(5,\)"),
    "alpha type": (dict(alpha="0.25"), TypeError, "alpha must be a real number"),
    "gamma": (dict(gamma=-1.0), ValueError, "gamma must be a finite number >= 0"),
    "gamma nan": (dict(gamma=float("nan")), ValueError, "gamma must be a finite number >= 0"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction must be one of"),
    "label_smoothing": (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    "normalizer with mean": (dict(normalizer=2.0), ValueError, "use it with reduction='sum'"),
    "normalizer value": (dict(normalizer=torch.tensor(0.0), reduction="sum"), ValueError, "finite number > 0"),
    "ignore_index type": (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    "int input": (dict(input=torch.ones(4, 5, dtype=torch.long)), TypeError, "input must be float32"),
    "0-dim input": (dict(input=torch.tensor(1.0), target=torch.tensor(0)), ValueError, "class dimension"),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_clear_errors(case):
    overrides, error, message = case
    kwargs = dict(input=torch.randn(4, 5), target=torch.tensor([0, 1, 2, 3]))
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        focal.softmax_focal_loss(**kwargs)


def test_raw_op_guards_memory():
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    cases = [
        ((x.t(), torch.tensor([0, 1, 2, 3, 4])), ValueError, "logits must be contiguous"),
        ((x, t.int()), TypeError, "int64 class ids"),
        ((x, t[:3]), ValueError, "shape without the class dimension"),
        ((x, t, torch.ones(3)), ValueError, r"weight must have shape \(5,\)"),
        ((x, t, None, torch.ones(2, 5)), ValueError, r"alpha must have shape \(5,\)"),
        ((x, t, None, None, torch.ones(2)), ValueError, "normalizer must have one element"),
    ]
    for head, error, message in cases:
        args = list(head) + [None] * (5 - len(head)) + [1.0, 2.0, 0.0, -100, "mean", 1.0, False]
        with pytest.raises(error, match=message):
            OP(*args)


# ---- every device (CUDA where a GPU is visible) ---------------------------------------------------


# The three CUDA kernels (a thread per element, 16 or 32 lanes per row, a block per row) over the gamma
# paths and smoothing; the CPU's instantiations are test_instantiations.py's, so one case per dtype and
# layout runs on the CPU here.
DEVICE_CASES = {"cuda": [(g, s) for g in (0.0, 2.0, 2.5) for s in (0.0, 0.1)], "cpu": [(2.5, 0.1)]}


@pytest.mark.parametrize("shape", [(40, 20), (17, 80), (9, 200), (8, 300), (2, 21, 3, 5)],
                         ids=["short-rows", "rows", "wide-rows", "long-rows", "NCHW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_device_matches_reference(device, dtype, shape):
    """The device's kernels against the float64 reference, with a normaliser tensor on the device."""
    for gamma, smoothing in DEVICE_CASES[device.type]:
        x, t = problem(shape, dtype)
        weight = torch.rand(shape[1]) + 0.5
        upstream = torch.rand(t.shape, dtype=torch.float64)
        kwargs = dict(gamma=gamma, label_smoothing=smoothing, alpha=0.5)
        loss, grad = op_loss_and_grad(x.to(device), t.to(device), upstream.to(device), weight=weight.to(device),
                                      reduction="none", **kwargs)
        want_loss, want_grad = reference_loss_and_grad(x, t, upstream, weight=weight, reduction="none", **kwargs)
        rtol, atol = tolerances(dtype)
        rtol = rtol if dtype == torch.float64 or device.type == "cpu" else 2 * rtol  # CUDA's libm: a few more ulps
        torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=rtol, atol=atol * want_loss.abs().max().item())
        torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=rtol, atol=atol * want_grad.abs().max().item())
        for reduction, normalizer in (("mean", None), ("sum", torch.tensor(4.0, device=device))):
            got = focal.softmax_focal_loss(x.to(device), t.to(device), weight=weight.to(device), reduction=reduction,
                                           normalizer=normalizer, **kwargs)
            want, _ = reference_loss_and_grad(x, t, weight=weight, reduction=reduction,
                                              normalizer=None if normalizer is None else 4.0, **kwargs)
            torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5 if dtype != torch.float64 else 1e-10, atol=0)


@requires_cuda
def test_cuda_invalid_class_id_is_nan_without_a_sync():
    x, t = problem((8, 40), torch.float32, ignore="none")
    t[2] = 40
    loss = focal.softmax_focal_loss(x.cuda(), t.cuda(), reduction="none")
    assert torch.isnan(loss[2]).item() and torch.isfinite(loss[torch.arange(8) != 2]).all().item()
    assert torch.isnan(focal.softmax_focal_loss(x.cuda(), t.cuda())).item()


@requires_cuda
def test_cuda_reduced_loss_is_repeatable():
    x, t = problem((4, 21, 64, 64), torch.float32)
    x = x.cuda().requires_grad_()
    first = focal.softmax_focal_loss(x, t.cuda(), reduction="sum", label_smoothing=0.1)
    for _ in range(3):
        again = focal.softmax_focal_loss(x, t.cuda(), reduction="sum", label_smoothing=0.1)
        assert torch.equal(again, first)
