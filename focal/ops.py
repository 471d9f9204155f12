"""The table of loss operators, and the one entry every public loss function goes through.

Each loss is a row of :data:`LOSS_OPS`: the compiled operator's name, the validator that turns the
public function's arguments into the operator's (:mod:`focal._validate`), where the loss of reduction
``"none"`` lives, and the differentiable gradient a second derivative recomputes
(:mod:`focal._grads`). From the rows :mod:`focal._autograd` registers every operator's fake kernel,
vmap rule and autograd; :func:`call` validates, picks whether the gradient is needed, and runs.

Adding a loss:

1. its per-element math as an ``ElementLoss`` policy in ``csrc/family_math.h`` (value, gradient and
   the hard-target fast path), a ``LossKind``, its schema in ``csrc/focal_ops.h`` and its operator
   function in ``csrc/loss_ops.h`` (the CPU and CUDA kernels are templates over the policy);
2. its plain-PyTorch statement in :mod:`focal.reference`;
3. its validator in :mod:`focal._validate`, its differentiable gradient in :mod:`focal._grads`
   (usually ``_autograd_of`` its reference), and a row below;
4. the public function: a docstring and ``return ops.call("<name>", inputs, targets, weight, ...)``,
   plus a row of the tests' table of losses (``tests/family_cases.py``).

The operators' schemas:

``torch.ops.focal.sigmoid_focal_loss(logits, targets, weight, row_weight, normalizer, alpha, gamma,
label_smoothing, ignore_index, reduction, scale, compute_grad, class_alpha=None, background_index=-1)
-> (loss, grad)``

- ``logits``: ``(..., C)`` contiguous float32 / float64 / float16 / bfloat16.
- ``targets``: the logits' shape and dtype (binary or soft targets), or int64 class ids of shape
  ``logits.shape[:-1]`` (``[0, C)`` positive class, ``background_index`` background,
  ``ignore_index`` ignored).
- ``weight``: None, ``(C,)`` or the logits' shape; ``row_weight``: None or ``logits.shape[:-1]``;
  both in the logits' dtype.
- ``normalizer``: None or a one-element tensor that divides the loss; ``scale``: a float multiplying it.
- ``alpha`` < 0 disables alpha weighting; ``class_alpha``, a float ``(C,)`` tensor, gives each
  class its own alpha instead (values checked on the CPU only); ``reduction`` is "none", "mean" or
  "sum".
- The arguments after ``compute_grad`` were added later, with defaults: callers of the older
  schema keep working. ``LossOp.with_compute_grad`` puts ``compute_grad`` in its place.
- Returns ``loss`` (the logits' shape and dtype for "none", else a 0-dim float32 tensor, float64
  for float64 logits) and ``grad`` = d loss / d logits (the logits' shape and dtype), or an empty
  ``(0,)`` tensor when ``compute_grad`` is False.

The extension itself is loaded by :mod:`focal._extension`.

The op is differentiable with respect to ``logits`` (see :mod:`focal._autograd`); ``grad`` is not
differentiable. ``grad`` is the very buffer that backward scales and hands to autograd: a caller of
the raw op that keeps it sees it scaled by ``grad_output`` after a backward that frees the graph.
``ignore_index`` and ``background_index`` must lie outside ``[0, C)`` and differ (the kernels tell
ignored rows, background rows and classes apart by them alone).

The other elementwise losses of the family take the same arguments in the same roles:

- ``sigmoid_focal_loss_star(logits, targets, weight, row_weight, normalizer, alpha, gamma, beta,
  label_smoothing, ignore_index, reduction, scale, compute_grad, class_alpha=None,
  background_index=-1)``: FL* (``gamma`` > 0);
- ``quality_focal_loss(logits, targets, scores, weight, row_weight, normalizer, beta, ignore_index,
  reduction, scale, compute_grad, background_index=-1)`` and ``varifocal_loss(logits, targets,
  scores, weight, row_weight, normalizer, alpha, gamma, ignore_index, reduction, scale,
  compute_grad, class_alpha=None, background_index=-1)`` (VFL's alpha, and each value of its
  ``class_alpha``, weights the negatives only): ``targets`` the
  logits' shape and dtype, or int64 class ids of shape ``logits.shape[:-1]`` with ``scores`` of
  that shape in the logits' dtype (the target of each row's class).

``torch.ops.focal.softmax_focal_loss(logits, target, weight, alpha, normalizer, alpha_value, gamma,
label_smoothing, ignore_index, reduction, scale, compute_grad) -> (loss, grad)``:

- ``logits``: ``(N, C)``, ``(N, C, d1, ...)`` or ``(C,)``, contiguous; the class dimension is 1 (0
  when 1-D).
- ``target``: int64 class ids, contiguous, of the logits' shape without the class dimension; each is
  ``ignore_index`` or in ``[0, C)`` (an error on the CPU; NaN for that element on CUDA).
- ``weight``, ``alpha``: None or float ``(C,)`` tensors on the logits' device; ``alpha_value`` and
  ``scale`` numbers multiplying the loss.
- Returns ``loss`` (``target``'s shape in the logits' dtype for "none", else as above) and ``grad``
  (of ``loss.sum()`` for "none").

``torch.ops.focal.scale_grad_(grad, grad_output)`` multiplies ``grad`` in place (no pass at all
when ``grad_output`` is a single 1, decided on the device for CUDA tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from focal import _autograd, _grads, _validate
from focal._extension import BUILD_ERROR, require_kernels

__all__ = ["LossOp", "LOSS_OPS", "call"]


@dataclass(frozen=True)
class LossOp:
    """One loss operator, ``torch.ops.focal.<name>``, returning ``(loss, grad)``."""

    name: str
    validate: Callable[..., tuple]
    """The public function's arguments (logits, targets, then keywords) -> the op's, less compute_grad."""
    differentiable_grad: _grads.GradFn
    layout: str = "element"
    """Where a reduction-"none" loss lives: "element" (the logits' shape) or "row" (the targets' shape:
    one value per row of class dimension 1, or 0 for 1-D logits)."""

    @property
    def overload(self):
        return getattr(torch.ops.focal, self.name).default

    def slot(self, argument: str) -> int:
        """The position of ``argument`` in the op's schema."""
        return [a.name for a in self.overload._schema.arguments].index(argument)

    def with_compute_grad(self, args: tuple, compute_grad: bool) -> tuple:
        """The validator's arguments with ``compute_grad`` put in its place in the schema (not last:
        the arguments added since come after it, with defaults)."""
        slot = _COMPUTE_GRAD_SLOTS[self.name]
        return args[:slot] + (compute_grad,) + args[slot:]


