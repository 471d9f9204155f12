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

Autograd (an ``autograd.Function`` installed as the op's Autograd kernel, as :mod:`focal._autograd`
does for the sigmoid op, so that torch.func transforms accept it): the first derivative is the
saved ``grad`` times ``grad_output`` (in place when the graph is freed by this backward, as for
:mod:`focal._autograd`); a second derivative (``create_graph=True``) recomputes the gradient from
the logits as a differentiable PyTorch expression (:func:`_softmax_focal_grad`); forward mode
(``torch.func.jvp``, ``jacfwd``, ``forward_ad``) is the saved gradient times the tangent. Between
forward and backward the node holds the gradient and the small inputs, and only a weak reference to
the logits.
"""

from __future__ import annotations

import weakref

import torch

from focal.reference._common import power
from focal._autograd import _CALL, _is_eager

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


class _WeakLogits:
    """A weak reference to the op's logits and, when those were a copy made by validation (e.g. of
    non-contiguous input), to the caller's tensor they were made from; with the version each had."""

    def __init__(self, logits: torch.Tensor, caller: torch.Tensor | None):
        self._refs = [(weakref.ref(logits), logits._version)]
        if caller is not None and caller is not logits:
            self._refs.append((weakref.ref(caller), caller._version))

    def get(self) -> torch.Tensor:
        for i, (ref, version) in enumerate(self._refs):
            tensor = ref()
            if tensor is None:
                continue
            if tensor._version != version:
                raise RuntimeError(
                    "a second derivative of focal.softmax_focal_loss recomputes the loss from its logits, "
                    "which were modified in place after the forward pass"
                )
            return tensor if i == 0 else tensor.contiguous()
        raise RuntimeError(
            "a second derivative of focal.softmax_focal_loss recomputes the loss from its logits, which no "
            "longer exist: the op keeps only a weak reference to them, so that a training step holds one "
            "buffer of their size. Keep a reference to the logits until the backward pass with create_graph=True"
        )


class _StrongLogits:
    """The logits themselves, for torch.func transforms: their wrapped tensors live only as long as
    something holds them, and a transform's memory is not a training step's."""

    def __init__(self, logits: torch.Tensor):
        self._logits = logits

    def get(self) -> torch.Tensor:
        return self._logits


def _setup_context(ctx, inputs, output):
    logits, target, weight, alpha, normalizer, alpha_value, gamma, eps, ignore_index, reduction, scale, _ = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    ctx.params = (alpha_value, gamma, eps, ignore_index, reduction, scale)
    ctx.class_dim = 0 if logits.dim() == 1 else 1
    user_logits = (getattr(_CALL, "tensors", None) or (None,))[0]
    if torch.compiler.is_compiling():  # traced graphs have no second derivative: nothing to keep
        ctx.logits = None
    elif torch._C._are_functorch_transforms_active():
        ctx.logits = _StrongLogits(logits)
    else:
        ctx.logits = _WeakLogits(logits, user_logits)
    if grad.shape == logits.shape:
        ctx.save_for_forward(grad)
    ctx.save_for_backward(grad if grad.shape == logits.shape else None, target, weight, alpha, normalizer)


def _softmax_focal_grad(x, target, weight, alpha, normalizer, gamma, eps, ignore_index, reduction):
    """d loss / d x (of ``loss.sum()`` for "none"), as a differentiable PyTorch expression: the
    formula of csrc/softmax_math.h, ``t_j - p_j sum_c t_c`` with ``t_c = q_c a_c f'(log p_c)``, for
    second derivatives. Written without data-dependent steps (no one_hot), so that torch.func.vmap
    runs it."""
    d = 0 if x.dim() == 1 else 1
    classes = x.shape[d]
    view = [classes if i == d else 1 for i in range(x.dim())]
    log_p = torch.log_softmax(x, d)
    p = log_p.exp()
    one_minus_p = -torch.expm1(log_p)
    ids = target.unsqueeze(d)
    kept = ids != ignore_index
    is_target = (ids == torch.arange(classes, device=x.device).view(view)).to(x.dtype)
    q = is_target * (1.0 - eps) + eps / classes
    factor = torch.ones(view, dtype=x.dtype, device=x.device)
    if weight is not None:
        factor = factor * weight.to(x.dtype).view(view)
    if alpha is not None:
        factor = factor * alpha.to(x.dtype).view(view)
    positive = one_minus_p > 0
    ratio = torch.where(positive, -log_p / torch.where(positive, one_minus_p, torch.ones_like(p)), torch.ones_like(p))
    slope = -power(one_minus_p, gamma) * (1.0 + gamma * p * ratio)
    t = q * factor * slope
    grad = torch.where(kept, t - p * t.sum(d, keepdim=True), torch.zeros_like(t))
    if normalizer is not None:
        grad = grad / normalizer.to(grad.device).reshape(())
    if reduction == "mean":
        target_weight = kept.squeeze(d).to(x.dtype)
        if weight is not None:
            safe = torch.where(kept, ids, torch.zeros_like(ids)).squeeze(d)
            target_weight = target_weight * weight.to(x.dtype)[safe]
        grad = grad / torch.where(kept.any(), target_weight.sum(), torch.ones((), dtype=x.dtype, device=x.device))
    return grad


