"""Pure-PyTorch reference for the softmax focal loss.

The multi-class form of the focal loss of "Focal Loss for Dense Object Detection" (Lin et al., 2017,
equation (5) with ``p_t`` the softmax probability of the target class):
``FL = -alpha_y (1 - p_y)^gamma log(p_y)``, ``p = softmax(input)`` over the class dimension.

It follows the conventions of :func:`torch.nn.functional.cross_entropy` (shapes, ``weight``,
``ignore_index``, ``label_smoothing``, the weighted mean), so that with ``gamma = 0`` and no ``alpha`` it
*is* ``cross_entropy`` for every argument combination but one: a ``"mean"`` over a batch in which
every element is ignored gives 0 (as :func:`focal.sigmoid_focal_loss` does with class ids), where
``cross_entropy`` gives NaN. Like the other references it materialises every intermediate (the one-hot
and smoothed target distributions included) and does no argument validation beyond what the math
needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from focal.reference._common import logistic, power, reduce_loss

__all__ = ["softmax_focal_loss"]


def _class_against_rest(logits: torch.Tensor) -> torch.Tensor:
    """``u_c = x_c - log(sum_{j != c} exp(x_j))`` over the last dimension (+inf for a single class).

    With ``z = x - max`` (the max of one chosen class, outside the graph: ``u`` does not depend on a
    shift, and a max inside the graph would route a gradient of 1 - 1 through it) and ``S`` the sum
    of ``exp(z)``, the rest of a class that is not the chosen one is ``S - exp(z_c) >= 1``; that of the
    chosen class is the log-sum-exp of the others, which may be far below 1.
    """
    if logits.shape[-1] == 1:
        return torch.full_like(logits, torch.inf) + 0 * logits  # keeps NaN and the graph
    top_index = logits.argmax(dim=-1, keepdim=True)
    top = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_index, True)
    z = logits - logits.gather(-1, top_index).detach()
    e = z.exp()
    others = e.sum(dim=-1, keepdim=True) - e  # exact 0 derivative in z_c: e_c - e_c
    rest_of_top = torch.logsumexp(z.masked_fill(top, -torch.inf), dim=-1, keepdim=True)
    rest = torch.where(top, rest_of_top, torch.log(torch.where(top, torch.ones_like(others), others)))
    return z - rest


def softmax_focal_loss(
    input: torch.Tensor, target: torch.Tensor, alpha: float | torch.Tensor | None = None, gamma: float = 2.0,
    reduction: str = "mean", *, weight: torch.Tensor | None = None, ignore_index: int = -100,
    label_smoothing: float = 0.0, normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Softmax focal loss ``-alpha_y (1 - p_y)^gamma log(p_y)`` per element, ``p = softmax(input, dim=1)``.

    With label smoothing ``eps`` the target distribution is that of ``cross_entropy``,
    ``q_c = (1 - eps) [c = y] + eps / C``, and every class term carries its own focal factor:
    ``FL = -sum_c q_c w_c alpha_c (1 - p_c)^gamma log(p_c)`` (the focal loss of the smoothed
    distribution; the modulating factor of a class is that class's own probability). With ``eps = 0``
    this is ``-w_y alpha_y (1 - p_y)^gamma log(p_y)``; with ``gamma = 0`` and no ``alpha`` it is
    ``cross_entropy``'s smoothed loss, ``(1 - eps) w_y (-log p_y) + (eps / C) sum_c w_c (-log p_c)``.
    Differentiable by autograd, to any order.

    Args:
        input: logits ``(N, C)``, ``(N, C, d1, ...)`` (e.g. segmentation) or unbatched ``(C,)``; the
            class dimension is 1 (0 when unbatched), as for ``cross_entropy``. Any float dtype; the
            math runs in that dtype.
        target: integer class ids in ``[0, C)`` of shape ``(N,)``, ``(N, d1, ...)`` or ``()``;
            ``ignore_index`` marks an element that contributes neither loss nor gradient.
            (``cross_entropy``'s class-probability targets are not taken.)
        alpha: the focal loss's class balance factor, in the loss only: a per-class tensor ``(C,)``
            (``alpha_y`` for an element of class ``y``) or a number, the same factor for every
            class (a plain scale of the loss); None for none. Unlike ``weight`` it does not enter
            the denominator of the mean, as ``alpha`` does not in the sigmoid focal loss.
        gamma: focusing parameter >= 0; 0 gives the (weighted, smoothed) cross entropy.
        reduction: ``"none"`` (shape of ``target``), ``"sum"`` or ``"mean"``: ``cross_entropy``'s
            weighted mean, the sum divided by ``sum_n w_{y_n}`` over the elements that are not
            ignored (their number without ``weight``); label smoothing does not change it. When
            every element is ignored (or there are none) the mean is 0.
        weight: optional per-class weights ``(C,)``, ``cross_entropy``'s: they scale each class term
            and, for ``"mean"``, the denominator.
        ignore_index: class id of ignored elements (default -100); one in ``[0, C)`` ignores that
            class's elements, whose probability still enters the smoothing term of the others, as in
            ``cross_entropy``.
        label_smoothing: ``eps`` in [0, 1], smoothing towards the uniform distribution as above.
        normalizer: optional number or one-element tensor (on any device) dividing the loss before
            the reduction, as in :func:`focal.sigmoid_focal_loss`; meant for ``"sum"`` or ``"none"``.

    Returns:
        The loss: shape of ``target`` for ``"none"`` (0 at ignored elements), else a scalar.
    """
    if target.is_floating_point():
        raise ValueError(
            f"softmax_focal_loss takes integer class ids as target, got a {target.dtype} tensor"
        )
    if input.dim() == 1:  # unbatched (C,) with a 0-dim target, as cross_entropy allows
        loss = softmax_focal_loss(
            input.unsqueeze(0), target.unsqueeze(0), alpha, gamma, reduction, weight=weight,
            ignore_index=ignore_index, label_smoothing=label_smoothing, normalizer=normalizer,
        )
        return loss.squeeze(0) if reduction == "none" else loss

    num_classes = input.shape[1]
    # Classes last, so that every per-class factor broadcasts as a (C,) vector.
    logits = input.movedim(1, -1)
    # Each class against the rest is a binary problem with logit u_c = x_c - log(sum_{j != c} e^x_j):
    # p_c = sigmoid(u_c), 1 - p_c = sigmoid(-u_c), -log p_c = softplus(-u_c), all without
    # cancellation (as in the sigmoid focal loss), and each class term reaches the logits through
    # u_c alone. Forms that reach 1 - p_c through log_softmax, expm1 or a difference of
    # probabilities give the right value but, under autograd, gradients that cancel.
    _, one_minus_p, _, softplus_neg_u = logistic(_class_against_rest(logits))
    log_p = -softplus_neg_u

    ids = target.long()
    kept = ids != ignore_index
    safe_ids = torch.where(kept, ids, torch.zeros_like(ids))  # any valid class: masked below
    q = F.one_hot(safe_ids, num_classes).to(input.dtype)
    if label_smoothing:
        q = q * (1.0 - label_smoothing) + label_smoothing / num_classes

    class_factor = torch.ones(num_classes, dtype=input.dtype, device=input.device)
    if weight is not None:
        class_factor = class_factor * weight.to(class_factor)
    if alpha is not None:
        class_factor = class_factor * (alpha.to(class_factor) if isinstance(alpha, torch.Tensor) else alpha)

    terms = -q * class_factor * power(one_minus_p, gamma) * log_p
    # where, not a product: an ignored element is 0 whatever its logits (NaN included), as in cross_entropy
    loss = torch.where(kept, terms.sum(-1), torch.zeros_like(terms[..., 0]))

    # cross_entropy's weighted mean; all ignored (or empty) gives 0, not 0 / 0, as
    # focal.sigmoid_focal_loss does with class ids.
    target_weight = kept.to(input.dtype)
    if weight is not None:
        target_weight = target_weight * weight.to(input)[safe_ids]
    one = torch.ones((), dtype=input.dtype, device=input.device)
    denominator = torch.where(kept.any(), target_weight.sum(), one)
    return reduce_loss(loss, reduction, normalizer, denominator)
