"""Autograd of ``torch.ops.focal.sigmoid_focal_loss``, registered on the operator itself.

An ``autograd.Function`` with a separate ``setup_context`` (so that torch.func transforms accept it)
is the operator's kernel for the Autograd dispatch key: ``torch.ops.focal.sigmoid_focal_loss`` is
differentiable however it is reached (focal.sigmoid_focal_loss, TorchScript, torch.compile,
torch.export, torch.func).

The forward has already written d loss / d logits (``grad``) when autograd will need it, so the
first derivative is only a matter of scaling by ``grad_output``:

- eager, graph freed by this backward (a training step's ``loss.backward()``): ``grad`` is scaled
  in place (no pass at all when ``grad_output`` is 1, decided on the device for CUDA tensors) and
  returned; autograd then moves that very buffer into ``logits.grad``: no copy, no second buffer.
- graph retained (``retain_graph=True``), or traced (``torch.compile``, ``torch.export``):
  ``grad * grad_output``, leaving the saved gradient intact for the next backward.
- ``create_graph=True`` (second derivatives, ``torch.func.grad``): the gradient is recomputed as a
  differentiable PyTorch expression of the same math (:func:`focal.reference.sigmoid_focal_loss_grad`),
  which autograd can differentiate again.

Between forward and backward the node holds the gradient, the small inputs (class ids, per-class
or per-row weights, normaliser) and only *weak* references to the logits and to any other input as
large as they are (float targets, full weights): first derivatives never read them, and holding
them would keep an N x C tensor alive through every training step. A second derivative does read
them; if they were freed or modified in place by then, it raises an error that says so.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from focal import reference

__all__ = ["register"]

_NONES = (None,) * 11

# The tensors the caller of focal.sigmoid_focal_loss passed, for the duration of one call: when
# validation had to copy one (non-contiguous logits, targets or weights of another dtype, a weight
# broadcast to the full shape), a second derivative rederives the copy from the caller's tensor.
_CALL = threading.local()


@contextlib.contextmanager
def callers_tensors(inputs, targets, weight):
    _CALL.tensors = (inputs, targets, weight)
    try:
        yield
    finally:
        _CALL.tensors = None


class _WeakInput:
    """A weak reference to an input tensor that also remembers the tensor's version; optionally
    also to the caller's tensor it was made from, and how to make it again."""

    def __init__(self, tensor: torch.Tensor, name: str, origin: torch.Tensor | None = None, remake=None):
        self._ref = weakref.ref(tensor)
        self._version = tensor._version
        self._name = name
        self._origin = None if origin is None or origin is tensor else _WeakInput(origin, name)
        self._remake = remake

    def get(self) -> torch.Tensor:
        tensor = self._ref()
        if tensor is None and self._origin is not None:
            return self._remake(self._origin.get())
        if tensor is None:
            raise RuntimeError(
                f"a second derivative of focal.sigmoid_focal_loss recomputes the loss from its {self._name}, "
                f"which no longer exist: the op keeps only a weak reference to them, so that a training "
                f"step holds one buffer of their size. Keep a reference to the {self._name} until the "
                "backward pass with create_graph=True"
            )
        if tensor._version != self._version:
            raise RuntimeError(
                f"a second derivative of focal.sigmoid_focal_loss recomputes the loss from its {self._name}, "
                "which were modified in place after the forward pass"
            )
        return tensor


def _forward(*args):
    # Grad mode is off inside Function.forward, so the op's Autograd kernel passes straight through.
    return torch.ops.focal.sigmoid_focal_loss.default(*args)


def _setup_context(ctx, inputs, output):
    logits, targets, weight, row_weight, normalizer, alpha, gamma, eps, ignore_index, reduction, scale, _ = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # else backward would get an N x C tensor of zeros for `grad`
    ctx.params = (alpha, gamma, eps, ignore_index, reduction, scale)
    one_row = logits.dim() <= 1 or logits.numel() == logits.shape[-1]
    weak_targets = targets.is_floating_point() and not one_row
    weak_weight = weight is not None and weight.shape == logits.shape and not one_row
    # Traced graphs (torch.compile, export) have no second derivative: nothing to keep for it.
    traced = torch.compiler.is_compiling()
    user_logits, user_targets, user_weight = getattr(_CALL, "tensors", None) or (None, None, None)
    dtype = logits.dtype
    ctx.logits = None if traced else _WeakInput(logits, "logits", user_logits, lambda t: t.contiguous())
    ctx.targets = (
        _WeakInput(targets, "float targets", user_targets, lambda t: t.to(dtype).contiguous())
        if weak_targets and not traced else None
    )
    ctx.weight = (
        _WeakInput(weight, "weights", user_weight, lambda w: w.to(dtype).expand(logits.shape).contiguous())
        if weak_weight and not traced else None
    )
    if grad.shape == logits.shape:
        ctx.save_for_forward(grad)
    ctx.save_for_backward(
        grad if grad.shape == logits.shape else None,
        None if weak_targets else targets,
        None if weak_weight else weight,
        row_weight,
        normalizer,
    )


