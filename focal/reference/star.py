"""Pure-PyTorch reference for FL*, the focal loss variant of Appendix A of "Focal Loss for Dense Object
Detection" (Lin et al., 2017).

With ``y`` in {-1, +1} and ``x_t = y x``, Appendix A defines ``p*_t = sigmoid(gamma x_t + beta)`` and
``FL* = -log(p*_t) / gamma``; Appendix B gives its derivative ``dFL*/dx = y (p*_t - 1)``. ``gamma``
sharpens the loss around ``x_t = 0`` and ``beta`` shifts it; ``gamma = 1, beta = 0`` is the binary cross
entropy. The paper's settings, with which Appendix A finds FL* about as effective as FL, are
``gamma = 2, beta = 1`` and ``gamma = 4, beta = 0``.

Targets, ``alpha``, ``weight``, ``normalizer``, ``ignore_index``, ``label_smoothing`` and the reductions
follow :func:`focal.sigmoid_focal_loss`. Like the other references it materialises every intermediate
and does no argument validation beyond what the math needs.
"""

from __future__ import annotations

import torch

from focal.reference._common import alpha_t, expand_targets, is_class_ids, reduce_elements

__all__ = ["sigmoid_focal_loss_star"]


def _softplus_over(w: torch.Tensor, gamma: float) -> torch.Tensor:
    """``softplus(gamma w) / gamma`` without forming ``gamma w``, which overflows for the largest
    logits: ``max(w, 0) + log1p(exp(-gamma |w|)) / gamma``, as
    :func:`focal.reference._common.logistic` forms softplus."""
    negative = w < 0
    tail = torch.log1p(torch.exp(gamma * torch.where(negative, w, -w))) / gamma
    return torch.where(negative, torch.zeros_like(w), w) + tail


def sigmoid_focal_loss_star(
    inputs: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, beta: float = 1.0,
    alpha: float | torch.Tensor | None = None, reduction: str = "none", *, weight: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
    background_index: int = -1,
) -> torch.Tensor:
    r"""FL* of Appendix A, ``-log(sigmoid(gamma x_t + beta)) / gamma``, elementwise.

    A soft target ``t`` in [0, 1] mixes the two hard cases linearly, as the binary cross entropy does:
    ``FL* = t FL*(x_t = x) + (1 - t) FL*(x_t = -x)``, so ``gamma = 1, beta = 0`` is the binary cross
    entropy with soft targets; the whole is scaled by ``alpha_t = alpha t + (1 - alpha)(1 - t)`` as in
    :func:`focal.sigmoid_focal_loss`. ``-log(sigmoid(z)) / gamma`` is computed as
    ``softplus(-z) / gamma`` with the division inside (``z / gamma = x_t + beta / gamma``), exact and
    finite for any finite logit. Differentiable by autograd, to any order; the first derivative is Appendix B's
    ``alpha_t y (p*_t - 1)`` for hard targets.

    Args:
        inputs: logits of any shape ``(..., C)``, class dimension last; any float dtype.
        targets: float (or bool) targets of the shape of ``inputs``, hard 0/1 or soft in [0, 1]; or
            integer class ids of shape ``inputs.shape[:-1]`` (``c`` in ``[0, C)`` a positive for class
            ``c``, ``-1`` background, ``ignore_index`` ignored), as for :func:`focal.sigmoid_focal_loss`.
        gamma: sharpness, > 0 (the loss divides by it). The paper: 2 (with ``beta = 1``) or 4 (with
            ``beta = 0``).
        beta: shift of the logit, any real number.
        alpha: weight of the positives in [0, 1] (negatives get ``1 - alpha``), or a ``(C,)`` tensor of
            one per class; None or negative for no weighting (the default: Appendix A uses none).
        reduction: ``"none"`` (shape of ``inputs``), ``"sum"`` or ``"mean"`` (over the elements that are
            not ignored; 0 when all are, with class ids).
        weight: optional weights broadcastable to ``inputs``, e.g. per class ``(C,)`` or per row ``(..., 1)``.
        normalizer: optional number or one-element tensor (on any device) dividing the loss.
        ignore_index: class id of ignored rows (class-id targets only).
        background_index: class id of background rows (class-id targets only), -1 by default.
        label_smoothing: ``eps`` in [0, 1]: every binary target ``t`` becomes ``t (1 - eps) + eps / 2``.

    Returns:
        The loss: shape of ``inputs`` for ``"none"``, else a scalar.
    """
    if not gamma > 0:
        raise ValueError(f"FL* divides by gamma, which must be > 0, got {gamma}")
    soft, keep = expand_targets(inputs, targets, ignore_index, label_smoothing, background_index)
    shift = beta / gamma
    positive = _softplus_over(-(inputs + shift), gamma)  # x_t = x:  -log sigmoid(gamma x + beta) / gamma
    negative = _softplus_over(inputs - shift, gamma)  # x_t = -x: -log sigmoid(-gamma x + beta) / gamma
    loss = alpha_t(soft, alpha) * (soft * positive + (1 - soft) * negative)
    return reduce_elements(loss, keep, is_class_ids(targets), reduction, normalizer, weight)
