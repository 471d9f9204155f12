"""The sigmoid focal loss under PyTorch's program transforms: torch.func (per-sample normalisers,
reverse over reverse, forward mode), torch.export and TorchScript. torch.func.grad, vmap,
per-sample gradients, jvp and hessian of every loss of the family are in test_family.py."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import focal
from focal import reference


def _problem(device="cpu", batch=None, rows=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    x = (torch.randn(*lead, rows, classes, generator=g) * 2).to(device)
    ids = torch.randint(-1, classes, (*lead, rows), generator=g).to(device)
    return x, ids


def _reference_grad(x, ids, **kwargs):
    x = x.detach().double().requires_grad_()
    (grad,) = torch.autograd.grad(reference.sigmoid_focal_loss(x, ids, **kwargs).sum(), x)
    return grad.float()


# --- torch.func ----------------------------------------------------------------------------------


def test_vmap_with_per_sample_normalizer_and_shared_weight(device):
    x, ids = _problem(device, batch=4)
    num_pos = (ids >= 0).sum(-1).clamp(min=1)
    weight = torch.rand(5, device=device)

    def loss_fn(x, t, n):
        return focal.sigmoid_focal_loss(x, t, reduction="sum", weight=weight, normalizer=n)

    got = torch.func.vmap(loss_fn)(x, ids, num_pos)
    expected = torch.stack([loss_fn(x[b], ids[b], num_pos[b]) for b in range(4)])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_func_hessian_of_grad(device):
    x, ids = _problem(device, rows=3, classes=4)
    x = x.double()
    got = torch.func.jacrev(torch.func.grad(lambda x: focal.sigmoid_focal_loss(x, ids, reduction="sum")))(x)
    expected = torch.autograd.functional.hessian(lambda x: reference.sigmoid_focal_loss(x, ids, reduction="sum"), x)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


def test_raw_op_under_a_transform_points_to_the_function():
    x, ids = _problem()
    args = (x, ids, None, None, None, 0.25, 2.0, 0.0, -100, "sum", 1.0, True)
    with pytest.raises(RuntimeError, match="differentiate focal.sigmoid_focal_loss"):
        torch.func.grad(lambda x: torch.ops.focal.sigmoid_focal_loss(x, *args[1:])[0])(x)


def test_raw_op_is_differentiable():
    x, ids = _problem()
    x.requires_grad_()
    loss, _ = torch.ops.focal.sigmoid_focal_loss(x, ids, None, None, None, 0.25, 2.0, 0.0, -100, "sum", 1.0, True)
    loss.backward()
    torch.testing.assert_close(x.grad, _reference_grad(x, ids, reduction="sum"), rtol=1e-5, atol=1e-6)


# --- torch.export --------------------------------------------------------------------------------


class Detector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(8, 5)
        self.criterion = focal.SigmoidFocalLoss(reduction="sum")

    def forward(self, features, labels):
        num_pos = (labels >= 0).sum().clamp(min=1)
        return self.criterion(self.head(features), labels, normalizer=num_pos)


def test_export_a_module_that_uses_the_loss():
    model = Detector()
    features, labels = torch.randn(2, 30, 8), torch.randint(-1, 5, (2, 30))
    program = torch.export.export(model, (features, labels))
    assert any("focal.sigmoid_focal_loss" in str(node.target) for node in program.graph.nodes)
    other = (torch.randn(2, 30, 8), torch.randint(-1, 5, (2, 30)))
    torch.testing.assert_close(program.module()(*other), model(*other), rtol=1e-6, atol=1e-7)


def test_export_with_dynamic_anchor_count():
    model = Detector()
    anchors = torch.export.Dim("anchors", min=2, max=10_000)
    program = torch.export.export(
        model, (torch.randn(2, 30, 8), torch.randint(-1, 5, (2, 30))), dynamic_shapes=({1: anchors}, {1: anchors})
    )
    other = (torch.randn(2, 77, 8), torch.randint(-1, 5, (2, 77)))
    torch.testing.assert_close(program.module()(*other), model(*other), rtol=1e-6, atol=1e-7)


# --- TorchScript ---------------------------------------------------------------------------------


def _script(obj):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still used
        return torch.jit.script(obj)


@pytest.mark.parametrize("kind", ["ids", "float"])
def test_script_the_function(kind):
    """As torchvision's own suite does with its focal loss: script it, compare, differentiate."""
    scripted = _script(focal.sigmoid_focal_loss)
    x, ids = _problem()
    t = ids if kind == "ids" else torch.rand_like(x)
    for alpha, gamma, reduction in ((0.25, 2.0, "none"), (-1.0, 0.0, "sum"), (0.5, 1.5, "mean")):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = scripted(x1, t, alpha, gamma, reduction)
        expected = focal.sigmoid_focal_loss(x2, t, alpha, gamma, reduction)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        got.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


