"""The compiled operators: loading ``focal._C`` and their fake (meta) kernels.

``torch.ops.focal.sigmoid_focal_loss(logits, targets, weight, row_weight, normalizer, alpha, gamma,
label_smoothing, ignore_index, reduction, scale, compute_grad) -> (loss, grad)``

- ``logits``: (N, C) contiguous float32 / float64 / float16 / bfloat16.
- ``targets``: (N, C) in the logits' dtype (binary or soft targets), or (N,) int64 class ids
  (``[0, C)`` positive class, ``-1`` background, ``ignore_index`` ignored).
- ``weight``: None, (C,) or (N, C); ``row_weight``: None or (N,); both in the logits' dtype.
- ``normalizer``: None or a 0-dim tensor that divides the loss; ``scale``: a float multiplying it.
- ``alpha`` < 0 disables alpha weighting; ``reduction`` is "none", "mean" or "sum".
- Returns ``loss`` ((N, C) in the logits' dtype for "none", else a 0-dim float32 tensor, float64
  for float64 logits) and ``grad`` = d loss / d logits ((N, C) in the logits' dtype), or an empty (0,)
  tensor when ``compute_grad`` is False.

These ops are not differentiable themselves: :func:`focal.sigmoid_focal_loss` wraps them in an
autograd function whose backward only scales the saved ``grad``.
"""

from __future__ import annotations

import torch

__all__ = ["sigmoid_focal_loss_op", "require_kernels", "BUILD_ERROR", "KERNEL_DEVICE_TYPES"]

BUILD_HINT = "pip install --no-build-isolation -e .  (from the focal checkout)"

try:
    from focal import _C  # noqa: F401  (loading the library registers the ops)

    BUILD_ERROR: str | None = None
except ImportError as error:  # the package is importable for its reference even when unbuilt
    BUILD_ERROR = str(error)

# Device types with a compiled kernel, looked up once (a plain dict also traces under torch.compile).
KERNEL_DEVICE_TYPES = frozenset(
    device
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if BUILD_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key("focal::sigmoid_focal_loss", key)
)


def require_kernels(device: torch.device) -> None:
    """Raise a RuntimeError that says how to build when no kernel exists for ``device``."""
    if BUILD_ERROR is not None:
        raise RuntimeError(
            f"focal's compiled extension focal._C could not be loaded ({BUILD_ERROR}). "
            f"Build it with: {BUILD_HINT}"
        )
    if device.type not in KERNEL_DEVICE_TYPES:
        hint = (
            "rebuild focal where a CUDA toolkit (nvcc, CUDA_HOME) and a CUDA build of torch are "
            f"present, with FOCAL_WITH_CUDA=1: FOCAL_WITH_CUDA=1 {BUILD_HINT}"
            if device.type == "cuda"
            else "only CPU and CUDA tensors are supported"
        )
        raise RuntimeError(f"focal has no kernel for {device.type} tensors: {hint}")


def sigmoid_focal_loss_op():
    """The OpOverload ``torch.ops.focal.sigmoid_focal_loss.default``."""
    return torch.ops.focal.sigmoid_focal_loss.default


if BUILD_ERROR is None:

    @torch.library.register_fake("focal::sigmoid_focal_loss")
    def _sigmoid_focal_loss_fake(
        logits,
        targets,
        weight,
        row_weight,
        normalizer,
        alpha,
        gamma,
        label_smoothing,
        ignore_index,
        reduction,
        scale,
        compute_grad,
    ):
        torch._check(logits.dim() == 2, lambda: "logits must be 2D")
        if reduction == "none":
            loss = logits.new_empty(logits.shape)
        else:
            reduced = torch.float64 if logits.dtype == torch.float64 else torch.float32
            loss = logits.new_empty((), dtype=reduced)
        grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
        return loss, grad
