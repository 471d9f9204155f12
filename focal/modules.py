"""The losses as ``nn.Module``s: ``SigmoidFocalLoss``, ``SoftmaxFocalLoss``, ``SigmoidFocalLossStar``,
``QualityFocalLoss``, ``VarifocalLoss``."""

from __future__ import annotations

import torch
from torch import nn

from focal.family import quality_focal_loss, sigmoid_focal_loss_star, varifocal_loss
from focal.functional import sigmoid_focal_loss
from focal.softmax import softmax_focal_loss

__all__ = ["SigmoidFocalLoss", "SoftmaxFocalLoss", "SigmoidFocalLossStar", "QualityFocalLoss", "VarifocalLoss"]


class SigmoidFocalLoss(nn.Module):
    """Module form of :func:`focal.sigmoid_focal_loss`; see it for the meaning of every argument.

    The loss hyper-parameters are fixed at construction; ``weight`` and ``normalizer`` change from
    batch to batch and are passed to ``forward``.

    Example:
        >>> criterion = SigmoidFocalLoss(alpha=0.25, gamma=2.0, reduction="sum")
        >>> loss = criterion(logits, labels, normalizer=num_positive_anchors)
    """

    def __init__(
        self,
        alpha: float | None = 0.25,
        gamma: float = 2.0,
        reduction: str = "none",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weight: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sigmoid_focal_loss(
            inputs,
            targets,
            self.alpha,
            self.gamma,
            self.reduction,
            weight=weight,
            normalizer=normalizer,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
        )


class SigmoidFocalLossStar(nn.Module):
    """Module form of :func:`focal.sigmoid_focal_loss_star` (FL*); see it for every argument.

    Example:
        >>> criterion = SigmoidFocalLossStar(gamma=2.0, beta=1.0, reduction="sum")
        >>> loss = criterion(logits, labels, normalizer=num_positive_anchors)
    """

    def __init__(
        self,
        gamma: float = 2.0,
        beta: float = 1.0,
        alpha: float | None = None,
        reduction: str = "none",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.beta = beta
        self.alpha = alpha
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, inputs, targets, weight=None, normalizer=None):
        return sigmoid_focal_loss_star(
            inputs, targets, self.gamma, self.beta, self.alpha, self.reduction, weight=weight,
            normalizer=normalizer, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, beta={self.beta}, alpha={self.alpha}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
        )


class QualityFocalLoss(nn.Module):
    """Module form of :func:`focal.quality_focal_loss` (QFL); ``targets`` are dense quality targets
    or the pair ``(ids, scores)``.

    Example:
        >>> criterion = QualityFocalLoss(beta=2.0, reduction="sum")
        >>> loss = criterion(logits, (ids, iou), normalizer=num_positive_anchors)
    """

    def __init__(self, beta: float = 2.0, reduction: str = "none", ignore_index: int = -100) -> None:
        super().__init__()
        self.beta = beta
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, inputs, targets, weight=None, normalizer=None):
        return quality_focal_loss(
            inputs, targets, self.beta, self.reduction, weight=weight, normalizer=normalizer,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class VarifocalLoss(nn.Module):
    """Module form of :func:`focal.varifocal_loss` (VFL); ``targets`` are dense quality targets or
    the pair ``(ids, scores)``.

    Example:
        >>> criterion = VarifocalLoss(alpha=0.75, gamma=2.0, reduction="sum")
        >>> loss = criterion(logits, (ids, iou), normalizer=num_positive_anchors)
    """

    def __init__(self, alpha: float = 0.75, gamma: float = 2.0, reduction: str = "none", ignore_index: int = -100) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, inputs, targets, weight=None, normalizer=None):
        return varifocal_loss(
            inputs, targets, self.alpha, self.gamma, self.reduction, weight=weight, normalizer=normalizer,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}"
        )


class SoftmaxFocalLoss(nn.Module):
    """Module form of :func:`focal.softmax_focal_loss`, shaped like ``nn.CrossEntropyLoss``: the
    per-class ``weight`` (and a per-class ``alpha`` tensor) are buffers, fixed at construction with
    the other hyper-parameters; ``normalizer`` changes from batch to batch and is passed to ``forward``.

    Example:
        >>> criterion = SoftmaxFocalLoss(gamma=2.0, ignore_index=255)
        >>> loss = criterion(logits, labels)   # logits (N, C, H, W), labels (N, H, W)
    """

    def __init__(
        self,
        alpha: float | torch.Tensor | None = None,
        gamma: float = 2.0,
        reduction: str = "mean",
        *,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        if isinstance(alpha, torch.Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, normalizer: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        return softmax_focal_loss(
            input, target, self.alpha, self.gamma, self.reduction, weight=self.weight,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, normalizer=normalizer,
        )

    def extra_repr(self) -> str:
        alpha = "tensor" if isinstance(self.alpha, torch.Tensor) else self.alpha
        return (
            f"alpha={alpha}, gamma={self.gamma}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
        )
