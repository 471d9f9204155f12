"""The sigmoid focal loss operator's registration: its fake kernel, its raw outputs, and
`torch.compile` of the float-target and module paths (opcheck and the class-id compile of every loss
of the family are in test_family.py)."""

from __future__ import annotations

import pytest
import torch

import focal

OP = torch.ops.focal.sigmoid_focal_loss.default


def _sample(device, dtype=torch.float32, rows=6, cols=5, targets="ids", weight=None, row_weight=False,
            normalizer=None, alpha=0.25, gamma=2.0, label_smoothing=0.0, reduction="sum", scale=1.0,
            compute_grad=True, lead=()):
    """The raw op's arguments; the logits require grad when the gradient is asked for, so that
    opcheck also runs the op's autograd. ``lead`` adds leading dimensions: logits (*lead, rows, cols)."""
    g = torch.Generator().manual_seed(rows * 100 + cols)
    shape = (*lead, rows, cols)
    logits = (torch.randn(shape, generator=g) * 3).to(device, dtype).requires_grad_(compute_grad)
    if targets == "ids":
        t = torch.randint(-1, cols, shape[:-1], generator=g)
        if rows:
            t[..., 0] = -100
        t = t.to(device)
    else:
        t = torch.rand(shape, generator=g).to(device, dtype)
        if targets == "hard":
            t = t.round()
    w = None
    if weight == "class":
        w = torch.rand(cols, generator=g).to(device, dtype)
    elif weight == "full":
        w = torch.rand(shape, generator=g).to(device, dtype)
    rw = torch.rand(shape[:-1], generator=g).to(device, dtype) if row_weight else None
    return (logits, t, w, rw, normalizer, alpha, gamma, label_smoothing, -100, reduction, scale, compute_grad)


def test_fake_kernel_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            logits = torch.empty(4, 3, dtype=dtype)
            ids = torch.empty(4, dtype=torch.long)
            loss, grad = OP(logits, ids, None, None, None, 0.25, 2.0, 0.0, -100, "none", 1.0, True)
            assert loss.shape == (4, 3) and loss.dtype == dtype and grad.shape == (4, 3) and grad.dtype == dtype
            loss, grad = OP(logits, ids, None, None, None, 0.25, 2.0, 0.0, -100, "sum", 1.0, False)
            assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert grad.shape == (0,)


def test_raw_op_outputs():
    """The raw op returns (loss, d loss / d logits), the gradient only when asked for."""
    logits, ids = _sample("cpu")[:2]
    loss, grad = OP(*_sample("cpu", reduction="sum"))
    x = logits.detach().clone().requires_grad_()
    expected = focal.sigmoid_focal_loss(x, ids, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, x.grad, rtol=1e-6, atol=0)
    loss_only, no_grad = OP(*_sample("cpu", reduction="sum", compute_grad=False))
    assert torch.equal(loss_only, loss) and no_grad.shape == (0,)
    scaled, scaled_grad = OP(*_sample("cpu", reduction="sum", scale=0.5, normalizer=torch.tensor(4.0)))
    torch.testing.assert_close(scaled, loss / 8, rtol=1e-6, atol=0)
    torch.testing.assert_close(scaled_grad, grad / 8, rtol=1e-6, atol=0)


# --- torch.compile ------------------------------------------------------------------------------


def _compiled_matches_eager(fn, *inputs, dynamic=None, backend="inductor"):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=backend)
    for x, *rest in inputs:
        x_eager = x.detach().clone().requires_grad_()
        x_compiled = x.detach().clone().requires_grad_()
        eager = fn(x_eager, *rest)
        got = compiled(x_compiled, *rest)
        torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-7)
        eager.sum().backward()
        got.sum().backward()
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-6, atol=1e-7)


def test_compile_float_targets_with_label_smoothing(device):
    def loss_fn(logits, targets):
        return focal.sigmoid_focal_loss(logits, targets, alpha=0.5, gamma=1.5, reduction="mean", label_smoothing=0.1)

    _compiled_matches_eager(loss_fn, (torch.randn(16, 5, device=device), torch.rand(16, 5, device=device)))


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic-dynamic", "dynamic"])
def test_compile_module_in_a_model_over_several_shapes(device, dynamic):
    """A second shape recompiles with symbolic sizes (None) or the first compile is symbolic (True),
    the default alpha and gamma then reaching the function as symbolic floats."""
    head = torch.nn.Linear(8, 4).to(device)
    criterion = focal.SigmoidFocalLoss(reduction="sum")

    def loss_fn(features, labels):
        return criterion(head(features), labels, normalizer=2.0)

    _compiled_matches_eager(
        loss_fn,
        (torch.randn(10, 8, device=device), torch.randint(-1, 4, (10,), device=device)),
        (torch.randn(23, 8, device=device), torch.randint(-1, 4, (23,), device=device)),
        dynamic=dynamic,
        backend="inductor" if dynamic else "aot_eager",  # recompiling for a new shape is Dynamo's and AOT's
    )
