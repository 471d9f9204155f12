"""Autograd of the elementwise loss operators, registered on the operators themselves.

``torch.ops.focal.sigmoid_focal_loss``, ``sigmoid_focal_loss_star``, ``quality_focal_loss`` and
``varifocal_loss`` share their arguments' roles (``logits``, ``targets``, optional ``scores``,
``weight``, ``row_weight``, ``normalizer``, numbers, ``reduction``, ``scale``, ``compute_grad``) and
their outputs ``(loss, grad)``; one machinery, parameterised by the schema's argument names, serves
them all. For each, an ``autograd.Function`` with a separate ``setup_context`` (so that torch.func
transforms accept it) is the operator's kernel for the Autograd dispatch key: the operator is
differentiable however it is reached (the public functions, TorchScript, torch.compile,
torch.export, torch.func).

The forward has already written d loss / d logits (``grad``) when autograd will need it, so the
first derivative is only a matter of scaling by ``grad_output``:

- eager, graph freed by this backward (a training step's ``loss.backward()``): ``grad`` is scaled
  in place (no pass at all when ``grad_output`` is 1, decided on the device for CUDA tensors) and
  returned; autograd then moves that very buffer into ``logits.grad``: no copy, no second buffer.
- graph retained (``retain_graph=True``), or traced (``torch.compile``, ``torch.export``):
  ``grad * grad_output``, leaving the saved gradient intact for the next backward.
- ``create_graph=True`` (second derivatives, ``torch.func.grad``): the gradient is recomputed as a
  differentiable PyTorch expression of the same math (:func:`focal.reference.sigmoid_focal_loss_grad`
  for the focal loss; autograd's own derivative of the :mod:`focal.reference` statement for the
  others), which autograd can differentiate again.

Between forward and backward the node holds the gradient, the small inputs (class ids, scores,
per-class or per-row weights, normaliser) and only *weak* references to the logits and to any other input as
large as they are (float targets, full weights): first derivatives never read them, and holding
them would keep an N x C tensor alive through every training step. A second derivative does read
them; if they were freed or modified in place by then, it raises an error that says so.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from focal import reference

__all__ = ["register", "apply", "callers_tensors", "OPS"]

# The tensors the caller of a public loss function passed, for the duration of one call: when
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

    def __init__(self, tensor: torch.Tensor, name: str, op: str, origin: torch.Tensor | None = None, remake=None):
        self._ref = weakref.ref(tensor)
        self._version = tensor._version
        self._name = name
        self._op = op
        self._origin = None if origin is None or origin is tensor else _WeakInput(origin, name, op)
        self._remake = remake

    def get(self) -> torch.Tensor:
        tensor = self._ref()
        if tensor is None and self._origin is not None:
            return self._remake(self._origin.get())
        if tensor is None:
            raise RuntimeError(
                f"a second derivative of focal.{self._op} recomputes the loss from its {self._name}, "
                f"which no longer exist: the op keeps only a weak reference to them, so that a training "
                f"step holds one buffer of their size. Keep a reference to the {self._name} until the "
                "backward pass with create_graph=True"
            )
        if tensor._version != self._version:
            raise RuntimeError(
                f"a second derivative of focal.{self._op} recomputes the loss from its {self._name}, "
                "which were modified in place after the forward pass"
            )
        return tensor


# What a differentiable recomputation gets: the logits (in float32 or float64), the other tensor
# arguments by name (weight times row weight as "weight"), the numbers by name, and grad_output.
GradFn = Callable[[torch.Tensor, dict, dict, torch.Tensor], torch.Tensor]

_TENSOR_ARGS = ("logits", "targets", "scores", "weight", "row_weight", "normalizer")


@dataclass(frozen=True)
class _Op:
    """One elementwise loss operator: its name and how to recompute its gradient differentiably."""

    name: str
    differentiable_grad: GradFn

    @property
    def overload(self):
        return getattr(torch.ops.focal, self.name).default

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.overload._schema.arguments)


def _focal_grad(x, tensors, params, grad_output):
    alpha = params["alpha"]
    grad = reference.sigmoid_focal_loss_grad(
        x, tensors["targets"], None if alpha < 0 else alpha, params["gamma"], params["reduction"],
        weight=tensors["weight"], normalizer=tensors["normalizer"], ignore_index=params["ignore_index"],
        label_smoothing=params["label_smoothing"],
    )
    return grad * (params["scale"] * grad_output)


def _autograd_of(loss_fn) -> GradFn:
    """The gradient of a reference loss times grad_output, as a graph that can be differentiated
    again: by torch.func.vjp, which composes both with autograd (create_graph=True) and with
    torch.func transforms (hessian, jacrev of jacrev), where torch.autograd.grad sees no graph."""

    def grad(x, tensors, params, grad_output):
        loss, vjp = torch.func.vjp(lambda v: loss_fn(v, tensors, params) * params["scale"], x)
        (g,) = vjp(grad_output.to(loss.dtype))
        return g

    return grad


def _quality_targets(tensors):
    scores = tensors["scores"]
    return tensors["targets"] if scores is None else (tensors["targets"], scores)


OPS = {
    op.name: op
    for op in (
        _Op("sigmoid_focal_loss", _focal_grad),
        _Op(
            "sigmoid_focal_loss_star",
            _autograd_of(
                lambda x, t, p: reference.sigmoid_focal_loss_star(
                    x, t["targets"], p["gamma"], p["beta"], None if p["alpha"] < 0 else p["alpha"], p["reduction"],
                    weight=t["weight"], normalizer=t["normalizer"], ignore_index=p["ignore_index"],
                    label_smoothing=p["label_smoothing"],
                )
            ),
        ),
        _Op(
            "quality_focal_loss",
            _autograd_of(
                lambda x, t, p: reference.quality_focal_loss(
                    x, _quality_targets(t), p["beta"], p["reduction"], weight=t["weight"],
                    normalizer=t["normalizer"], ignore_index=p["ignore_index"],
                )
            ),
        ),
        _Op(
            "varifocal_loss",
            _autograd_of(
                lambda x, t, p: reference.varifocal_loss(
                    x, _quality_targets(t), p["alpha"], p["gamma"], p["reduction"], weight=t["weight"],
                    normalizer=t["normalizer"], ignore_index=p["ignore_index"],
                )
            ),
        ),
    )
}


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


def _make_functions(op: _Op):
    """The autograd.Function of ``op`` (what torch.compile traces: no forward mode, since Dynamo
    does not trace a custom jvp) and a subclass that adds forward mode (eager calls)."""
    # The closures below see only plain values (strings, tuples, the OpOverload, functions):
    # Dynamo traces them under torch.compile and cannot wrap arbitrary objects.
    names, op_name, overload, recompute_grad = op.arg_names, op.name, op.overload, op.differentiable_grad
    tensor_slots = [i for i, n in enumerate(names) if n in _TENSOR_ARGS and n != "logits"]
    param_names = [n for n in names if n not in _TENSOR_ARGS and n != "compute_grad"]
    nones = (None,) * (len(names) - 1)

    def forward(*args):
        # Grad mode is off inside Function.forward, so the op's Autograd kernel passes straight through.
        return overload(*args)

    def setup_context(ctx, inputs, output):
        named = dict(zip(names, inputs))
        logits, targets, weight = named["logits"], named["targets"], named["weight"]
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)  # else backward would get an N x C tensor of zeros for `grad`
        ctx.params = {n: named[n] for n in param_names}
        one_row = logits.dim() <= 1 or logits.numel() == logits.shape[-1]
        weak = {
            "targets": targets.is_floating_point() and not one_row,
            "weight": weight is not None and weight.shape == logits.shape and not one_row,
        }
        # Traced graphs (torch.compile, export) have no second derivative: nothing to keep for it.
        traced = torch.compiler.is_compiling()
        user_logits, user_targets, user_weight = getattr(_CALL, "tensors", None) or (None, None, None)
        dtype = logits.dtype
        ctx.logits = None if traced else _WeakInput(logits, "logits", op_name, user_logits, lambda t: t.contiguous())
        ctx.weak = {
            "targets": _WeakInput(targets, "float targets", op_name, user_targets, lambda t: t.to(dtype).contiguous())
            if weak["targets"] and not traced else None,
            "weight": _WeakInput(
                weight, "weights", op_name, user_weight, lambda w: w.to(dtype).expand(logits.shape).contiguous()
            )
            if weak["weight"] and not traced else None,
        }
        if grad.shape == logits.shape:
            ctx.save_for_forward(grad)
        ctx.save_for_backward(
            grad if grad.shape == logits.shape else None,
            *(None if weak.get(names[i], False) else inputs[i] for i in tensor_slots),
        )

    def differentiable_grad(ctx, saved, grad_output):
        """d loss / d logits * grad_output as a graph autograd can differentiate again."""
        if ctx.logits is None:
            raise RuntimeError(f"focal.{op_name} under torch.compile is differentiable once, not twice")
        tensors = {names[i]: t for i, t in zip(tensor_slots, saved[1:])}
        for name, ref in ctx.weak.items():
            if ref is not None:
                tensors[name] = ref.get()
        logits = ctx.logits.get()
        x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        row_weight = tensors.pop("row_weight")
        if row_weight is not None:
            row_weight = row_weight.unsqueeze(-1)
            tensors["weight"] = row_weight if tensors["weight"] is None else tensors["weight"] * row_weight
        return recompute_grad(x, tensors, ctx.params, grad_output).to(logits.dtype)

    def backward(ctx, grad_output, _):
        saved = ctx.saved_tensors
        grad = saved[0]
        if grad_output is None or not ctx.needs_input_grad[0]:
            return (None,) + nones
        if torch.is_grad_enabled():  # create_graph=True
            return (differentiable_grad(ctx, saved, grad_output),) + nones
        if grad is None:
            raise RuntimeError(
                f"torch.ops.focal.{op_name} was called with compute_grad=False, so it has no gradient to "
                "give; the public loss functions set compute_grad whenever autograd needs it"
            )
        if not _is_eager(grad, grad_output) or torch._C._autograd._get_current_graph_task_keep_graph():
            return (grad * grad_output,) + nones
        torch.ops.focal.scale_grad_(grad, grad_output)
        return (grad,) + nones

    def jvp(ctx, logits_tangent, *_):
        """Forward mode (torch.func.jvp / jacfwd, forward_ad): the saved gradient times the tangent."""
        if logits_tangent is None:
            return None, None
        saved = ctx.saved_tensors  # in jvp: what setup_context gave save_for_forward
        if len(saved) != 1:
            raise RuntimeError("forward-mode differentiation of the raw op needs compute_grad=True")
        (grad,) = saved
        if ctx.params["reduction"] == "none":
            return grad * logits_tangent, None
        accumulate = torch.float64 if grad.dtype == torch.float64 else torch.float32
        return (grad.to(accumulate) * logits_tangent.to(accumulate)).sum(), None

    class_name = "".join(part.title() for part in op.name.split("_")) + "Function"
    function = type(
        class_name,
        (torch.autograd.Function,),
        {
            "__doc__": f"torch.ops.focal.{op.name} as an autograd.Function; vmap of it (e.g. per-sample "
            "gradients) is generated from the op's own vmap rule and the differentiable backward.",
            "generate_vmap_rule": True,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )
    with_jvp = type(class_name.replace("Function", "FunctionWithJvp"), (function,), {"jvp": staticmethod(jvp)})
    return function, with_jvp


# op name -> (Function, FunctionWithJvp), made by register() once the compiled ops are loaded.
_FUNCTIONS: dict = {}


def apply(op_name: str, *args):
    """(loss, grad) of ``torch.ops.focal.<op_name>`` through its autograd: forward mode too, except
    under torch.compile."""
    function, with_jvp = _FUNCTIONS[op_name]
    if torch.compiler.is_compiling():
        return function.apply(*args)
    return with_jvp.apply(*args)


def _autograd_kernel(op: _Op):
    _, with_jvp = _FUNCTIONS[op.name]

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and args[0].requires_grad:
            if torch._C._are_functorch_transforms_active():
                raise RuntimeError(
                    f"under torch.func transforms, differentiate focal.{op.name} (or "
                    "focal._autograd.apply) rather than the raw operator"
                )
            return with_jvp.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


_LIBRARY = None


def register() -> None:
    """Installs each op's Function as its Autograd kernel (once per process)."""
    global _LIBRARY
    if _LIBRARY is None:
        _FUNCTIONS.update({name: _make_functions(op) for name, op in OPS.items()})
        _LIBRARY = torch.library.Library("focal", "IMPL")
        for name, op in OPS.items():
            _LIBRARY.impl(name, _autograd_kernel(op), "Autograd", with_keyset=True)
