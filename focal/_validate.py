"""Validation of the public arguments and their translation into the operator's arguments.

Everything here looks only at shapes, dtypes, devices and Python numbers, so it is cheap, never
synchronises with a GPU, traces under ``torch.compile`` and compiles under ``torch.jit.script``
(checks of Python types, which TorchScript enforces by itself, run in eager mode only). Errors are
ValueError (bad value or shape) or TypeError (bad type), each naming the argument and what was
expected; the operator itself keeps only the checks that guard memory.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "op_arguments", "OpArguments", "star_arguments", "quality_arguments", "varifocal_arguments", "softmax_arguments",
    "number",
]

# The arguments of torch.ops.focal.sigmoid_focal_loss, in the schema's order, less compute_grad:
# logits, targets, weight, row_weight, normalizer, alpha, gamma, label_smoothing, ignore_index,
# reduction, scale, class_alpha, background_index.
OpArguments = Tuple[
    Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], float, float, float, int, str, float,
    Optional[Tensor], int,
]


def _is_supported_dtype(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or dtype == torch.float64 or dtype == torch.float16 or dtype == torch.bfloat16


def _real(value, name: str) -> None:
    """TypeError unless ``value`` is a real number (not a bool): the one type check of every number."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def _integer(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _check_python_types(
    inputs, targets, alpha, gamma, reduction, weight, normalizer, ignore_index, label_smoothing, background_index
):
    """What TorchScript's signature checks do for scripted callers, for eager ones."""
    for value, name in ((inputs, "inputs"), (targets, "targets")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if alpha is not None and not isinstance(alpha, Tensor):
        _real(alpha, "alpha")
    _real(gamma, "gamma")
    _real(label_smoothing, "label_smoothing")
    if normalizer is not None and not isinstance(normalizer, Tensor):
        _real(normalizer, "normalizer")
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a string, got {type(reduction).__name__}")
    _integer(ignore_index, "ignore_index")
    _integer(background_index, "background_index")


def _shape(shape: List[int]) -> str:
    """A shape as Python prints a tuple, also under TorchScript: (4, 3), (4,), ()."""
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ", ".join([str(size) for size in shape]) + ")"


def _finite(value: float) -> bool:
    # Comparisons rather than math.isfinite: they also work on symbolic floats under torch.compile.
    return -float("inf") < value < float("inf")


def _alpha(alpha: Optional[float]) -> float:
    if alpha is None or alpha == -1.0:
        return -1.0
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], or None / -1 for no weighting, got {alpha}")
    return float(alpha)


def _class_alpha(alpha: Tensor, inputs: Tensor) -> Tensor:
    """A per-class alpha: a floating point ``(C,)`` tensor on the inputs' device, not requiring grad.
    Its values are checked by the op on the CPU, where reading them needs no device sync."""
    if not alpha.is_floating_point():
        raise TypeError(f"alpha as a tensor must be floating point, got {alpha.dtype}")
    classes = inputs.shape[-1] if inputs.dim() > 0 else 1
    if list(alpha.shape) != [classes]:
        raise ValueError(
            f"alpha as a tensor must have shape ({classes},), one value per class, got {_shape(list(alpha.shape))}"
        )
    if alpha.device != inputs.device:
        raise ValueError(f"alpha is on {alpha.device} but inputs are on {inputs.device}")
    if alpha.requires_grad:
        raise ValueError("gradients with respect to alpha are not supported: pass alpha.detach()")
    return alpha.contiguous()


def _label_ids(ignore_index: int, background_index: int, classes: int) -> None:
    """ignore_index and background_index, the two ids that are not classes: outside [0, C) and apart."""
    if 0 <= background_index < classes:
        raise ValueError(
            f"background_index={background_index} is a class id in [0, {classes}); background is -1 (the "
            f"default) or any id outside the classes, e.g. {classes} as mmdetection and detectron2 mark it"
        )
    if 0 <= ignore_index < classes or ignore_index == background_index:
        raise ValueError(
            f"ignore_index={ignore_index} collides with a class id in [0, {classes}) or with background_index "
            f"({background_index}); use another value outside [0, {classes}), e.g. -100"
        )


