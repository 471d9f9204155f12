"""The gradient of each loss as a differentiable PyTorch expression, for second derivatives.

The fused ops write d loss / d logits in their forward pass, but that buffer is a constant to
autograd. When a derivative of the gradient is asked for (``create_graph=True``, ``torch.func.grad``
of a gradient, ``hessian``), :mod:`focal._autograd` recomputes the gradient with the function of the
loss's row in :data:`focal.ops.LOSS_OPS` instead, and autograd differentiates that again.

Every function here has the signature ``grad(x, tensors, params, grad_output)``: the logits ``x``
(float32 or float64), the op's other tensor arguments and its numbers by schema name (the elementwise
losses get ``weight`` already multiplied by ``row_weight``), and the upstream gradient; it returns
``d loss / d x * grad_output`` including the op's ``scale``.
"""

from __future__ import annotations

from typing import Callable

import torch

from focal import reference
from focal.reference._common import power

__all__ = ["GradFn", "sigmoid_focal", "sigmoid_focal_star", "quality_focal", "varifocal", "softmax_focal"]

GradFn = Callable[[torch.Tensor, dict, dict, torch.Tensor], torch.Tensor]


def _alpha(tensors, params):
    """The op's alpha as the references take it: its class_alpha tensor, or its number (None when off)."""
    if tensors.get("class_alpha") is not None:
        return tensors["class_alpha"]
    return None if params["alpha"] < 0 else params["alpha"]


def sigmoid_focal(x, tensors, params, grad_output):
    """Appendix B's derivative, written out (:func:`focal.reference.sigmoid_focal_loss_grad`)."""
    grad = reference.sigmoid_focal_loss_grad(
        x, tensors["targets"], _alpha(tensors, params), params["gamma"], params["reduction"],
        weight=tensors["weight"], normalizer=tensors["normalizer"], ignore_index=params["ignore_index"],
        label_smoothing=params["label_smoothing"], background_index=params["background_index"],
    )
    return grad * (params["scale"] * grad_output)


def _autograd_of(loss_fn) -> GradFn:
    """The gradient of a reference loss times grad_output, as a graph that can be differentiated
    again: by torch.func.vjp, which composes both with autograd (create_graph=True) and with
    torch.func transforms (hessian, jacrev of jacrev), where torch.autograd.grad sees no graph."""

    def grad(x, tensors, params, grad_output):
        loss, vjp = torch.func.vjp(lambda v: loss_fn(v, tensors, params) * params["scale"], x)
        (g,) = vjp(grad_output.to(loss.dtype))
        return g

    return grad


def _quality_targets(tensors):
    scores = tensors["scores"]
    return tensors["targets"] if scores is None else (tensors["targets"], scores)


sigmoid_focal_star = _autograd_of(
    lambda x, t, p: reference.sigmoid_focal_loss_star(
        x, t["targets"], p["gamma"], p["beta"], _alpha(t, p), p["reduction"],
        weight=t["weight"], normalizer=t["normalizer"], ignore_index=p["ignore_index"],
        label_smoothing=p["label_smoothing"], background_index=p["background_index"],
    )
)

quality_focal = _autograd_of(
    lambda x, t, p: reference.quality_focal_loss(
        x, _quality_targets(t), p["beta"], p["reduction"], weight=t["weight"], normalizer=t["normalizer"],
        ignore_index=p["ignore_index"], background_index=p["background_index"],
    )
)

varifocal = _autograd_of(
    lambda x, t, p: reference.varifocal_loss(
        x, _quality_targets(t), _alpha(t, p), p["gamma"], p["reduction"], weight=t["weight"],
        normalizer=t["normalizer"], ignore_index=p["ignore_index"], background_index=p["background_index"],
    )
)


def softmax_focal(x, tensors, params, grad_output):
    """The formula of csrc/softmax_math.h, ``t_j - p_j sum_c t_c`` with ``t_c = q_c a_c f'(log p_c)``
    (of ``loss.sum()`` for reduction "none", whose upstream gradient is one value per element, broadcast
    over the classes). Written without data-dependent steps (no one_hot), so that torch.func.vmap runs it."""
    target, weight, alpha, normalizer = tensors["target"], tensors["weight"], tensors["alpha"], tensors["normalizer"]
    gamma, eps, ignore_index, reduction = params["gamma"], params["label_smoothing"], params["ignore_index"], params["reduction"]
    d = 0 if x.dim() == 1 else 1
    classes = x.shape[d]
    view = [classes if i == d else 1 for i in range(x.dim())]
    log_p = torch.log_softmax(x, d)
    p = log_p.exp()
    one_minus_p = -torch.expm1(log_p)
    ids = target.unsqueeze(d)
    kept = ids != ignore_index
    is_target = (ids == torch.arange(classes, device=x.device).view(view)).to(x.dtype)
    q = is_target * (1.0 - eps) + eps / classes
    factor = torch.ones(view, dtype=x.dtype, device=x.device)
    if weight is not None:
        factor = factor * weight.to(x.dtype).view(view)
    if alpha is not None:
        factor = factor * alpha.to(x.dtype).view(view)
    positive = one_minus_p > 0
    ratio = torch.where(positive, -log_p / torch.where(positive, one_minus_p, torch.ones_like(p)), torch.ones_like(p))
    slope = -power(one_minus_p, gamma) * (1.0 + gamma * p * ratio)
    t = q * factor * slope
    grad = torch.where(kept, t - p * t.sum(d, keepdim=True), torch.zeros_like(t))
    if normalizer is not None:
        grad = grad / normalizer.to(grad.device).reshape(())
    if reduction == "mean":
        target_weight = kept.squeeze(d).to(x.dtype)
        if weight is not None:
            safe = torch.where(kept, ids, torch.zeros_like(ids)).squeeze(d)
            target_weight = target_weight * weight.to(x.dtype)[safe]
        grad = grad / torch.where(kept.any(), target_weight.sum(), torch.ones((), dtype=x.dtype, device=x.device))
    if grad_output.dim() > 0:
        grad_output = grad_output.unsqueeze(d)
    return grad * (grad_output * (params["scale"] * params["alpha_value"]))
