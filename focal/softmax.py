"""``focal.softmax_focal_loss``: the multi-class (softmax) focal loss as one fused operator."""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from focal import _autograd
from focal._softmax_ops import apply
from focal.functional import _forward_mode_or_transform
from focal._validate import _finite, _normalizer, _shape
from focal._extension import require_kernels

__all__ = ["softmax_focal_loss"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _real(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def _class_vector(value: Tensor, name: str, input: Tensor, classes: int) -> Tensor:
    """A per-class (C,) tensor: floating point, on the input's device, not requiring grad."""
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {value.dtype}")
    if list(value.shape) != [classes]:
        raise ValueError(f"{name} must have shape ({classes},) (one value per class), got {_shape(list(value.shape))}")
    if value.device != input.device:
        raise ValueError(f"{name} is on {value.device} but input is on {input.device}")
    if value.requires_grad:
        raise ValueError(f"gradients with respect to {name} are not supported: pass {name}.detach()")
    return value.contiguous()


def _op_arguments(input, target, alpha, gamma, reduction, weight, ignore_index, label_smoothing, normalizer):
    """Checks the public arguments; returns the operator's, less compute_grad."""
    for value, name in ((input, "input"), (target, "target")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float32, float64, float16 or bfloat16 logits, got {input.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class ids, got a {target.dtype} tensor "
            "(class-probability targets are not supported)"
        )
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: (C,), (N, C) or (N, C, d1, ...), got a 0-dim tensor")
    class_dim = 0 if input.dim() == 1 else 1
    expected = list(input.shape)
    classes = expected.pop(class_dim)
    if list(target.shape) != expected:
        raise ValueError(
            f"target must have the shape of input without its class dimension {class_dim}, {_shape(expected)}, "
            f"got {_shape(list(target.shape))}"
        )
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if not isinstance(reduction, str) or reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be one of ('none', 'mean', 'sum'), got {reduction!r}")
    _real(gamma, "gamma")
    if not (_finite(gamma) and gamma >= 0.0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    _real(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    alpha_tensor: Optional[Tensor] = None
    alpha_value = 1.0
    if isinstance(alpha, Tensor):
        alpha_tensor = _class_vector(alpha, "alpha", input, classes)
    elif alpha is not None:
        _real(alpha, "alpha")
        if not (_finite(alpha) and alpha >= 0.0):
            raise ValueError(f"alpha must be a finite number >= 0, a ({classes},) tensor or None, got {alpha}")
        alpha_value = float(alpha)
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        weight = _class_vector(weight, "weight", input, classes)
    if normalizer is not None and not isinstance(normalizer, Tensor):
        _real(normalizer, "normalizer")
    op_normalizer, scale = _normalizer(normalizer, input, reduction)
    return (
        input.contiguous(), target.to(torch.long).contiguous(), weight, alpha_tensor, op_normalizer, alpha_value,
        float(gamma), float(label_smoothing), int(ignore_index), reduction, scale,
    )


def softmax_focal_loss(
    input: Tensor,
    target: Tensor,
    alpha: Optional[Union[float, Tensor]] = None,
    gamma: float = 2.0,
    reduction: str = "mean",
    *,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
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
    args = _op_arguments(input, target, alpha, gamma, reduction, weight, ignore_index, label_smoothing, normalizer)
    logits = args[0]
    require_kernels(logits.device)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    if compute_grad or _forward_mode_or_transform(logits):
        # The op's own autograd, entered here so that torch.func transforms and forward mode see it too.
        with _autograd.callers_tensors(input, target, weight):
            loss, _ = apply(*args, True)
        return loss
    loss, _ = torch.ops.focal.softmax_focal_loss(*args, False)
    return loss