def _differentiable_grad(ctx, target, weight, alpha, normalizer, grad_output):
    """d loss / d logits times grad_output, as a graph autograd can differentiate again."""
    alpha_value, gamma, eps, ignore_index, reduction, scale = ctx.params
    if ctx.logits is None:
        raise RuntimeError("focal.softmax_focal_loss under torch.compile is differentiable once, not twice")
    logits = ctx.logits.get()
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    grad = _softmax_focal_grad(x, target, weight, alpha, normalizer, gamma, eps, ignore_index, reduction)
    if grad_output.dim() > 0:
        grad_output = grad_output.unsqueeze(ctx.class_dim)
    return (grad * (grad_output * (scale * alpha_value))).to(logits.dtype)


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


def _jvp(ctx, logits_tangent, *_):
    """Forward mode (torch.func.jvp / jacfwd / hessian, forward_ad): the saved gradient times the tangent."""
    if logits_tangent is None:
        return None, None
    saved = ctx.saved_tensors  # in jvp: what setup_context gave save_for_forward
    if len(saved) != 1:
        raise RuntimeError("forward-mode differentiation of the raw op needs compute_grad=True")
    (grad,) = saved
    accumulate = torch.float64 if grad.dtype == torch.float64 else torch.float32
    product = grad.to(accumulate) * logits_tangent.to(accumulate)
    if ctx.params[4] == "none":
        return product.sum(ctx.class_dim).to(grad.dtype), None
    return product.sum(), None


class SoftmaxFocalLossFunction(torch.autograd.Function):
    """The op as an autograd.Function with a separate setup_context, so that torch.func transforms
    (grad, vmap of per-sample gradients, ...) and torch.compile accept it; its vmap rule is
    generated from the op's own. Without forward mode: what torch.compile traces (Dynamo does not
    trace a custom jvp)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        # Grad mode is off inside Function.forward, so the op's Autograd kernel passes straight through.
        return torch.ops.focal.softmax_focal_loss.default(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


class SoftmaxFocalLossFunctionWithJvp(SoftmaxFocalLossFunction):
    """The same, plus forward mode: eager calls."""

    jvp = staticmethod(_jvp)


def apply(*args):
    """(loss, grad) of the op through its autograd: forward mode too, except under torch.compile."""
    if torch.compiler.is_compiling():
        return SoftmaxFocalLossFunction.apply(*args)
    return SoftmaxFocalLossFunctionWithJvp.apply(*args)


def _autograd_kernel(keyset, *args):
    if torch.is_grad_enabled() and args[0].requires_grad:
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                "under torch.func transforms, differentiate focal.softmax_focal_loss rather than the raw operator"
            )
        return apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.focal.softmax_focal_loss.default.redispatch(keyset & torch._C._after_autograd_keyset, *args)


_LIBRARY = None


def register() -> None:
    """Registers the fake kernel, the Autograd kernel and the vmap rule (once per process)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    torch.library.register_fake("focal::softmax_focal_loss")(_fake)
    from focal.ops import _loss_vmap  # the elementwise ops' rule: one call per sample, any tensor argument

    torch.library.register_vmap("focal::softmax_focal_loss")(_loss_vmap(torch.ops.focal.softmax_focal_loss))
    _LIBRARY = torch.library.Library("focal", "IMPL")
    _LIBRARY.impl("softmax_focal_loss", _autograd_kernel, "Autograd", with_keyset=True)
