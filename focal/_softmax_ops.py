"""What Python registers on ``torch.ops.focal.softmax_focal_loss``: fake kernel, autograd and vmap.

``torch.ops.focal.softmax_focal_loss(logits, target, weight, alpha, normalizer, alpha_value, gamma,
label_smoothing, ignore_index, reduction, scale, compute_grad) -> (loss, grad)``

- ``logits``: ``(N, C)``, ``(N, C, d1, ...)`` or ``(C,)``, contiguous float32 / float64 / float16 /
  bfloat16; the class dimension is 1 (0 when 1-D).
- ``target``: int64 class ids, contiguous, of the logits' shape without the class dimension; each is
  ``ignore_index`` or in ``[0, C)`` (an error on the CPU; NaN for that element on CUDA).
- ``weight``, ``alpha``: None or float ``(C,)`` tensors on the logits' device.
- ``normalizer``: None or a one-element tensor dividing the loss; ``alpha_value`` and ``scale``
  numbers multiplying it.
- Returns ``loss`` (``target``'s shape in the logits' dtype for "none", else a 0-dim float32 tensor,
  float64 for float64 logits) and ``grad`` = d loss / d logits (of ``loss.sum()`` for "none"), or an
  empty ``(0,)`` tensor when ``compute_grad`` is False.

Autograd (registered with :func:`torch.library.register_autograd`): the first derivative is the
saved ``grad`` times ``grad_output`` (in place when the graph is freed by this backward, as for
:mod:`focal._autograd`); a second derivative (``create_graph=True``) recomputes the gradient from the
logits through :func:`focal.reference.softmax_focal_loss`. Between forward and backward the node
holds the gradient and the small inputs, and only a weak reference to the logits.
"""

from __future__ import annotations

import torch

from focal import reference
from focal._autograd import _CALL, _is_eager, _WeakInput

__all__ = ["register"]

_NONES = (None,) * 11


def _fake(logits, target, weight, alpha, normalizer, alpha_value, gamma, label_smoothing, ignore_index,
          reduction, scale, compute_grad):
    if reduction == "none":
        loss = logits.new_empty(target.shape)
    else:
        loss = logits.new_empty((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    logits, target, weight, alpha, normalizer, alpha_value, gamma, eps, ignore_index, reduction, scale, _ = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    ctx.params = (alpha_value, gamma, eps, ignore_index, reduction, scale)
    ctx.class_dim = 0 if logits.dim() == 1 else 1
    user_logits = (getattr(_CALL, "tensors", None) or (None,))[0]
    ctx.logits = None if torch.compiler.is_compiling() else _WeakInput(
        logits, "logits", user_logits, lambda t: t.contiguous()
    )
    ctx.save_for_backward(grad if grad.shape == logits.shape else None, target, weight, alpha, normalizer)


def _differentiable_grad(ctx, target, weight, alpha, normalizer, grad_output):
    """d loss / d logits times grad_output, as a graph autograd can differentiate again."""
    alpha_value, gamma, eps, ignore_index, reduction, scale = ctx.params
    if ctx.logits is None:
        raise RuntimeError("focal.softmax_focal_loss under torch.compile is differentiable once, not twice")
    logits = ctx.logits.get()
    with torch.enable_grad():
        x = logits.detach().requires_grad_() if not logits.requires_grad else logits
        xm = x if x.dtype in (torch.float32, torch.float64) else x.float()
        loss = reference.softmax_focal_loss(
            xm, target, alpha if alpha is not None else None, gamma, reduction, weight=weight,
            ignore_index=ignore_index, label_smoothing=eps, normalizer=normalizer,
        )
        (grad,) = torch.autograd.grad(loss, x, grad_outputs=(grad_output * (scale * alpha_value)).to(loss.dtype),
                                      create_graph=True)
    return grad


def _backward(ctx, grad_output, _):
    grad, target, weight, alpha, normalizer = ctx.saved_tensors
    if grad_output is None or not ctx.needs_input_grad[0]:
        return (None,) + _NONES
    if torch.is_grad_enabled():  # create_graph=True
        return (_differentiable_grad(ctx, target, weight, alpha, normalizer, grad_output),) + _NONES
    if grad is None:
        raise RuntimeError(
            "torch.ops.focal.softmax_focal_loss was called with compute_grad=False, so it has no gradient "
            "to give; focal.softmax_focal_loss sets compute_grad whenever autograd needs it"
        )
    if grad_output.dim() > 0:  # reduction "none": one upstream value per element, broadcast over classes
        grad_output = grad_output.unsqueeze(ctx.class_dim)
    if not _is_eager(grad, grad_output) or torch._C._autograd._get_current_graph_task_keep_graph():
        return (grad * grad_output,) + _NONES
    torch.ops.focal.scale_grad_(grad, grad_output)
    return (grad,) + _NONES


def _vmap(info, in_dims, logits, target, weight, alpha, normalizer, *rest):
    """One call per sample, so that every argument combination (reductions, a normaliser per sample)
    batches correctly."""
    tensors = (logits, target, weight, alpha, normalizer)
    losses, grads = [], []
    for b in range(info.batch_size):
        sample = [t if t is None or d is None else t.select(d, b).contiguous() for t, d in zip(tensors, in_dims[:5])]
        loss, grad = torch.ops.focal.softmax_focal_loss(*sample, *rest)
        losses.append(loss)
        grads.append(grad)
    return (torch.stack(losses), torch.stack(grads)), (0, 0)


_REGISTERED = False


def register() -> None:
    """Registers the fake kernel, autograd and vmap rule (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    torch.library.register_fake("focal::softmax_focal_loss")(_fake)
    torch.library.register_autograd("focal::softmax_focal_loss", _backward, setup_context=_setup_context)
    torch.library.register_vmap("focal::softmax_focal_loss")(_vmap)
    _REGISTERED = True