# op name -> position of compute_grad in its schema, read once the compiled ops are loaded (not while
# torch.compile traces a call).
_COMPUTE_GRAD_SLOTS: dict = {}


LOSS_OPS = {
    op.name: op
    for op in (
        LossOp("sigmoid_focal_loss", _validate.op_arguments, _grads.sigmoid_focal),
        LossOp("sigmoid_focal_loss_star", _validate.star_arguments, _grads.sigmoid_focal_star),
        LossOp("quality_focal_loss", _validate.quality_arguments, _grads.quality_focal),
        LossOp("varifocal_loss", _validate.varifocal_arguments, _grads.varifocal),
        LossOp("softmax_focal_loss", _validate.softmax_arguments, _grads.softmax_focal, layout="row"),
    )
}


def call(op_name: str, inputs, targets, weight, **arguments) -> Tensor:
    """The loss of ``torch.ops.focal.<op_name>`` for a public function's arguments: validated, then
    computed with its gradient when autograd (or a torch.func transform, or forward mode) will
    differentiate it, through the op's autograd; without the gradient otherwise."""
    op = LOSS_OPS[op_name]
    args = op.validate(inputs, targets, weight=weight, **arguments)
    logits = args[0]
    require_kernels(logits.device)
    if _autograd.needs_gradient(logits):
        # The op's own autograd, entered here so that torch.func transforms and forward mode see it too.
        with _autograd.callers_tensors(inputs, targets if isinstance(targets, Tensor) else None, weight):
            loss, _ = _autograd.apply(op_name, *op.with_compute_grad(args, True))
        return loss
    # The gradient is computed (and allocated) only when autograd will ask for it.
    loss, _ = op.overload(*op.with_compute_grad(args, False))
    return loss


if BUILD_ERROR is None:
    _autograd.register(LOSS_OPS.values())
    for _op in LOSS_OPS.values():
        _COMPUTE_GRAD_SLOTS[_op.name] = _op.slot("compute_grad")
