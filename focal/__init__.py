"""focal: the focal loss and its family as fused CPU/CUDA operators.

>>> import focal
>>> loss = focal.sigmoid_focal_loss(logits, targets, reduction="sum", normalizer=num_pos)

The family: ``sigmoid_focal_loss_star`` (FL*), ``quality_focal_loss`` (QFL), ``varifocal_loss``
(VFL), each also as an ``nn.Module``.

``focal.reference`` holds the pure-PyTorch statement of the same math.
"""

from focal import ops  # noqa: F401  (registers fake kernels, autograd and vmap on the compiled ops)
from focal import reference
from focal.family import quality_focal_loss, sigmoid_focal_loss_star, varifocal_loss
from focal.functional import sigmoid_focal_loss
from focal.memory import empty_cache
from focal.modules import (
    QualityFocalLoss,
    SigmoidFocalLoss,
    SigmoidFocalLossStar,
    SoftmaxFocalLoss,
    VarifocalLoss,
)
from focal.softmax import softmax_focal_loss

__all__ = [
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "sigmoid_focal_loss_star",
    "quality_focal_loss",
    "varifocal_loss",
    "SigmoidFocalLoss",
    "SoftmaxFocalLoss",
    "SigmoidFocalLossStar",
    "QualityFocalLoss",
    "VarifocalLoss",
    "empty_cache",
    "reference",
]
__version__ = "0.1.0"
