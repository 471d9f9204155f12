"""The compiled operators and what Python registers on them: fake kernels, autograd and vmap.

``torch.ops.focal.sigmoid_focal_loss(logits, targets, weight, row_weight, normalizer, alpha, gamma,
label_smoothing, ignore_index, reduction, scale, compute_grad) -> (loss, grad)``

- ``logits``: ``(..., C)`` contiguous float32 / float64 / float16 / bfloat16.
- ``targets``: the logits' shape and dtype (binary or soft targets), or int64 class ids of shape
  ``logits.shape[:-1]`` (``[0, C)`` positive class, ``-1`` background, ``ignore_index`` ignored).
- ``weight``: None, ``(C,)`` or the logits' shape; ``row_weight``: None or ``logits.shape[:-1]``;
  both in the logits' dtype.
- ``normalizer``: None or a one-element tensor that divides the loss; ``scale``: a float multiplying it.
- ``alpha`` < 0 disables alpha weighting; ``reduction`` is "none", "mean" or "sum".
- Returns ``loss`` (the logits' shape and dtype for "none", else a 0-dim float32 tensor, float64
  for float64 logits) and ``grad`` = d loss / d logits (the logits' shape and dtype), or an empty
  ``(0,)`` tensor when ``compute_grad`` is False.

The extension itself is loaded by :mod:`focal._extension`.

The op is differentiable with respect to ``logits`` (see :mod:`focal._autograd`); ``grad`` is not
differentiable. ``grad`` is the very buffer that backward scales and hands to autograd: a caller of
the raw op that keeps it sees it scaled by ``grad_output`` after a backward that frees the graph.
``ignore_index`` must lie outside ``[-1, C)`` (the kernels tell ignored rows apart by it).

The other elementwise losses of the family take the same arguments in the same roles:

- ``sigmoid_focal_loss_star(logits, targets, weight, row_weight, normalizer, alpha, gamma, beta,
  label_smoothing, ignore_index, reduction, scale, compute_grad)``: FL* (``gamma`` > 0);
- ``quality_focal_loss(logits, targets, scores, weight, row_weight, normalizer, beta, ignore_index,
  reduction, scale, compute_grad)`` and ``varifocal_loss(logits, targets, scores, weight, row_weight,
  normalizer, alpha, gamma, ignore_index, reduction, scale, compute_grad)``: ``targets`` the
  logits' shape and dtype, or int64 class ids of shape ``logits.shape[:-1]`` with ``scores`` of
  that shape in the logits' dtype (the target of each row's class).

``torch.ops.focal.scale_grad_(grad, grad_output)`` multiplies ``grad`` in place (no pass at all
when ``grad_output`` is a single 1, decided on the device for CUDA tensors).
"""

from __future__ import annotations

import torch

from focal._extension import BUILD_ERROR

__all__ = ["LOSS_OPS"]


def _loss_fake(*args):
    """Shapes and dtypes of (loss, grad) for any of the elementwise loss ops."""
    logits, reduction, compute_grad = args[0], args[-3], args[-1]
    if reduction == "none":
        loss = logits.new_empty(logits.shape)
    else:
        loss = logits.new_empty((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return loss, grad


def _scale_grad_fake(grad, grad_output):
    return None


def _loss_vmap(op):
    def vmap_rule(info, in_dims, *args):
        """One call per sample: every argument combination batches correctly, including reductions
        and a normaliser per sample. Slower than one fused call over the stacked batch, but vmap of a
        loss is rare outside of per-sample gradients, where correctness is what counts."""
        losses, grads = [], []
        for b in range(info.batch_size):
            sample = [
                a.select(d, b).contiguous() if isinstance(a, torch.Tensor) and d is not None else a
                for a, d in zip(args, in_dims)
            ]
            loss, grad = op(*sample)
            losses.append(loss)
            grads.append(grad)
        return (torch.stack(losses), torch.stack(grads)), (0, 0)

    return vmap_rule


# The elementwise loss ops (schemas in csrc/focal_ops.h); every one returns (loss, grad).
LOSS_OPS = ("sigmoid_focal_loss", "sigmoid_focal_loss_star", "quality_focal_loss", "varifocal_loss")

if BUILD_ERROR is None:
    for _name in LOSS_OPS:
        torch.library.register_fake(f"focal::{_name}")(_loss_fake)
        torch.library.register_vmap(f"focal::{_name}")(_loss_vmap(getattr(torch.ops.focal, _name)))
    torch.library.register_fake("focal::scale_grad_")(_scale_grad_fake)
    from focal import _autograd

    _autograd.register()
    from focal import _softmax_ops; _softmax_ops.register()  # noqa: E702