def _broadcasts_to(shape: List[int], target: List[int]) -> bool:
    if len(shape) > len(target):
        return False
    offset = len(target) - len(shape)
    for i in range(len(shape)):
        if shape[i] != 1 and shape[i] != target[offset + i]:
            return False
    return True


def _weights(weight: Optional[Tensor], inputs: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Splits a weight broadcastable to ``inputs`` into the op's (weight, row_weight): a per-class
    ``(C,)`` or full weight of the logits' shape, or one weight per row of shape ``shape[:-1]``."""
    if weight is None:
        return None, None
    if not (weight.is_floating_point() or weight.dtype == torch.bool):
        raise TypeError(f"weight must be a floating point tensor, got {weight.dtype}")
    if weight.device != inputs.device:
        raise ValueError(f"weight is on {weight.device} but inputs are on {inputs.device}")
    if weight.requires_grad:
        raise ValueError("gradients with respect to weight are not supported: pass weight.detach()")
    shape: List[int] = list(inputs.shape)
    if not _broadcasts_to(list(weight.shape), shape):
        raise ValueError(
            f"weight of shape {_shape(list(weight.shape))} cannot be broadcast to inputs of shape {_shape(shape)}; "
            "use e.g. a per-class weight (C,) or a per-row weight (..., 1)"
        )
    weight = weight.to(inputs.dtype)
    if list(weight.shape) == shape:  # passed on as it is when contiguous: no copy of an N x C tensor
        return weight.contiguous(), None
    if weight.dim() == 0 or weight.shape[-1] == 1:  # constant along the classes: one per row
        rows: List[int] = shape[:-1]
        return None, weight.expand(rows + [1]).reshape(rows).contiguous()
    leading_ones = True
    for size in weight.shape[:-1]:
        if size != 1:
            leading_ones = False
    if leading_ones:  # one per class, shared by every row
        return weight.reshape(shape[-1]).contiguous(), None
    return weight.expand(shape).contiguous(), None


def _normalizer(
    normalizer: Optional[Union[float, Tensor]], inputs: Tensor, reduction: str
) -> Tuple[Optional[Tensor], float]:
    """Returns (tensor or None, scale factor). A tensor's value is checked by the op where it can be
    read without a GPU sync (on the CPU); a number's here."""
    if normalizer is None:
        return None, 1.0
    if reduction == "mean":
        raise ValueError(
            "normalizer divides the summed loss: use it with reduction='sum' (or 'none'), not 'mean'"
        )
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer must be a number or a one-element tensor, got shape {_shape(list(normalizer.shape))}"
            )
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer must be a real number tensor, got {normalizer.dtype}")
        if normalizer.device != inputs.device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device} but inputs are on {inputs.device}")
        if normalizer.requires_grad:
            raise ValueError("normalizer must not require grad (detach it)")
        return normalizer, 1.0
    value = float(normalizer)
    if not (_finite(value) and value > 0.0):
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer}")
    return None, 1.0 / value


