"""``focal.sigmoid_focal_loss``: the public entry point."""

from typing import Optional, Union

import torch
from torch import Tensor

from focal import _validate, ops

__all__ = ["sigmoid_focal_loss"]


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, alpha: Optional[Union[float, Tensor]] = 0.25, gamma: float = 2.0,
    reduction: str = "none", weight: Optional[Tensor] = None, normalizer: Optional[Union[float, Tensor]] = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, background_index: int = -1,
) -> Tensor:
    r"""Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", eq. 5), fused.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` per element, with ``p = sigmoid(inputs)``. One pass
    over the logits computes the loss and, when autograd will need it, its gradient, which backward
    then only scales. A drop-in replacement for ``torchvision.ops.sigmoid_focal_loss`` (same
    positional arguments), also under ``torch.jit.script``.

    Args:
        inputs: logits of any shape ``(..., C)``, class dimension last; float32, float64, float16
            or bfloat16, contiguous or not. The math runs in float32 (float64 for float64).
        targets: either
            - float (or bool) targets of the shape of ``inputs``: hard 0/1 or soft in [0, 1], with
              the same values and gradients as torchvision's function; or
            - integer class ids of shape ``inputs.shape[:-1]``: ``c`` in ``[0, C)`` makes that row
              a positive for class ``c`` and a negative for all others, ``background_index``
              (``-1`` by default) is background (negative for every class), ``ignore_index``
              contributes neither loss nor gradient.
              Any other value is an error (ValueError on the CPU; on CUDA, where checking would
              need a host sync, the row's loss and gradient become NaN). The one-hot tensor is
              never materialised.
        alpha: weight of the positives in [0, 1] (negatives get ``1 - alpha``); None or -1 for
            no weighting; or a float ``(C,)`` tensor: ``alpha[c]`` for the positives of class ``c``
            and ``1 - alpha[c]`` for its negatives (checked to lie in [0, 1] on the CPU only).
        gamma: focusing parameter >= 0; 0, 1 and 2 have fast paths, any other value works.
        reduction: ``"none"`` (shape of ``inputs``, their dtype), ``"sum"`` or ``"mean"`` (a
            0-dim float32 tensor, float64 for float64 inputs). The mean is over the elements
            that are not ignored; with class ids a batch whose rows are all ignored gives 0, while
            empty float targets give NaN, as ``torch.mean`` does.
        weight: optional weights broadcastable to ``inputs``, e.g. per class ``(C,)`` or per row
            ``(..., 1)``; cast to the dtype of ``inputs``. Not differentiated.
        normalizer: optional positive number or one-element tensor (for instance the number of
            positive anchors, which may live on the GPU) dividing the loss inside the op, without
            a host sync. Use with ``"sum"`` (or ``"none"``). A tensor on the CPU is checked to be
            finite and positive; one on the GPU cannot be without a sync.
        ignore_index: class id of ignored rows (integer targets only); outside [0, C) and not
            ``background_index``.
        label_smoothing: ``eps`` in [0, 1]; every binary target ``t`` becomes
            ``t (1 - eps) + eps / 2``, exactly as if those soft targets had been passed.
        background_index: class id of background rows (integer targets only), outside [0, C):
            ``-1`` (the default) or, as mmdetection, detectron2 and ultralytics mark it,
            ``C``. The ids -1 and ``C`` take the fast path on CUDA; any other takes the general one.

    Returns:
        The loss: shape of ``inputs`` for ``"none"``, else a scalar. Differentiable with respect to
        ``inputs`` (not to targets, weights or the normaliser), to any order: a second derivative
        (``create_graph=True``, ``torch.autograd.functional.hessian``) recomputes the math from
        ``inputs``, which must then still exist unmodified; see :mod:`focal._autograd`.

    Example:
        >>> logits = torch.randn(8, 100, 80, requires_grad=True)   # (N, anchors, classes)
        >>> labels = torch.randint(-1, 80, (8, 100))                # -1 = background
        >>> num_pos = (labels >= 0).sum().clamp(min=1)
        >>> loss = sigmoid_focal_loss(logits, labels, reduction="sum", normalizer=num_pos)
        >>> loss.backward()
    """
    if torch.jit.is_scripting():
        args = _validate.op_arguments(
            inputs, targets, alpha, gamma, reduction, weight, normalizer, ignore_index, label_smoothing,
            background_index,
        )
        loss, _ = torch.ops.focal.sigmoid_focal_loss(
            args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7], args[8], args[9], args[10],
            torch.is_grad_enabled() and args[0].requires_grad, args[11], args[12],
        )
        return loss
    else:
        return ops.call(
            "sigmoid_focal_loss", inputs, targets, weight, alpha=alpha, gamma=gamma, reduction=reduction,
            normalizer=normalizer, ignore_index=ignore_index, label_smoothing=label_smoothing,
            background_index=background_index,
        )
