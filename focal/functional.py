"""``focal.sigmoid_focal_loss``: the public, differentiable entry point."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from focal import _args
from focal.ops import require_kernels, sigmoid_focal_loss_op

__all__ = ["sigmoid_focal_loss"]


def _is_exactly_one(grad_output: torch.Tensor) -> bool:
    """True when ``grad_output`` is known, without a device sync, to be all ones.

    Only CPU tensors outside of tracing qualify: a 0-dim gradient (``loss.backward()`` on a reduced
    loss) or a fully broadcast one (``loss.sum().backward()`` on an unreduced loss).
    """
    return (
        type(grad_output) is torch.Tensor
        and grad_output.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
        and grad_output.numel() > 0
        and all(s == 0 for s in grad_output.stride())
        and grad_output[(0,) * grad_output.dim()].item() == 1.0
    )


class _SigmoidFocalLoss(torch.autograd.Function):
    """Forward computes the loss and, when needed, its gradient; backward only scales the gradient.

    In eager mode the gradient buffer is owned by this node and handed to the first backward, which
    scales it in place (and not at all when ``grad_output`` is 1 on the CPU), so a training step
    makes no copy of it. A later backward through a retained graph (``retain_graph=True``) cannot
    reuse that buffer, which autograd may have accumulated into; it recomputes the gradient from
    the saved inputs instead. Under ``torch.compile`` the gradient is a plain saved tensor.
    """

    @staticmethod
    def forward(ctx, logits, targets, weight, row_weight, normalizer, *params):
        compute_grad = ctx.needs_input_grad[0]
        loss, grad = sigmoid_focal_loss_op()(
            logits, targets, weight, row_weight, normalizer, *params, compute_grad
        )
        ctx.traced = torch.compiler.is_compiling()
        if compute_grad and ctx.traced:
            ctx.save_for_backward(grad)
        elif compute_grad:
            ctx.owned_grad = grad
            ctx.params = params
            ctx.save_for_backward(logits, targets, weight, row_weight, normalizer)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.traced:
            (grad,) = ctx.saved_tensors
            return (grad * grad_output,) + (None,) * 10
        grad, ctx.owned_grad = ctx.owned_grad, None
        if grad is None:  # a second backward through a retained graph
            _, grad = sigmoid_focal_loss_op()(*ctx.saved_tensors, *ctx.params, True)
        if not _is_exactly_one(grad_output):
            grad.mul_(grad_output)
        return (grad,) + (None,) * 10


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
    r"""Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", eq. 5), fused.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` per element, with ``p = sigmoid(inputs)``. One pass
    over the logits computes the loss and, when ``inputs`` requires grad, its gradient, which
    backward then only scales. A drop-in replacement for ``torchvision.ops.sigmoid_focal_loss``.

    Args:
        inputs: logits of any shape ``(..., C)``, class dimension last; float32, float64, float16
            or bfloat16, contiguous or not. The math runs in float32 (float64 for float64).
        targets: either
            - float (or bool) targets of the shape of ``inputs``: hard 0/1 or soft in [0, 1], with
              the same values and gradients as torchvision's function; or
            - integer class ids of shape ``inputs.shape[:-1]``: ``c`` in ``[0, C)`` makes that row
              a positive for class ``c`` and a negative for all others, ``-1`` is background
              (negative for every class), ``ignore_index`` contributes neither loss nor gradient.
              Any other value is an error (ValueError on the CPU; on CUDA, where checking would
              need a host sync, the row's loss and gradient become NaN). The one-hot tensor is
              never materialised.
        alpha: weight of the positives in [0, 1] (negatives get ``1 - alpha``); None or -1 for
            no weighting.
        gamma: focusing parameter >= 0; 0, 1 and 2 have fast paths, any other value works.
        reduction: ``"none"`` (shape of ``inputs``, their dtype), ``"sum"`` or ``"mean"`` (a
            0-dim float32 tensor, float64 for float64 inputs). The mean is over the elements
            that are not ignored; with class ids a batch whose rows are all ignored gives 0, while
            empty float targets give NaN, as ``torch.mean`` does.
        weight: optional weights broadcastable to ``inputs``, e.g. per class ``(C,)`` or per row
            ``(..., 1)``; cast to the dtype of ``inputs``. Not differentiated.
        normalizer: optional positive number or one-element tensor (for instance the number of
            positive anchors, which may live on the GPU) dividing the loss inside the op, without
            a host sync. Use with ``"sum"`` (or ``"none"``). A tensor normaliser is checked for
            positivity on the CPU only.
        ignore_index: class id of ignored rows (integer targets only); must lie outside [-1, C).
        label_smoothing: ``eps`` in [0, 1]; every binary target ``t`` becomes
            ``t (1 - eps) + eps / 2``, exactly as if those soft targets had been passed.

    Returns:
        The loss: shape of ``inputs`` for ``"none"``, else a scalar. It is differentiable once
        with respect to ``inputs`` (not twice, and not with respect to targets or weights).

    Example:
        >>> logits = torch.randn(8, 100, 80, requires_grad=True)   # (N, anchors, classes)
        >>> labels = torch.randint(-1, 80, (8, 100))                # -1 = background
        >>> num_pos = (labels >= 0).sum().clamp(min=1)
        >>> loss = sigmoid_focal_loss(logits, labels, reduction="sum", normalizer=num_pos)
        >>> loss.backward()
    """
    args = _args.prepare(
        inputs, targets, alpha, gamma, reduction, weight, normalizer, ignore_index, label_smoothing
    )
    require_kernels(args.logits.device)
    loss = _SigmoidFocalLoss.apply(
        args.logits, args.targets, args.weight, args.row_weight, args.normalizer, args.alpha,
        args.gamma, args.label_smoothing, args.ignore_index, args.reduction, args.scale,
    )
    if reduction == "none":
        loss = loss.reshape(args.out_shape)
    return loss