def op_arguments(
    inputs: Tensor,
    targets: Tensor,
    alpha: Optional[Union[float, Tensor]],
    gamma: float,
    reduction: str,
    weight: Optional[Tensor],
    normalizer: Optional[Union[float, Tensor]],
    ignore_index: int,
    label_smoothing: float,
    background_index: int = -1,
) -> OpArguments:
    """Checks the arguments of :func:`focal.sigmoid_focal_loss` and returns the operator's."""
    if not torch.jit.is_scripting():
        _check_python_types(
            inputs, targets, alpha, gamma, reduction, weight, normalizer, ignore_index, label_smoothing,
            background_index,
        )
    if not _is_supported_dtype(inputs.dtype):
        raise TypeError(f"inputs must be float32, float64, float16 or bfloat16 logits, got {inputs.dtype}")
    if targets.device != inputs.device:
        raise ValueError(f"targets is on {targets.device} but inputs are on {inputs.device}")
    if reduction != "none" and reduction != "mean" and reduction != "sum":
        raise ValueError(f"reduction must be one of ('none', 'mean', 'sum'), got '{reduction}'")
    class_alpha: Optional[Tensor] = None
    if isinstance(alpha, Tensor):
        class_alpha = _class_alpha(alpha, inputs)
        alpha_value = -1.0
    else:
        alpha_value = _alpha(alpha)
    if not (_finite(gamma) and gamma >= 0.0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if targets.requires_grad:
        raise ValueError("gradients with respect to targets are not supported: pass targets.detach()")
    if targets.is_complex():
        raise TypeError(f"targets must be float (same shape as inputs) or integer class ids, got {targets.dtype}")

    shape: List[int] = list(inputs.shape)
    if targets.is_floating_point() or targets.dtype == torch.bool:
        if list(targets.shape) != shape:
            raise ValueError(
                f"float targets must have the shape of inputs {_shape(shape)}, got {_shape(list(targets.shape))} "
                "(integer class-id targets have shape inputs.shape[:-1])"
            )
        op_targets = targets.to(inputs.dtype).contiguous()
    else:
        if inputs.dim() == 0 or list(targets.shape) != shape[:-1]:
            raise ValueError(
                f"integer class-id targets must have shape inputs.shape[:-1] = {_shape(shape[:-1])}, "
                f"got {_shape(list(targets.shape))} (for one-hot targets pass a float tensor)"
            )
        _label_ids(ignore_index, background_index, shape[-1])
        op_targets = targets.to(torch.long).contiguous()

    op_weight, row_weight = _weights(weight, inputs)
    op_normalizer, scale = _normalizer(normalizer, inputs, reduction)
    return (
        inputs.contiguous(), op_targets, op_weight, row_weight, op_normalizer, alpha_value,
        float(gamma), float(label_smoothing), int(ignore_index), reduction, scale, class_alpha, int(background_index),
    )


# ---- FL*, QFL and VFL (focal.family) --------------------------------------------------------------

# The arguments their operators share, in the schemas' order: logits, targets, scores, weight,
# row_weight, normalizer, scale (FL*'s op has no scores: focal.family drops it).
FamilyArguments = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], float]


def number(value, name: str, low: float = -float("inf"), low_inclusive: bool = True) -> float:
    """A finite real number (not a bool) above ``low``, as float; TypeError or ValueError naming it."""
    _real(value, name)
    above = value >= low if low_inclusive else value > low
    if not (_finite(value) and above):
        bound = "" if low == -float("inf") else f" {'>=' if low_inclusive else '>'} {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return float(value)


def _family_inputs(inputs, reduction, weight, ignore_index, background_index) -> None:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not _is_supported_dtype(inputs.dtype):
        raise TypeError(f"inputs must be float32, float64, float16 or bfloat16 logits, got {inputs.dtype}")
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a string, got {type(reduction).__name__}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be one of ('none', 'mean', 'sum'), got '{reduction}'")
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    _integer(ignore_index, "ignore_index")
    _integer(background_index, "background_index")


