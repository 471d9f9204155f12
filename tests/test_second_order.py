"""Second derivatives of the sigmoid focal loss beyond the family's (test_family.py compares the
hessians of every loss, target form, weight and normaliser with focal.reference): against
torchvision, in every dtype, through a model, and the errors when the tensors they need are gone or
changed."""

from __future__ import annotations

import weakref

import pytest
import torch

import focal
from focal import reference

def _problem(kind, shape=(5, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    if kind == "ids":
        t = torch.randint(-1, shape[-1], shape[:-1], generator=g)
        t.view(-1)[0] = -100
    elif kind == "soft":
        t = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    else:
        t = torch.randint(0, 2, shape, generator=g).to(dtype)
    return x, t


def test_hessian_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    x, t = _problem("soft", shape=(4, 3))
    got = torch.autograd.functional.hessian(lambda x: focal.sigmoid_focal_loss(x, t, reduction="sum"), x.detach())
    expected = torch.autograd.functional.hessian(
        lambda x: torchvision.ops.sigmoid_focal_loss(x, t, reduction="sum"), x.detach()
    )
    diagonal = got.reshape(12, 12).diagonal()
    assert (diagonal.abs() > 1e-3).all()
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["ids", "soft"])
def test_create_graph_gradient_equals_the_fused_gradient(device, dtype, kind):
    """The differentiable recomputation gives the first derivative the fused op gives."""
    x, t = _problem(kind, shape=(40, 7), dtype=dtype)
    x, t = x.detach().to(device).requires_grad_(), t.to(device)
    (fused,) = torch.autograd.grad(focal.sigmoid_focal_loss(x, t, reduction="sum"), x)
    (graph,) = torch.autograd.grad(focal.sigmoid_focal_loss(x, t, reduction="sum"), x, create_graph=True)
    assert graph.requires_grad and graph.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(graph.detach(), fused, rtol=tol, atol=tol * 1e-2)


def test_gradient_penalty_through_a_model():
    """A second derivative with respect to parameters, through logits the caller still holds."""
    head = torch.nn.Linear(6, 4).double()
    features = torch.randn(10, 6, dtype=torch.float64)
    ids = torch.randint(-1, 4, (10,))

    def penalty(loss_fn):
        head.zero_grad()
        logits = head(features)
        loss = loss_fn(logits, ids, reduction="sum")
        grads = torch.autograd.grad(loss, head.parameters(), create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
        return [p.grad.clone() for p in head.parameters()]

    for got, expected in zip(penalty(focal.sigmoid_focal_loss), penalty(reference.sigmoid_focal_loss)):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


def test_second_derivative_after_the_logits_are_freed_says_so():
    head = torch.nn.Linear(6, 4)
    ids = torch.randint(-1, 4, (10,))
    logits = head(torch.randn(10, 6))
    ref = weakref.ref(logits)
    loss = focal.sigmoid_focal_loss(logits, ids, reduction="sum")
    del logits
    assert ref() is None
    with pytest.raises(RuntimeError, match="recomputes the loss from its logits, which no longer exist"):
        torch.autograd.grad(loss, head.weight, create_graph=True)


def test_second_derivative_after_the_logits_changed_in_place_says_so():
    x, t = _problem("ids")
    logits = x * 1.0
    loss = focal.sigmoid_focal_loss(logits, t, reduction="sum")
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(RuntimeError, match="which were modified in place after the forward pass"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_second_derivative_needs_float_targets_alive():
    x, _ = _problem("soft")
    loss = focal.sigmoid_focal_loss(x, torch.rand(5, 4, dtype=torch.float64), reduction="sum")
    with pytest.raises(RuntimeError, match="from its float targets, which no longer exist"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("case", ["non-contiguous logits", "bool targets", "targets of another dtype", "broadcast weight"])
def test_second_derivative_through_inputs_that_validation_copies(case):
    """The op saw a copy (contiguous, cast or expanded) of what the caller passed and holds; the
    second derivative is made again from the caller's tensor."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g)
    t = torch.rand(6, 5, dtype=torch.float64, generator=g)
    kwargs = {}
    if case == "non-contiguous logits":
        x = x.t().contiguous().t()
        assert not x.is_contiguous()
    elif case == "bool targets":
        t = t > 0.5
    elif case == "targets of another dtype":
        t = t.float()
    else:
        x = torch.randn(6, 3, 5, dtype=torch.float64, generator=g)
        t = torch.randint(-1, 5, (6, 3), generator=g)
        kwargs["weight"] = torch.rand(6, 1, 5, dtype=torch.float64, generator=g)
    x.requires_grad_()

    def hessian_vector(loss_fn, targets):
        x.grad = None
        loss = loss_fn(x, targets, reduction="sum", **kwargs)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        grad.pow(2).sum().backward()
        return x.grad.clone()

    expected_t = t.double() if t.dtype != torch.long else t
    torch.testing.assert_close(hessian_vector(focal.sigmoid_focal_loss, t),
                               hessian_vector(reference.sigmoid_focal_loss, expected_t), rtol=1e-7, atol=1e-10)
