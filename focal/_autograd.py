"""What Python registers on every loss operator: fake kernel, vmap rule and autograd.

One machinery serves every row of :data:`focal.ops.LOSS_OPS`; it reads each op's arguments from its
schema (which are tensors, which are numbers) and asks the row only two things: where the loss of
reduction ``"none"`` lives (``layout``: per element of the logits, or per row of class dimension 1
as for the softmax loss) and how to recompute the gradient differentiably (:mod:`focal._grads`).

For each op, an ``autograd.Function`` with a separate ``setup_context`` (so that torch.func
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
- ``create_graph=True`` (second derivatives, ``torch.func.grad``): the gradient is recomputed by
  the row's differentiable expression, which autograd can differentiate again.
- forward mode (``torch.func.jvp``, ``jacfwd``, ``forward_ad``): the saved gradient times the tangent.

Between forward and backward the node holds the gradient, the small inputs (class ids, scores,
per-class or per-row weights, normaliser) and only *weak* references to the logits and to any other
input of the logits' shape (float targets, full weights): first derivatives never read them, and
holding them would keep an N x C tensor alive through every training step. A second derivative does
read them; if they were freed or modified in place by then, it raises an error that says so. Under
torch.func transforms the node holds them (a transform's wrapped tensors live only as long as
something holds them, and a transform's memory is not a training step's).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["register", "apply", "callers_tensors", "needs_gradient"]

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


def needs_gradient(logits: torch.Tensor) -> bool:
    """Whether autograd, a torch.func transform or forward mode will differentiate a loss of ``logits``."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return True
    if torch._C._are_functorch_transforms_active():
        return True
    return fwAD._current_level >= 0 and fwAD.unpack_dual(logits).tangent is not None


class _Kept:
    """An input as the node keeps it for a second derivative: the tensor itself (``strong``), or a
    weak reference that remembers the tensor's version, optionally also to the caller's tensor it
    was made from and how to make it again."""

    def __init__(self, tensor, name, op, origin=None, remake=None, strong=False):
        self._tensor = tensor if strong else None
        self._ref = None if strong else weakref.ref(tensor)
        self._version = tensor._version
        self._name = name
        self._op = op
        self._origin = None if strong or origin is None or origin is tensor else _Kept(origin, name, op)
        self._remake = remake

    def get(self) -> torch.Tensor:
        if self._tensor is not None:
            return self._tensor
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


def _is_tensor_argument(argument) -> bool:
    return "Tensor" in str(argument.type)


# What the caller's tensors are called in the schemas, and the wording of errors about them.
_CALLER_SLOTS = {"targets": (1, "float targets"), "target": (1, "float targets"), "weight": (2, "weights")}


