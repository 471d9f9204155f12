"""Pure-PyTorch references for two focal losses with soft *quality* targets: QFL and VFL.

* Quality focal loss (Li et al., "Generalized Focal Loss: Learning Qualified and Distributed Bounding
  Boxes for Dense Object Detection", 2020):
  ``QFL = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma))``, ``sigma = sigmoid(x)``: the binary
  cross entropy with the soft target ``y`` scaled by the distance of the prediction from it.
* Varifocal loss (Zhang et al., "VarifocalNet: An IoU-aware Dense Object Detector", 2021):
  ``VFL = -q (q log(p) + (1 - q) log(1 - p))`` where ``q > 0`` and ``VFL = -alpha p^gamma log(1 - p)``
  where ``q = 0``, ``p = sigmoid(x)``: positives are weighted by their own quality, only negatives are
  down-weighted focally.

The target of a class is its quality: for a positive anchor, the IoU of its predicted box with its
ground-truth box for its class, and 0 for every other class (and for every class of a background
anchor). Both losses take it in either of two forms:

* dense float targets of the shape of the logits ``(..., C)``, values in [0, 1]; or
* the pair ``(ids, scores)``: integer class ids of shape ``inputs.shape[:-1]`` (``c`` in ``[0, C)`` a
  positive for class ``c``, ``-1`` background, ``ignore_index`` an ignored row) and float scores of
  the same shape, the quality of each row's class (not read for background and ignored rows). The
  reference builds the dense targets from it; the point of the form is that the fused op need not.

``weight``, ``normalizer`` and the reductions follow :func:`focal.sigmoid_focal_loss`: ``"mean"``
divides by the number of elements that are not ignored (at least 1 with the pair form; dense
targets follow ``torch.mean``). Like the other references they materialise every intermediate and do
no argument validation beyond what the math needs.

Nothing is formed by cancellation that the math does not itself cancel: ``1 - sigma`` is
``sigmoid(-x)``, the cross entropy a sum of two non-negative ``softplus`` terms, ``p^gamma`` a power
of the exact sigmoid (not ``exp(gamma log p)``, whose rounded argument costs ``|gamma log p|`` ulps); only ``|y - sigma|`` near ``y = sigma`` loses what its condition number
says it must (tests/test_oracle.py checks this against arbitrary precision).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from focal.reference._common import is_class_ids, logistic, one_hot_rows, power, reduce_elements

__all__ = ["quality_focal_loss", "varifocal_loss", "quality_targets"]

QualityTargets = Union[torch.Tensor, Sequence[torch.Tensor]]


def quality_targets(
    inputs: torch.Tensor, targets: QualityTargets, ignore_index: int = -100, background_index: int = -1
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Return ``(quality, keep, class_ids)``: dense quality targets and keep mask, both shaped like
    ``inputs`` and in its dtype, and whether ``targets`` was the ``(ids, scores)`` pair."""
    if isinstance(targets, (tuple, list)):
        if len(targets) != 2:
            raise ValueError(f"quality targets as a pair are (ids, scores), got {len(targets)} tensors")
        ids, scores = targets
        if tuple(ids.shape) != tuple(inputs.shape[:-1]) or scores.shape != ids.shape:
            raise ValueError(
                f"(ids, scores) must both have the shape of inputs without the class dimension, "
                f"{tuple(inputs.shape[:-1])}; got {tuple(ids.shape)} and {tuple(scores.shape)}"
            )
        one_hot, kept = one_hot_rows(ids, inputs.shape[-1], ignore_index, inputs.dtype, background_index)
        # where, not a product: the scores of background and ignored rows are never read
        scores = scores.to(inputs.dtype).unsqueeze(-1).expand_as(inputs)
        quality = torch.where(one_hot.bool(), scores, torch.zeros_like(scores))
        keep = kept.unsqueeze(-1).expand_as(inputs).to(inputs.dtype)
        return quality, keep, True
    if is_class_ids(targets):
        raise ValueError(
            "quality targets need scores: pass dense float targets or the pair (ids, scores), "
            f"got a {targets.dtype} tensor alone"
        )
    return targets.to(inputs.dtype), torch.ones_like(inputs), False