def _is_eager(*tensors: torch.Tensor) -> bool:
    """True outside of any tracing (torch.compile, export, make_fx) and of any transform, for plain
    tensors (not batched ones, such as is_grads_batched makes of grad_output)."""
    return (
        not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
        and not torch._C._are_functorch_transforms_active()
        and all(type(t) is torch.Tensor and not _is_batched(t) for t in tensors)
    )


def _is_batched(tensor: torch.Tensor) -> bool:
    # Batched by torch.func.vmap (FuncTorchBatched) or by the engine's is_grads_batched (Batched);
    # Python exposes only the first of those keys, hence the keyset's name.
    return "Batched" in str(torch._C._dispatch_keys(tensor))


def _differentiable_grad(ctx, saved, grad_output: torch.Tensor) -> torch.Tensor:
    """d loss / d logits * grad_output as a graph autograd can differentiate again."""
    _, targets, weight, row_weight, normalizer = saved
    alpha, gamma, eps, ignore_index, reduction, scale = ctx.params
    if ctx.logits is None:
        raise RuntimeError("focal.sigmoid_focal_loss under torch.compile is differentiable once, not twice")
    logits = ctx.logits.get()
    targets = ctx.targets.get() if ctx.targets is not None else targets
    weight = ctx.weight.get() if ctx.weight is not None else weight
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if row_weight is not None:
        row_weight = row_weight.unsqueeze(-1)
        weight = row_weight if weight is None else weight * row_weight
    grad = reference.sigmoid_focal_loss_grad(
        x, targets, None if alpha < 0 else alpha, gamma, reduction, weight=weight, normalizer=normalizer,
        ignore_index=ignore_index, label_smoothing=eps,
    )
    return (grad * (scale * grad_output)).to(logits.dtype)


def _backward(ctx, grad_output, _):
    saved = ctx.saved_tensors
    grad = saved[0]
    if grad_output is None or not ctx.needs_input_grad[0]:
        return (None,) + _NONES
    if torch.is_grad_enabled():  # create_graph=True
        return (_differentiable_grad(ctx, saved, grad_output),) + _NONES
    if grad is None:
        raise RuntimeError(
            "torch.ops.focal.sigmoid_focal_loss was called with compute_grad=False, so it has no "
            "gradient to give; focal.sigmoid_focal_loss sets compute_grad whenever autograd needs it"
        )
    if not _is_eager(grad, grad_output) or torch._C._autograd._get_current_graph_task_keep_graph():
        return (grad * grad_output,) + _NONES
    torch.ops.focal.scale_grad_(grad, grad_output)
    return (grad,) + _NONES


def _jvp(ctx, logits_tangent, *_):
    """Forward mode (torch.func.jvp / jacfwd, forward_ad): the saved gradient times the tangent."""
    if logits_tangent is None:
        return None, None
    saved = ctx.saved_tensors  # in jvp: what setup_context gave save_for_forward
    if len(saved) != 1:
        raise RuntimeError("forward-mode differentiation of the raw op needs compute_grad=True")
    (grad,) = saved
    reduction = ctx.params[4]
    if reduction == "none":
        return grad * logits_tangent, None
    accumulate = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return (grad.to(accumulate) * logits_tangent.to(accumulate)).sum(), None


class SigmoidFocalLossFunction(torch.autograd.Function):
    """The op as an autograd.Function; vmap of it (e.g. per-sample gradients) is generated from the
    op's own vmap rule and the differentiable backward. Without forward mode: what torch.compile
    traces (Dynamo does not trace a custom jvp)."""

    generate_vmap_rule = True
    forward = staticmethod(_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


class SigmoidFocalLossFunctionWithJvp(SigmoidFocalLossFunction):
    """The same, plus forward mode (torch.func.jvp / jacfwd / hessian, forward_ad): eager calls."""

    jvp = staticmethod(_jvp)


def apply(*args):
    """(loss, grad) of the op through its autograd: forward mode too, except under torch.compile."""
    if torch.compiler.is_compiling():
        return SigmoidFocalLossFunction.apply(*args)
    return SigmoidFocalLossFunctionWithJvp.apply(*args)


def _autograd_kernel(keyset, *args):
    if torch.is_grad_enabled() and args[0].requires_grad:
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                "under torch.func transforms, differentiate focal.sigmoid_focal_loss (or "
                "focal._autograd.apply) rather than the raw operator"
            )
        return SigmoidFocalLossFunctionWithJvp.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.focal.sigmoid_focal_loss.default.redispatch(keyset & torch._C._after_autograd_keyset, *args)


_LIBRARY = None


def register() -> None:
    """Installs the Function as the op's Autograd kernel (once per process)."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("focal", "IMPL")
        _LIBRARY.impl("sigmoid_focal_loss", _autograd_kernel, "Autograd", with_keyset=True)