def _plain_tensor(value, name: str, inputs: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device != inputs.device:
        raise ValueError(f"{name} is on {value.device} but inputs are on {inputs.device}")
    if value.requires_grad:
        raise ValueError(f"gradients with respect to {name} are not supported: pass {name}.detach()")
    if value.is_complex():
        raise TypeError(f"{name} must be real, got {value.dtype}")
    return value


def _dense_targets(targets: Tensor, inputs: Tensor) -> Tensor:
    if list(targets.shape) != list(inputs.shape):
        raise ValueError(
            f"float targets must have the shape of inputs {_shape(list(inputs.shape))}, got "
            f"{_shape(list(targets.shape))} (integer class-id targets have shape inputs.shape[:-1])"
        )
    return targets.to(inputs.dtype).contiguous()


def _class_id_targets(ids: Tensor, inputs: Tensor, ignore_index: int, background_index: int, what: str) -> Tensor:
    if inputs.dim() == 0 or list(ids.shape) != list(inputs.shape[:-1]):
        raise ValueError(
            f"{what} must have shape inputs.shape[:-1] = {_shape(list(inputs.shape[:-1]))}, "
            f"got {_shape(list(ids.shape))}"
        )
    _label_ids(ignore_index, background_index, inputs.shape[-1])
    return ids.to(torch.long).contiguous()


def family_arguments(
    inputs: Tensor,
    targets,
    reduction: str,
    weight: Optional[Tensor],
    normalizer: Optional[Union[float, Tensor]],
    ignore_index: int,
    background_index: int,
    quality: bool,
) -> FamilyArguments:
    """Checks the arguments that FL*, QFL and VFL share and returns their operators' tensors.

    ``quality``: QFL / VFL, whose targets are dense float targets or the pair ``(ids, scores)``;
    otherwise FL*, whose targets are float targets or class ids, as the focal loss's.
    """
    _family_inputs(inputs, reduction, weight, ignore_index, background_index)
    scores: Optional[Tensor] = None
    if quality and isinstance(targets, (tuple, list)):
        if len(targets) != 2:
            raise ValueError(f"quality targets as a pair are (ids, scores), got {len(targets)} items")
        ids = _plain_tensor(targets[0], "ids", inputs)
        scores = _plain_tensor(targets[1], "scores", inputs)
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"the ids of (ids, scores) must be integer class ids, got {ids.dtype}")
        if not (scores.is_floating_point() or scores.dtype == torch.bool):
            raise TypeError(f"the scores of (ids, scores) must be floating point, got {scores.dtype}")
        op_targets = _class_id_targets(ids, inputs, ignore_index, background_index, "ids")
        if list(scores.shape) != list(ids.shape):
            raise ValueError(
                f"scores must have the shape of ids {_shape(list(ids.shape))}, got {_shape(list(scores.shape))}"
            )
        scores = scores.to(inputs.dtype).contiguous()
    else:
        targets = _plain_tensor(targets, "targets", inputs)
        if targets.is_floating_point() or targets.dtype == torch.bool:
            op_targets = _dense_targets(targets, inputs)
        elif quality:
            raise ValueError(
                "quality targets need scores: pass dense float targets of the shape of inputs or the "
                f"pair (ids, scores), got a {targets.dtype} tensor alone"
            )
        else:
            op_targets = _class_id_targets(targets, inputs, ignore_index, background_index, "integer class-id targets")
    op_weight, row_weight = _weights(weight, inputs)
    op_normalizer, scale = _normalizer(normalizer, inputs, reduction)
    return inputs.contiguous(), op_targets, scores, op_weight, row_weight, op_normalizer, scale


def _alpha_or_off(alpha) -> float:
    """A positives' weight in [0, 1], or -1 (no weighting) for None / -1."""
    if alpha is None or alpha == -1:
        return -1.0
    value = number(alpha, "alpha", 0.0)
    if value > 1.0:
        raise ValueError(f"alpha must be in [0, 1], or None / -1 for no weighting, got {alpha}")
    return value


def _number_or_classes(alpha, inputs: Tensor, read) -> Tuple[float, Optional[Tensor]]:
    """(the op's alpha, its class_alpha) for a number (read by ``read``) or a (C,) tensor."""
    if isinstance(alpha, Tensor):
        return -1.0, _class_alpha(alpha, inputs)
    return read(alpha), None


