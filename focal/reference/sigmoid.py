"""Pure-PyTorch reference for the sigmoid focal loss.

Written directly from "Focal Loss for Dense Object Detection" (Lin et al., 2017): equations (1)–(5) for
the loss and Appendix B for its derivative. It materialises every intermediate (including the one-hot
target tensor for class-id targets), so it is slow and memory hungry, and that is the point: it is
the plain statement of the math that the fused kernels are tested against.

Nothing is formed by cancellation: ``1 - p`` is ``sigmoid(-x)``, ``1 - p_t`` the sum of two
non-negative terms, the cross entropy ``t softplus(-x) + (1 - t) softplus(x)``, so that every output
keeps its full relative precision at saturated logits, subnormal results included (tests/test_oracle.py
checks this against arbitrary precision).

Both functions take the same arguments as :func:`focal.sigmoid_focal_loss` and follow the same
conventions (see its docstring); they do no argument validation beyond what the math needs.
"""

from __future__ import annotations

import torch

from focal.reference._common import (
    alpha_t,
    as_divisor,
    element_count,
    expand_targets,
    is_class_ids,
    logistic,
    power,
    reduce_elements,
)

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_grad", "expand_targets"]


def sigmoid_focal_loss(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float | torch.Tensor | None = 0.25, gamma: float = 2.0,
    reduction: str = "none", *, weight: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, background_index: int = -1,
) -> torch.Tensor:
    """The focal loss of equation (5), ``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)``, elementwise.

    For a soft target ``t`` this is the binary cross entropy ``CE = -t log p - (1 - t) log(1 - p)``
    scaled by ``alpha_t (1 - p_t)^gamma`` with ``p_t = p t + (1 - p)(1 - t)`` and
    ``alpha_t = alpha t + (1 - alpha)(1 - t)``, which reduces to the paper's definitions for t in {0, 1}
    and is what ``torchvision.ops.sigmoid_focal_loss`` computes. Differentiable by autograd, to any
    order.
    """
    soft, keep = expand_targets(inputs, targets, ignore_index, label_smoothing, background_index)
    _, _, ce, q = _focal_parts(inputs, soft)
    loss = alpha_t(soft, alpha) * power(q, gamma) * ce
    return reduce_elements(loss, keep, is_class_ids(targets), reduction, normalizer, weight)


def _focal_parts(x: torch.Tensor, t: torch.Tensor):
    """``(p, 1 - p, CE, 1 - p_t)`` at logits ``x`` and targets ``t``, the last two sums of non-negative
    terms: ``CE = t softplus(-x) + (1 - t) softplus(x)`` and ``1 - p_t = p (1 - t) + (1 - p) t``."""
    p, one_minus_p, softplus_x, softplus_neg_x = logistic(x)
    ce = t * softplus_neg_x + (1 - t) * softplus_x
    return p, one_minus_p, ce, p * (1 - t) + one_minus_p * t


def sigmoid_focal_loss_grad(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float | torch.Tensor | None = 0.25, gamma: float = 2.0,
    reduction: str = "none", *, weight: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, background_index: int = -1,
) -> torch.Tensor:
    """d loss / d inputs, written out: the paper's Appendix B derivative, for any target in [0, 1].

    With ``p = sigmoid(x)``, ``p_t = p t + (1 - p)(1 - t)`` and ``q = 1 - p_t``:
    ``dFL/dx = alpha_t * (q^gamma (p - t) + gamma (1 - 2t) p (1 - p) q^(gamma - 1) CE)``, which for
    a hard target (``y`` in {-1, +1}, ``x_t = y x``, ``t = (y + 1) / 2``) is Appendix B's
    ``alpha_t y (1 - p_t)^gamma (gamma p_t log(p_t) + p_t - 1)``. The result is the gradient of the
    *reduced* loss (``sum``, ``mean`` or with ``normalizer``), or of ``loss.sum()`` for
    ``reduction="none"``. Differentiable by autograd, which gives the second derivatives.
    """
    soft, keep = expand_targets(inputs, targets, ignore_index, label_smoothing, background_index)
    p, one_minus_p, ce, q = _focal_parts(inputs, soft)
    grad = p * (1 - soft) - one_minus_p * soft  # p - t: exactly p or -(1 - p) for a hard target
    if gamma != 0:
        # p (1 - p) q^(gamma - 1) as q^gamma r, r = p (1 - p) / q: q^(gamma - 1) overflows where q
        # underflows. r is p_t for a hard target, taken as such: dividing by a tiny q would put an
        # infinity into the second derivative. A soft target keeps q >= min(t, 1 - t).
        hard = (soft == 0) | (soft == 1) | (q == 0)
        p_t = p * soft + one_minus_p * (1 - soft)
        r = torch.where(hard, p_t, p * one_minus_p / torch.where(hard, torch.ones_like(q), q))
        grad = grad + gamma * (1 - 2 * soft) * r * ce
    grad = alpha_t(soft, alpha) * power(q, gamma) * grad
    if weight is not None:
        grad = grad * weight
    grad = grad * keep
    if normalizer is not None:
        grad = grad / as_divisor(normalizer, grad)
    if reduction == "mean":
        grad = grad / element_count(keep, is_class_ids(targets))
    return grad