def _bce(softplus_x: torch.Tensor, softplus_neg_x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The binary cross entropy with logits ``x`` and soft targets ``t``, as two non-negative terms
    ``t softplus(-x) + (1 - t) softplus(x)``: full relative precision also where ``t`` is close to
    ``sigmoid(x)`` at large ``|x|``, where ``binary_cross_entropy_with_logits``'s ``(1 - t) x +
    softplus(-x)`` cancels."""
    return t * softplus_neg_x + (1 - t) * softplus_x


def quality_focal_loss(
    inputs: torch.Tensor, targets: QualityTargets, beta: float = 2.0, reduction: str = "none", *,
    weight: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None, ignore_index: int = -100,
    background_index: int = -1,
) -> torch.Tensor:
    r"""Quality focal loss ``-|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma))``, elementwise.

    Computed as ``|y (1 - sigma) - (1 - y) sigma|^beta`` (exact for ``y`` in {0, 1}) times the binary
    cross entropy with logits, finite for any finite logit; ``beta = 0`` is the binary cross entropy
    with soft targets. Where ``y = sigma`` exactly the gradient is taken as 0 (the true one for
    ``beta > 1``; below, there is none).
    Differentiable by autograd, to any order.

    Args:
        inputs: logits ``(..., C)``, class dimension last; any float dtype.
        targets: dense quality targets of the shape of ``inputs``, or the pair ``(ids, scores)``
            (see the module docstring).
        beta: the focusing exponent >= 0; the paper uses 2.
        reduction: ``"none"`` (shape of ``inputs``), ``"sum"`` or ``"mean"`` (over the elements
            that are not ignored).
        weight: optional weights broadcastable to ``inputs``, e.g. per class ``(C,)`` or per row
            ``(..., 1)``.
        normalizer: optional number or one-element tensor (on any device) dividing the loss, e.g.
            the number of positives or the sum of their scores.
        ignore_index: class id of ignored rows (pair form only).
        background_index: class id of background rows (pair form only), -1 by default.

    Returns:
        The loss: shape of ``inputs`` for ``"none"`` (0 in ignored rows), else a scalar.
    """
    quality, keep, class_ids = quality_targets(inputs, targets, ignore_index, background_index)
    sigma, one_minus_sigma, softplus_x, softplus_neg_x = logistic(inputs)
    distance = quality * one_minus_sigma - (1 - quality) * sigma  # y - sigma
    loss = power(distance.abs(), beta) * _bce(softplus_x, softplus_neg_x, quality)
    return reduce_elements(loss, keep, class_ids, reduction, normalizer, weight)


def varifocal_loss(
    inputs: torch.Tensor, targets: QualityTargets, alpha: float | torch.Tensor = 0.75, gamma: float = 2.0,
    reduction: str = "none", *,
    weight: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None, ignore_index: int = -100,
    background_index: int = -1,
) -> torch.Tensor:
    r"""Varifocal loss, elementwise: ``-q (q log(p) + (1 - q) log(1 - p))`` where ``q > 0``,
    ``-alpha p^gamma log(1 - p)`` where ``q = 0``.

    Computed as ``q`` times the binary cross entropy with logits and
    ``alpha * sigmoid(x)^gamma * softplus(x)``, finite (with finite gradients) for any finite logit.
    A positive row whose score is 0 is a negative for its class, as in the paper (``q`` is the IoU, 0
    when the box misses). Differentiable by autograd, to any order.

    Args:
        inputs: logits ``(..., C)``, class dimension last; any float dtype.
        targets: dense quality targets of the shape of ``inputs``, or the pair ``(ids, scores)``
            (see the module docstring).
        alpha: weight of the negatives (``q = 0``), or a ``(C,)`` tensor of one per class; the paper
            uses 0.75. Positives are weighted by ``q`` instead.
        gamma: focusing exponent >= 0 of the negatives; the paper uses 2.
        reduction, weight, normalizer, ignore_index, background_index: as for :func:`quality_focal_loss`.

    Returns:
        The loss, as :func:`quality_focal_loss`'s.
    """
    quality, keep, class_ids = quality_targets(inputs, targets, ignore_index, background_index)
    p, _, softplus_x, softplus_neg_x = logistic(inputs)
    positive = quality * _bce(softplus_x, softplus_neg_x, quality)
    # power(), not exp(gamma log p), whose rounded argument costs |gamma log p| ulps; its gradient
    # is 0, not NaN, where p underflows to 0, for any gamma
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(inputs.dtype)
    negative = alpha * power(p, gamma) * softplus_x
    loss = torch.where(quality > 0, positive, negative)
    return reduce_elements(loss, keep, class_ids, reduction, normalizer, weight)