def _smoothing(label_smoothing) -> float:
    _real(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return float(label_smoothing)


def star_arguments(
    inputs, targets, weight, gamma, beta, alpha, reduction, normalizer, ignore_index, label_smoothing,
    background_index=-1,
):
    """Checks the arguments of :func:`focal.sigmoid_focal_loss_star`; returns its operator's."""
    gamma = number(gamma, "gamma", 0.0, low_inclusive=False)
    beta = number(beta, "beta")
    label_smoothing = number(label_smoothing, "label_smoothing", 0.0)
    if label_smoothing > 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    logits, op_targets, _, op_weight, row_weight, op_normalizer, scale = family_arguments(
        inputs, targets, reduction, weight, normalizer, ignore_index, background_index, quality=False
    )
    alpha_value, class_alpha = _number_or_classes(alpha, inputs, _alpha_or_off)
    return (logits, op_targets, op_weight, row_weight, op_normalizer, alpha_value, gamma, beta, label_smoothing,
            int(ignore_index), reduction, scale, class_alpha, int(background_index))


def quality_arguments(inputs, targets, weight, beta, reduction, normalizer, ignore_index, background_index=-1):
    """Checks the arguments of :func:`focal.quality_focal_loss`; returns its operator's."""
    beta = number(beta, "beta", 0.0)
    logits, op_targets, scores, op_weight, row_weight, op_normalizer, scale = family_arguments(
        inputs, targets, reduction, weight, normalizer, ignore_index, background_index, quality=True
    )
    return (logits, op_targets, scores, op_weight, row_weight, op_normalizer, beta, int(ignore_index), reduction,
            scale, int(background_index))


def _nonnegative_alpha(alpha) -> float:
    return number(alpha, "alpha", 0.0)


def varifocal_arguments(inputs, targets, weight, alpha, gamma, reduction, normalizer, ignore_index, background_index=-1):
    """Checks the arguments of :func:`focal.varifocal_loss`; returns its operator's."""
    gamma = number(gamma, "gamma", 0.0)
    logits, op_targets, scores, op_weight, row_weight, op_normalizer, scale = family_arguments(
        inputs, targets, reduction, weight, normalizer, ignore_index, background_index, quality=True
    )
    alpha, class_alpha = _number_or_classes(alpha, inputs, _nonnegative_alpha)
    return (logits, op_targets, scores, op_weight, row_weight, op_normalizer, alpha, gamma, int(ignore_index),
            reduction, scale, class_alpha, int(background_index))


# ---- the softmax focal loss (focal.softmax) -------------------------------------------------------


def _class_vector(value: Tensor, name: str, input: Tensor, classes: int) -> Tensor:
    """A per-class (C,) tensor: floating point, on the input's device, not requiring grad."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {value.dtype}")
    if list(value.shape) != [classes]:
        raise ValueError(f"{name} must have shape ({classes},) (one value per class), got {_shape(list(value.shape))}")
    if value.device != input.device:
        raise ValueError(f"{name} is on {value.device} but input is on {input.device}")
    if value.requires_grad:
        raise ValueError(f"gradients with respect to {name} are not supported: pass {name}.detach()")
    return value.contiguous()


def softmax_arguments(input, target, weight, alpha, gamma, reduction, ignore_index, label_smoothing, normalizer):
    """Checks the arguments of :func:`focal.softmax_focal_loss`; returns its operator's."""
    for value, name in ((input, "input"), (target, "target")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not _is_supported_dtype(input.dtype):
        raise TypeError(f"input must be float32, float64, float16 or bfloat16 logits, got {input.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class ids, got a {target.dtype} tensor "
            "(class-probability targets are not supported)"
        )
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: (C,), (N, C) or (N, C, d1, ...), got a 0-dim tensor")
    class_dim = 0 if input.dim() == 1 else 1
    expected = list(input.shape)
    classes = expected.pop(class_dim)
    if list(target.shape) != expected:
        raise ValueError(
            f"target must have the shape of input without its class dimension {class_dim}, {_shape(expected)}, "
            f"got {_shape(list(target.shape))}"
        )
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if not isinstance(reduction, str) or reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be one of ('none', 'mean', 'sum'), got {reduction!r}")
    gamma = number(gamma, "gamma", 0.0)
    label_smoothing = _smoothing(label_smoothing)
    _integer(ignore_index, "ignore_index")
    alpha_tensor: Optional[Tensor] = None
    alpha_value = 1.0
    if isinstance(alpha, Tensor):
        alpha_tensor = _class_vector(alpha, "alpha", input, classes)
    elif alpha is not None:
        _real(alpha, "alpha")
        if not (_finite(alpha) and alpha >= 0.0):
            raise ValueError(f"alpha must be a finite number >= 0, a ({classes},) tensor or None, got {alpha}")
        alpha_value = float(alpha)
    if weight is not None:
        weight = _class_vector(weight, "weight", input, classes)
    if normalizer is not None and not isinstance(normalizer, Tensor):
        _real(normalizer, "normalizer")
    op_normalizer, scale = _normalizer(normalizer, input, reduction)
    return (
        input.contiguous(), target.to(torch.long).contiguous(), weight, alpha_tensor, op_normalizer, alpha_value,
        gamma, label_smoothing, int(ignore_index), reduction, scale,
    )
