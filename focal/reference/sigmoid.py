"""Pure-PyTorch reference for the sigmoid focal loss.

Written directly from "Focal Loss for Dense Object Detection" (Lin et al., 2017): equations (1)–(5) for
the loss and Appendix B for its derivative. It materialises every intermediate (including the one-hot
target tensor for class-id targets), so it is slow and memory hungry, and that is the point: it is
the plain statement of the math that the fused kernels are tested against.

Both functions take the same arguments as :func:`focal.sigmoid_focal_loss` and follow the same
conventions (see its docstring); they do no argument validation beyond what the math needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from focal.reference._common import (
    alpha_t,
    as_divisor,
    element_count,
    expand_targets,
    is_class_ids,
    reduce_elements,
)

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_grad", "expand_targets"]


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    weight: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The focal loss of equation (5), ``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)``, elementwise.

    For a soft target ``t`` this is the binary cross entropy ``CE = -t log p - (1 - t) log(1 - p)``
    scaled by ``alpha_t (1 - p_t)^gamma`` with ``p_t = p t + (1 - p)(1 - t)`` and
    ``alpha_t = alpha t + (1 - alpha)(1 - t)``, which reduces to the paper's definitions for t in {0, 1}
    and is what ``torchvision.ops.sigmoid_focal_loss`` computes. Differentiable by autograd.
    """
    soft, keep = expand_targets(inputs, targets, ignore_index, label_smoothing)
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, soft, reduction="none")
    p_t = p * soft + (1 - p) * (1 - soft)
    loss = alpha_t(soft, alpha) * ce * (1 - p_t) ** gamma
    return reduce_elements(loss, keep, is_class_ids(targets), reduction, normalizer, weight)


def sigmoid_focal_loss_grad(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    weight: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """d loss / d inputs, written out: the paper's Appendix B derivative, for any target in [0, 1].

    With ``p = sigmoid(x)``, ``p_t = p t + (1 - p)(1 - t)`` and ``q = 1 - p_t``:
    ``dFL/dx = alpha_t * (q^gamma (p - t) + gamma (1 - 2t) p (1 - p) q^(gamma - 1) CE)``, which for
    a hard target (``y`` in {-1, +1}, ``x_t = y x``, ``t = (y + 1) / 2``) is Appendix B's
    ``alpha_t y (1 - p_t)^gamma (gamma p_t log(p_t) + p_t - 1)``. The result is the gradient of the
    *reduced* loss (``sum``, ``mean`` or with ``normalizer``), or of ``loss.sum()`` for
    ``reduction="none"``. Differentiable by autograd, which gives the second derivatives.
    """
    soft, keep = expand_targets(inputs, targets, ignore_index, label_smoothing)
    p = torch.sigmoid(inputs)
    one_minus_p = torch.sigmoid(-inputs)  # without the cancellation of 1 - p
    q = p * (1 - soft) + one_minus_p * soft
    ce = F.binary_cross_entropy_with_logits(inputs, soft, reduction="none")
    grad = q**gamma * (p - soft)
    if gamma != 0:
        grad = grad + gamma * (1 - 2 * soft) * p * one_minus_p * q ** (gamma - 1) * ce
    grad = alpha_t(soft, alpha) * grad
    if weight is not None:
        grad = grad * weight
    grad = grad * keep
    if normalizer is not None:
        grad = grad / as_divisor(normalizer, grad)
    if reduction == "mean":
        grad = grad / element_count(keep, is_class_ids(targets))
    return grad
