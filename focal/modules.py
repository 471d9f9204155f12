"""The losses as ``nn.Module``s: ``SigmoidFocalLoss``, ``SoftmaxFocalLoss``, ``SigmoidFocalLossStar``,
``QualityFocalLoss``, ``VarifocalLoss``.

Each fixes its function's hyper-parameters at construction and passes what changes from batch to
batch (``weight`` and ``normalizer``; the softmax loss's ``weight`` is per class and fixed, as
``nn.CrossEntropyLoss``'s) to ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from focal.family import quality_focal_loss, sigmoid_focal_loss_star, varifocal_loss
from focal.functional import sigmoid_focal_loss
from focal.softmax import softmax_focal_loss

__all__ = ["SigmoidFocalLoss", "SoftmaxFocalLoss", "SigmoidFocalLossStar", "QualityFocalLoss", "VarifocalLoss"]


def _arguments(frame_locals: dict) -> dict:
    """A constructor's arguments, in order, from its ``locals()``."""
    return {name: value for name, value in frame_locals.items() if name != "self" and not name.startswith("__")}


class _LossModule(nn.Module):
    """A loss function (the subclass's ``function``) with its hyper-parameters fixed: numbers and
    strings as attributes, tensors as buffers, all shown by ``repr`` in the order given."""

    def __init__(self, **hyper) -> None:
        super().__init__()
        self._hyper = tuple(hyper)
        for name, value in hyper.items():
            if isinstance(value, torch.Tensor) or (value is None and name == "weight"):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)

    def hyper_parameters(self) -> dict:
        return {name: getattr(self, name) for name in self._hyper}

    def forward(
        self, inputs: torch.Tensor, targets, weight: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return type(self).function(inputs, targets, weight=weight, normalizer=normalizer, **self.hyper_parameters())

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}={'tensor' if isinstance(value, torch.Tensor) else repr(value) if isinstance(value, str) else value}"
            for name, value in self.hyper_parameters().items()
            if name != "weight"  # a buffer, as nn.CrossEntropyLoss's
        )


class SigmoidFocalLoss(_LossModule):
    """Module form of :func:`focal.sigmoid_focal_loss`; see it for the meaning of every argument.

    Example:
        >>> criterion = SigmoidFocalLoss(alpha=0.25, gamma=2.0, reduction="sum")
        >>> loss = criterion(logits, labels, normalizer=num_positive_anchors)
    """

    function = staticmethod(sigmoid_focal_loss)

    def __init__(
        self, alpha: float | torch.Tensor | None = 0.25, gamma: float = 2.0, reduction: str = "none",
        ignore_index: int = -100, label_smoothing: float = 0.0, background_index: int = -1,
    ) -> None:
        super().__init__(**_arguments(locals()))

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Spelled out, as torch.jit.script needs (it scripts this module as it scripts the function).
        return sigmoid_focal_loss(
            inputs, targets, self.alpha, self.gamma, self.reduction, weight=weight, normalizer=normalizer,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            background_index=self.background_index,
        )


class SigmoidFocalLossStar(_LossModule):
    """Module form of :func:`focal.sigmoid_focal_loss_star` (FL*), e.g. ``SigmoidFocalLossStar(gamma=2.0,
    beta=1.0, reduction="sum")``; see the function for every argument."""

    function = staticmethod(sigmoid_focal_loss_star)

    def __init__(
        self, gamma: float = 2.0, beta: float = 1.0, alpha: float | torch.Tensor | None = None,
        reduction: str = "none", ignore_index: int = -100, label_smoothing: float = 0.0, background_index: int = -1,
    ) -> None:
        super().__init__(**_arguments(locals()))


class QualityFocalLoss(_LossModule):
    """Module form of :func:`focal.quality_focal_loss` (QFL); ``targets`` are dense quality targets
    or the pair ``(ids, scores)``.

    Example:
        >>> criterion = QualityFocalLoss(beta=2.0, reduction="sum")
        >>> loss = criterion(logits, (ids, iou), normalizer=num_positive_anchors)
    """

    function = staticmethod(quality_focal_loss)

    def __init__(
        self, beta: float = 2.0, reduction: str = "none", ignore_index: int = -100, background_index: int = -1
    ) -> None:
        super().__init__(**_arguments(locals()))


class VarifocalLoss(_LossModule):
    """Module form of :func:`focal.varifocal_loss` (VFL); ``targets`` are dense quality targets or
    the pair ``(ids, scores)``.

    Example:
        >>> criterion = VarifocalLoss(alpha=0.75, gamma=2.0, reduction="sum")
        >>> loss = criterion(logits, (ids, iou), normalizer=num_positive_anchors)
    """

    function = staticmethod(varifocal_loss)

    def __init__(
        self, alpha: float | torch.Tensor = 0.75, gamma: float = 2.0, reduction: str = "none", ignore_index: int = -100,
        background_index: int = -1,
    ) -> None:
        super().__init__(**_arguments(locals()))


class SoftmaxFocalLoss(_LossModule):
    """Module form of :func:`focal.softmax_focal_loss`, shaped like ``nn.CrossEntropyLoss``: the
    per-class ``weight`` (and a per-class ``alpha`` tensor) are buffers, fixed at construction with
    the other hyper-parameters; ``normalizer`` changes from batch to batch and is passed to ``forward``.

    Example:
        >>> criterion = SoftmaxFocalLoss(gamma=2.0, ignore_index=255)
        >>> loss = criterion(logits, labels)   # logits (N, C, H, W), labels (N, H, W)
    """

    function = staticmethod(softmax_focal_loss)

    def __init__(
        self, alpha: float | torch.Tensor | None = None, gamma: float = 2.0, reduction: str = "mean", *,
        weight: torch.Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(**_arguments(locals()))

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, normalizer: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        return softmax_focal_loss(input, target, normalizer=normalizer, **self.hyper_parameters())
