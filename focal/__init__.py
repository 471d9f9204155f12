"""focal: the sigmoid focal loss as one fused CPU/CUDA operator.

>>> import focal
>>> loss = focal.sigmoid_focal_loss(logits, targets, reduction="sum", normalizer=num_pos)

``focal.reference`` holds the pure-PyTorch statement of the same math.
"""

from focal import reference
from focal.functional import sigmoid_focal_loss
from focal.memory import empty_cache
from focal.modules import SigmoidFocalLoss
from focal.modules import SoftmaxFocalLoss
from focal.softmax import softmax_focal_loss

__all__ = ["sigmoid_focal_loss", "SigmoidFocalLoss", "empty_cache", "reference"]
__all__ += ["softmax_focal_loss", "SoftmaxFocalLoss"]
__version__ = "0.1.0"
