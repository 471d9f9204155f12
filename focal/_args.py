"""Validation of the public arguments and their translation into the operator's arguments.

Everything here looks only at shapes, dtypes, devices and Python numbers, so it is cheap, never
synchronises with a GPU, and traces under ``torch.compile``. Errors are ValueError (bad value or
shape) or TypeError (bad type), each naming the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "mean", "sum")


@dataclass
class OpArgs:
    """Arguments of ``torch.ops.focal.sigmoid_focal_loss`` plus the shape to restore."""

    logits: torch.Tensor  # (N, C)
    targets: torch.Tensor  # (N, C) in the logits' dtype, or (N,) int64
    weight: torch.Tensor | None  # (C,) or (N, C)
    row_weight: torch.Tensor | None  # (N,)
    normalizer: torch.Tensor | None  # 0-dim
    alpha: float
    gamma: float
    label_smoothing: float
    ignore_index: int
    reduction: str
    scale: float
    out_shape: torch.Size


def _real_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _finite(value: float) -> bool:
    # Comparisons rather than math.isfinite: they also work on symbolic floats under torch.compile.
    return -math.inf < value < math.inf


def _check_alpha(alpha) -> float:
    if alpha is None:
        return -1.0
    value = _real_number(alpha, "alpha")
    if value == -1.0:
        return -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], or None / -1 for no weighting, got {alpha}")
    return value


def _check_gamma(gamma) -> float:
    value = _real_number(gamma, "gamma")
    if not (_finite(value) and value >= 0.0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    return value


def _check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_device(t: torch.Tensor, inputs: torch.Tensor, name: str) -> None:
    if t.device != inputs.device:
        raise ValueError(f"{name} is on {t.device} but inputs are on {inputs.device}")


def _normalizer(normalizer, inputs: torch.Tensor, reduction: str):
    """Returns (tensor or None, scale factor)."""
    if normalizer is None:
        return None, 1.0
    if reduction == "mean":
        raise ValueError(
            "normalizer divides the summed loss: use it with reduction='sum' (or 'none'), not 'mean'"
        )
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}"
            )
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer must be a real number tensor, got {normalizer.dtype}")
        if normalizer.device != inputs.device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device} but inputs are on {inputs.device}")
        if normalizer.requires_grad:
            raise ValueError("normalizer must not require grad (detach it)")
        return normalizer.reshape(()), 1.0
    value = _real_number(normalizer, "normalizer")
    if not (_finite(value) and value > 0.0):
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer}")
    return None, 1.0 / value


def _weights(weight, inputs: torch.Tensor, rows: int, classes: int):
    """Splits a weight broadcastable to ``inputs`` into the op's (weight, row_weight)."""
    if weight is None:
        return None, None
    weight = _check_tensor(weight, "weight")
    if not (weight.is_floating_point() or weight.dtype == torch.bool) or weight.is_complex():
        raise TypeError(f"weight must be a floating point tensor, got {weight.dtype}")
    _check_device(weight, inputs, "weight")
    if weight.requires_grad:
        raise ValueError("gradients with respect to weight are not supported: pass weight.detach()")
    shape = inputs.shape
    try:
        broadcast_ok = torch.broadcast_shapes(weight.shape, shape) == shape
    except RuntimeError:
        broadcast_ok = False
    if not broadcast_ok:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} cannot be broadcast to inputs of shape {tuple(shape)}; "
            "use e.g. a per-class weight (C,) or a per-row weight (..., 1)"
        )
    weight = weight.to(inputs.dtype)
    if weight.dim() == 0 or weight.shape[-1] == 1:  # constant along the classes: one per row
        row_shape = shape[:-1] + (1,) if len(shape) else (1,)
        return None, weight.expand(row_shape).reshape(rows).contiguous()
    if all(s == 1 for s in weight.shape[:-1]):  # one per class, shared by every row
        return weight.reshape(classes).contiguous(), None
    return weight.expand(shape).reshape(rows, classes).contiguous(), None


def prepare(
    inputs,
    targets,
    alpha,
    gamma,
    reduction,
    weight,
    normalizer,
    ignore_index,
    label_smoothing,
) -> OpArgs:
    inputs = _check_tensor(inputs, "inputs")
    targets = _check_tensor(targets, "targets")
    if inputs.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"inputs must be float32, float64, float16 or bfloat16 logits, got {inputs.dtype}"
        )
    _check_device(targets, inputs, "targets")
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a string, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    alpha = _check_alpha(alpha)
    gamma = _check_gamma(gamma)
    label_smoothing = _real_number(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if targets.requires_grad:
        raise ValueError("gradients with respect to targets are not supported: pass targets.detach()")

    shape = inputs.shape
    classes = shape[-1] if inputs.dim() else 1
    rows = math.prod(shape[:-1]) if inputs.dim() else 1
    if targets.is_complex():
        raise TypeError(f"targets must be float (same shape as inputs) or integer class ids, got {targets.dtype}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        if targets.shape != shape:
            raise ValueError(
                f"float targets must have the shape of inputs {tuple(shape)}, got {tuple(targets.shape)} "
                "(integer class-id targets have shape inputs.shape[:-1])"
            )
        op_targets = targets.to(inputs.dtype).reshape(rows, classes).contiguous()
    else:
        if inputs.dim() == 0 or targets.shape != shape[:-1]:
            raise ValueError(
                f"integer class-id targets must have shape inputs.shape[:-1] = {tuple(shape[:-1])}, "
                f"got {tuple(targets.shape)} (for one-hot targets pass a float tensor)"
            )
        if -1 <= ignore_index < classes:
            raise ValueError(
                f"ignore_index={ignore_index} collides with a class id in [0, {classes}) or with "
                "background (-1); use a value outside [-1, C), e.g. -100"
            )
        op_targets = targets.reshape(rows).to(torch.long).contiguous()

    weight, row_weight = _weights(weight, inputs, rows, classes)
    normalizer, scale = _normalizer(normalizer, inputs, reduction)
    if normalizer is not None and normalizer.device.type == "cpu" and not torch.compiler.is_compiling():
        if not normalizer.is_meta and not (float(normalizer) > 0 and math.isfinite(float(normalizer))):
            raise ValueError(f"normalizer must be a finite number > 0, got {float(normalizer)}")

    return OpArgs(
        logits=inputs.reshape(rows, classes).contiguous(),
        targets=op_targets,
        weight=weight,
        row_weight=row_weight,
        normalizer=normalizer,
        alpha=alpha,
        gamma=gamma,
        label_smoothing=label_smoothing,
        ignore_index=int(ignore_index),
        reduction=reduction,
        scale=scale,
        out_shape=shape,
    )