def _make_functions(op):
    """The autograd.Function of ``op`` (what torch.compile traces: no forward mode, since Dynamo
    does not trace a custom jvp) and a subclass that adds forward mode (eager calls)."""
    # The closures below see only plain values (strings, tuples, the OpOverload, functions):
    # Dynamo traces them under torch.compile and cannot wrap arbitrary objects.
    overload, op_name, recompute_grad, per_row = op.overload, op.name, op.differentiable_grad, op.layout == "row"
    arguments = overload._schema.arguments
    names = tuple(a.name for a in arguments)
    tensor_slots = tuple(i for i, a in enumerate(arguments) if i > 0 and _is_tensor_argument(a))
    param_names = tuple(
        a.name for i, a in enumerate(arguments) if i > 0 and i not in tensor_slots and a.name != "compute_grad"
    )
    nones = (None,) * (len(names) - 1)

    def class_dim(logits_dim: int):
        """Where a reduction-"none" loss's upstream gradient is broadcast over the classes (None: nowhere)."""
        return (0 if logits_dim == 1 else 1) if per_row else None

    def forward(*args):
        # Grad mode is off inside Function.forward, so the op's Autograd kernel passes straight through.
        return overload(*args)

    # Function.apply binds its arguments to forward's signature on every call (for setup_context);
    # inspect.signature would rebuild it each time (about 6 us here) unless it is there already.
    forward.__signature__ = inspect.signature(forward)

    def setup_context(ctx, inputs, output):
        logits = inputs[0]
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)  # else backward would get an N x C tensor of zeros for `grad`
        ctx.params = {n: inputs[names.index(n)] for n in param_names}
        ctx.class_dim = class_dim(logits.dim())
        one_row = logits.dim() <= 1 or logits.numel() == logits.shape[-1]
        # Traced graphs (torch.compile, export) have no second derivative: nothing to keep for it.
        traced = torch.compiler.is_compiling()
        strong = torch._C._are_functorch_transforms_active()
        callers = getattr(_CALL, "tensors", None) or (None, None, None)
        dtype, shape = logits.dtype, logits.shape
        ctx.logits = None if traced else _Kept(logits, "logits", op_name, callers[0], lambda t: t.contiguous(), strong)
        ctx.kept = {}
        saved = []
        for i in tensor_slots:
            tensor = inputs[i]
            if tensor is not None and tensor.shape == shape and not one_row and not strong:
                saved.append(None)  # as large as the logits: kept weakly, and only for a second derivative
                if not traced:
                    slot, what = _CALLER_SLOTS.get(names[i], (None, names[i]))
                    ctx.kept[names[i]] = _Kept(
                        tensor, what, op_name, None if slot is None else callers[slot],
                        lambda t: t.to(dtype).expand(shape).contiguous(),
                    )
            else:
                saved.append(tensor)
        if grad.shape == shape:
            ctx.save_for_forward(grad)
        ctx.save_for_backward(grad if grad.shape == shape else None, *saved)

    def differentiable_grad(ctx, saved, grad_output):
        """d loss / d logits * grad_output as a graph autograd can differentiate again."""
        if ctx.logits is None:
            raise RuntimeError(f"focal.{op_name} under torch.compile is differentiable once, not twice")
        tensors = {names[i]: t for i, t in zip(tensor_slots, saved[1:])}
        for name, kept in ctx.kept.items():
            tensors[name] = kept.get()
        logits = ctx.logits.get()
        x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        row_weight = tensors.pop("row_weight", None)
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
        if ctx.class_dim is not None and grad_output.dim() > 0:
            grad_output = grad_output.unsqueeze(ctx.class_dim)  # one upstream value per row of classes
        if not _is_eager(grad, grad_output) or torch._C._autograd._get_current_graph_task_keep_graph():
            return (grad * grad_output,) + nones
        torch.ops.focal.scale_grad_(grad, grad_output)
        return (grad,) + nones

    def jvp(ctx, logits_tangent, *_):
        """Forward mode: the saved gradient times the tangent, summed as the loss is."""
        if logits_tangent is None:
            return None, None
        saved = ctx.saved_tensors  # in jvp: what setup_context gave save_for_forward
        if len(saved) != 1:
            raise RuntimeError("forward-mode differentiation of the raw op needs compute_grad=True")
        (grad,) = saved
        if ctx.params["reduction"] == "none" and ctx.class_dim is None:
            return grad * logits_tangent, None
        accumulate = torch.float64 if grad.dtype == torch.float64 else torch.float32
        product = grad.to(accumulate) * logits_tangent.to(accumulate)
        if ctx.params["reduction"] == "none":
            return product.sum(ctx.class_dim).to(grad.dtype), None
        return product.sum(), None

    class_name = "".join(part.title() for part in op_name.split("_")) + "Function"
    function = type(
        class_name,
        (torch.autograd.Function,),
        {
            "__doc__": f"torch.ops.focal.{op_name} as an autograd.Function; vmap of it (e.g. per-sample "
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


def _autograd_kernel(op):
    _, with_jvp = _FUNCTIONS[op.name]
    overload, op_name = op.overload, op.name
    defaults = tuple(a.default_value for a in overload._schema.arguments)

    def kernel(keyset, *args):
        # The dispatcher leaves out trailing arguments that equal their defaults: the Function needs
        # them all, in place.
        args = args + defaults[len(args):]
        if torch.is_grad_enabled() and args[0].requires_grad:
            if torch._C._are_functorch_transforms_active():
                raise RuntimeError(
                    f"under torch.func transforms, differentiate focal.{op_name} rather than the raw operator"
                )
            return with_jvp.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


def _fake(op):
    per_row = op.layout == "row"
    reduction_slot, compute_grad_slot = op.slot("reduction"), op.slot("compute_grad")

    def fake(logits, targets, *rest):
        """Shapes and dtypes of (loss, grad), from the schema's reduction and compute_grad."""
        reduction, compute_grad = rest[reduction_slot - 2], rest[compute_grad_slot - 2]
        if reduction == "none":
            loss = logits.new_empty(targets.shape if per_row else logits.shape)
        else:
            loss = logits.new_empty((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
        grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
        return loss, grad

    return fake


def _vmap(overload):
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
            loss, grad = overload(*sample)
            losses.append(loss)
            grads.append(grad)
        return (torch.stack(losses), torch.stack(grads)), (0, 0)

    return vmap_rule


_LIBRARY = None


def register(ops) -> None:
    """Registers every op's fake kernel, vmap rule and Autograd kernel (once per process)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    _LIBRARY = torch.library.Library("focal", "IMPL")
    torch.library.register_fake("focal::scale_grad_")(lambda grad, grad_output: None)
    for op in ops:
        torch.library.register_fake(f"focal::{op.name}")(_fake(op))
        torch.library.register_vmap(f"focal::{op.name}")(_vmap(op.overload))
        _FUNCTIONS[op.name] = _make_functions(op)
        _LIBRARY.impl(op.name, _autograd_kernel(op), "Autograd", with_keyset=True)