def test_script_keeps_the_checks():
    scripted = _script(focal.sigmoid_focal_loss)
    x, ids = _problem()
    with pytest.raises(Exception, match=r"alpha must be in \[0, 1\]"):
        scripted(x, ids, 1.5)
    with pytest.raises(Exception, match="integer class-id targets must have shape"):
        scripted(x, ids[:-1])


def test_script_a_module_save_and_load():
    criterion = _script(focal.SigmoidFocalLoss(alpha=None, gamma=1.5, reduction="sum"))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still used
        torch.jit.save(criterion, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    x, ids = _problem()
    num_pos = (ids >= 0).sum()
    expected = focal.sigmoid_focal_loss(x, ids, None, 1.5, "sum", normalizer=num_pos)
    torch.testing.assert_close(loaded(x, ids, None, num_pos), expected, rtol=0, atol=0)
    torch.testing.assert_close(loaded(x, ids, torch.ones(5), 2.0), focal.sigmoid_focal_loss(x, ids, None, 1.5, "sum", normalizer=2.0), rtol=0, atol=0)


# --- forward mode and batched gradients ----------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_forward_mode(reduction):
    """torch.func.jvp / jacfwd and forward_ad give the reference's directional derivatives (never a
    silent zero: the logits need not require grad for a tangent to flow)."""
    import torch.autograd.forward_ad as fwAD

    x, ids = _problem()
    x = x.double()
    v = torch.randn_like(x)

    def fused(x):
        return focal.sigmoid_focal_loss(x, ids, reduction=reduction)

    def exact(x):
        return reference.sigmoid_focal_loss(x, ids, reduction=reduction)

    _, expected = torch.func.jvp(exact, (x,), (v,))
    assert expected.abs().max() > 0
    torch.testing.assert_close(torch.func.jvp(fused, (x,), (v,))[1], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(fused)(x), torch.func.jacrev(exact)(x), rtol=1e-10, atol=1e-12)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fused(fwAD.make_dual(x, v))).tangent
    torch.testing.assert_close(tangent, expected, rtol=1e-10, atol=1e-12)


def test_batched_grad_outputs():
    """autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) batch grad_output; the
    in-place scaling must not meet a batched tensor."""
    x, ids = _problem(rows=4, classes=3)
    x.requires_grad_()
    loss = focal.sigmoid_focal_loss(x, ids, reduction="sum")
    (batched,) = torch.autograd.grad(loss, x, torch.tensor([1.0, -2.0, 3.0]), is_grads_batched=True)
    once = _reference_grad(x, ids, reduction="sum")
    torch.testing.assert_close(batched, torch.stack([once, -2 * once, 3 * once]), rtol=1e-5, atol=1e-6)
    jac = torch.autograd.functional.jacobian(lambda x: focal.sigmoid_focal_loss(x, ids), x.detach(), vectorize=True)
    expected = torch.autograd.functional.jacobian(lambda x: reference.sigmoid_focal_loss(x, ids), x.detach())
    torch.testing.assert_close(jac, expected, rtol=1e-5, atol=1e-6)
