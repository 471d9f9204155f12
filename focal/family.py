"""The focal loss's family as fused operators: FL*, the quality focal loss and the varifocal loss.

Each is one pass over the logits that computes the loss and, when autograd will need it, its
gradient, on the CPU and on CUDA, with the conventions of :func:`focal.sigmoid_focal_loss`: logits
``(..., C)`` with the class dimension last, float32 / float64 / float16 / bfloat16 (float32 math for
16-bit data), ``weight`` broadcastable to the logits, a ``normalizer`` (number or one-element tensor,
also on the GPU) dividing the loss without a host sync, reductions ``"none"``, ``"sum"`` and
``"mean"`` (over the elements that are not ignored), and integer class-id targets that are never
expanded to a one-hot tensor. :mod:`focal.reference` states the same math in plain PyTorch.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from focal import ops

__all__ = ["sigmoid_focal_loss_star", "quality_focal_loss", "varifocal_loss"]

QualityTargets = Union[Tensor, Sequence[Tensor]]


def sigmoid_focal_loss_star(
    inputs: Tensor, targets: Tensor, gamma: float = 2.0, beta: float = 1.0,
    alpha: Optional[Union[float, Tensor]] = None, reduction: str = "none", *, weight: Optional[Tensor] = None,
    normalizer: Optional[Union[float, Tensor]] = None, ignore_index: int = -100, label_smoothing: float = 0.0,
    background_index: int = -1,
) -> Tensor:
    r"""FL*, the focal loss variant of Appendix A of "Focal Loss for Dense Object Detection" (Lin et
    al., 2017), fused.

    ``FL* = -log(sigmoid(gamma x_t + beta)) / gamma`` per element, with ``x_t = x`` for a positive
    and ``x_t = -x`` for a negative; its derivative is Appendix B's ``dFL*/dx = y (p*_t - 1)`` with
    ``p*_t = sigmoid(gamma x_t + beta)`` and ``y = +-1``. ``gamma`` sharpens the loss around
    ``x_t = 0`` and ``beta`` shifts it (``gamma = 1, beta = 0`` is the binary cross entropy). The
    paper's settings, with which Appendix A finds FL* about as effective as FL: ``gamma = 2, beta =
    1`` and ``gamma = 4, beta = 0``. A soft target ``t`` mixes both sides linearly, as the binary
    cross entropy does, and the loss is scaled by ``alpha_t`` as in :func:`focal.sigmoid_focal_loss`.

    Args:
        inputs: logits ``(..., C)``, class dimension last.
        targets: float (or bool) targets of the shape of ``inputs``, hard 0/1 or soft in [0, 1]; or
            integer class ids of shape ``inputs.shape[:-1]`` (``c`` in ``[0, C)`` a positive for
            class ``c``, ``background_index`` background, ``ignore_index`` ignored; any other id is
            a ValueError on the CPU and a NaN row on CUDA).
        gamma: sharpness > 0. beta: shift, any finite number.
        alpha: weight of the positives in [0, 1] (negatives get ``1 - alpha``), or a ``(C,)``
            tensor of one per class; None (the default, as in Appendix A) or -1 for none.
        reduction: ``"none"`` (shape and dtype of ``inputs``), ``"sum"`` or ``"mean"`` (a 0-dim
            float32 tensor, float64 for float64 inputs).
        weight, normalizer, ignore_index, label_smoothing, background_index: as for
            :func:`focal.sigmoid_focal_loss`.

    Returns:
        The loss, differentiable with respect to ``inputs`` to any order.

    Example:
        >>> logits = torch.randn(8, 100, 80, requires_grad=True)
        >>> labels = torch.randint(-1, 80, (8, 100))                 # -1 = background
        >>> num_pos = (labels >= 0).sum().clamp(min=1)
        >>> loss = focal.sigmoid_focal_loss_star(logits, labels, gamma=2.0, beta=1.0,
        ...                                      reduction="sum", normalizer=num_pos)
    """
    return ops.call(
        "sigmoid_focal_loss_star", inputs, targets, weight, gamma=gamma, beta=beta, alpha=alpha, reduction=reduction,
        normalizer=normalizer, ignore_index=ignore_index, label_smoothing=label_smoothing,
        background_index=background_index,
    )


def quality_focal_loss(
    inputs: Tensor, targets: QualityTargets, beta: float = 2.0, reduction: str = "none", *,
    weight: Optional[Tensor] = None, normalizer: Optional[Union[float, Tensor]] = None, ignore_index: int = -100,
    background_index: int = -1,
) -> Tensor:
    r"""Quality focal loss (Li et al., "Generalized Focal Loss: Learning Qualified and Distributed
    Bounding Boxes for Dense Object Detection", 2020), fused.

    ``QFL = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma))`` per element, ``sigma =
    sigmoid(x)``: the binary cross entropy with a soft quality target ``y`` in [0, 1] (for a
    positive, the IoU of its predicted box with its ground truth; 0 for every other class), scaled
    by the prediction's distance from it. Where ``y = sigma`` exactly the gradient is 0 (the
    derivative there for ``beta > 1``). Finite for any finite logit.

    Args:
        inputs: logits ``(..., C)``, class dimension last.
        targets: dense quality targets of the shape of ``inputs`` (values in [0, 1]), or the pair
            ``(ids, scores)``: integer class ids of shape ``inputs.shape[:-1]`` (``c`` in ``[0, C)``,
            ``background_index`` background, ``ignore_index`` ignored) and float scores of that shape, the
            quality of each row's class (not read for background and ignored rows). The pair never
            builds a dense target tensor.
        beta: focusing exponent >= 0; the paper uses 2 (0 gives the binary cross entropy).
        reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over the elements that are not ignored).
        weight, normalizer: as for :func:`focal.sigmoid_focal_loss` (GFL normalises by the sum of
            the positives' scores, or their number).
        ignore_index: class id of ignored rows (pair form only), outside ``[0, C)``.
        background_index: class id of background rows (pair form only), outside ``[0, C)`` and
            not ``ignore_index``: -1 (the default) or e.g. ``C``.

    Returns:
        The loss, differentiable with respect to ``inputs`` to any order.

    Example:
        >>> logits = torch.randn(1000, 80, requires_grad=True)
        >>> ids = torch.randint(-1, 80, (1000,))                      # -1 = background
        >>> iou = torch.rand(1000)                                     # IoU of each predicted box
        >>> loss = focal.quality_focal_loss(logits, (ids, iou), reduction="sum",
        ...                                 normalizer=(ids >= 0).sum().clamp(min=1))
    """
    return ops.call(
        "quality_focal_loss", inputs, targets, weight, beta=beta, reduction=reduction, normalizer=normalizer,
        ignore_index=ignore_index, background_index=background_index,
    )


def varifocal_loss(
    inputs: Tensor, targets: QualityTargets, alpha: Union[float, Tensor] = 0.75, gamma: float = 2.0,
    reduction: str = "none", *, weight: Optional[Tensor] = None, normalizer: Optional[Union[float, Tensor]] = None,
    ignore_index: int = -100, background_index: int = -1,
) -> Tensor:
    r"""Varifocal loss (Zhang et al., "VarifocalNet: An IoU-aware Dense Object Detector", 2021), fused.

    ``VFL = -q (q log(p) + (1 - q) log(1 - p))`` where the target ``q > 0`` and ``VFL = -alpha
    p^gamma log(1 - p)`` where ``q = 0``, ``p = sigmoid(x)``: positives are weighted by their own
    quality ``q`` (the IoU of the predicted box with its ground truth), and only negatives are
    down-weighted focally. A positive whose score is 0 is a negative for its class, as in the
    paper. Finite for any finite logit.

    Args:
        inputs: logits ``(..., C)``, class dimension last.
        targets: dense quality targets of the shape of ``inputs``, or the pair ``(ids, scores)`` (see
            :func:`quality_focal_loss`).
        alpha: weight of the negatives (``q = 0``), >= 0, or a ``(C,)`` tensor of one per class;
            the paper uses 0.75.
        gamma: focusing exponent of the negatives, >= 0; the paper uses 2.
        reduction, weight, normalizer, ignore_index, background_index: as for
            :func:`quality_focal_loss`.

    Returns:
        The loss, differentiable with respect to ``inputs`` to any order.

    Example:
        >>> loss = focal.varifocal_loss(logits, (ids, iou), reduction="sum",
        ...                             normalizer=(ids >= 0).sum().clamp(min=1))
    """
    return ops.call(
        "varifocal_loss", inputs, targets, weight, alpha=alpha, gamma=gamma, reduction=reduction,
        normalizer=normalizer, ignore_index=ignore_index, background_index=background_index,
    )
