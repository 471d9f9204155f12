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

from focal.reference._common import power, reduce_loss

__all__ = ["softmax_focal_loss"]


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    alpha: float | torch.Tensor | None = None,
    gamma: float = 2.0,
    reduction: str = "mean",
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
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
    # log p = z - log(1 + s), z = logits - max, s the sum of exp(z) over every class but one
    # maximal one: log1p keeps log p of a near-certain class (and so 1 - p) to full relative
    # accuracy, which log_softmax's z - log(sum exp(z)) loses by cancellation.
    # The maximum is taken as the value of one chosen maximal class (gather at argmax), not as amax:
    # log p is then exactly log_softmax for that choice, and so is its gradient. amax would split
    # its gradient between tied maxima (common in 16-bit logits) while the expression below treats
    # the chosen one alone as exp(0) = 1: a wrong gradient at ties.
    top_index = logits.argmax(dim=-1, keepdim=True)
    z = logits - logits.gather(-1, top_index)
    top = F.one_hot(top_index.squeeze(-1), num_classes).bool()
    others = torch.where(top, torch.zeros_like(z), z.exp()).sum(dim=-1, keepdim=True)
    log_p = z - torch.log1p(others)
    one_minus_p = -torch.expm1(log_p)

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
