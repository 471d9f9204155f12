"""``focal.softmax_focal_loss``: the multi-class (softmax) focal loss as one fused operator."""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from focal import ops

__all__ = ["softmax_focal_loss"]

def softmax_focal_loss(
    input: Tensor, target: Tensor, alpha: Optional[Union[float, Tensor]] = None, gamma: float = 2.0,
    reduction: str = "mean", *, weight: Optional[Tensor] = None, ignore_index: int = -100, label_smoothing: float = 0.0,
    normalizer: Optional[Union[float, Tensor]] = None,
) -> Tensor:
    r"""Softmax focal loss ``-alpha_y (1 - p_y)^gamma log(p_y)``, ``p = softmax(input)`` over classes, fused.

    The multi-class form of the focal loss of Lin et al., "Focal Loss for Dense Object Detection"
    (2017, eq. 5 with ``p_t`` the softmax probability of the target class). It follows the
    conventions of :func:`torch.nn.functional.cross_entropy` (shapes, ``weight``, ``ignore_index``,
    ``label_smoothing``, the weighted mean), so with ``gamma=0`` and no ``alpha`` it equals
    ``cross_entropy`` for every argument combination except a ``"mean"`` over only ignored elements,
    which is 0 here (NaN there). With label smoothing ``eps`` every class term carries its own
    focal factor: ``FL = -sum_c q_c w_c alpha_c (1 - p_c)^gamma log(p_c)``,
    ``q_c = (1 - eps) [c = y] + eps / C``. :func:`focal.reference.softmax_focal_loss` is the
    pure-PyTorch statement of the same math.

    One pass per row (its maximum, its exp sum, then loss and gradient) computes the loss and, when
    autograd will need it, the gradient, which backward then only scales; the probabilities are never
    stored. Stable for every finite logit (finite at +-1e4; ``1 - p`` of a near-certain class without
    cancellation, also for ``0 < gamma < 1``); NaN in a row gives NaN for that element.

    Args:
        input: logits ``(N, C)``, ``(N, C, d1, ...)`` (segmentation) or unbatched ``(C,)``, class
            dimension 1 (0 when unbatched); float32, float64, float16 or bfloat16, contiguous or
            not. The math runs in float32 (float64 for float64).
        target: integer class ids of ``input``'s shape without the class dimension, each in
            ``[0, C)`` or equal to ``ignore_index`` (an element that contributes neither loss nor
            gradient). Any other value is a ValueError on the CPU; on CUDA, where checking would
            need a host sync, that element's loss becomes NaN.
        alpha: class balance: a number (the same factor for every class, a plain scale of the
            loss) or a per-class tensor ``(C,)``; None for none. Unlike ``weight`` it does not enter
            the denominator of the mean.
        gamma: focusing parameter >= 0; 0 gives the (weighted, smoothed) cross entropy; 0, 1 and 2
            have fast paths.
        reduction: ``"none"`` (``target``'s shape, ``input``'s dtype), ``"sum"`` or ``"mean"`` (a
            0-dim float32 tensor, float64 for float64 input): ``cross_entropy``'s weighted mean, the
            sum divided by the sum of ``weight[y]`` over the elements not ignored (their number
            without ``weight``); 0 when every element is ignored.
        weight: optional per-class weights ``(C,)``, as ``cross_entropy``'s. Not differentiated.
        ignore_index: class id of ignored elements (default -100); may lie inside ``[0, C)``.
        label_smoothing: ``eps`` in [0, 1], as ``cross_entropy``'s.
        normalizer: optional positive number or one-element tensor (on the CPU or ``input``'s
            device) dividing the loss inside the op without a host sync; for ``"sum"`` or ``"none"``.

    Returns:
        The loss, differentiable with respect to ``input`` to any order, in reverse and forward mode
        (``torch.func.grad``, ``vmap``, ``jvp``, ``hessian``); a second derivative recomputes the
        math from ``input``, which must then still exist unmodified.

    Example:
        >>> logits = torch.randn(8, 21, 64, 64, requires_grad=True)   # (N, classes, H, W)
        >>> labels = torch.randint(0, 21, (8, 64, 64))
        >>> loss = softmax_focal_loss(logits, labels, gamma=2.0)      # mean over pixels
        >>> loss.backward()
    """
    return ops.call(
        "softmax_focal_loss", input, target, weight, alpha=alpha, gamma=gamma, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, normalizer=normalizer,
    )
