"""Pure-PyTorch references for the focal-loss family: the plain statements the fused ops are tested against.

Each module holds members of the family written directly from their paper; see its docstring.

* :mod:`focal.reference.sigmoid`: the sigmoid focal loss (Lin et al., 2017) and its Appendix B derivative.
* :mod:`focal.reference.softmax`: the softmax focal loss, with ``torch.nn.functional.cross_entropy``'s
  conventions.
* :mod:`focal.reference.star`: FL*, the variant of the focal loss paper's Appendix A.
* :mod:`focal.reference.quality`: the quality focal loss (Li et al., 2020) and the varifocal loss
  (Zhang et al., 2021), with soft IoU targets.

They materialise every intermediate and do no argument validation beyond what the math needs: slow and
plain on purpose. They form nothing by cancellation (``1 - p`` is ``sigmoid(-x)``, cross entropies are
sums of ``softplus`` terms, the softmax's classes are binary logits against the rest), so that in float64
they are more exact than any op they judge, saturated tails and subnormal results included:
tests/test_oracle.py checks them, and their derivatives, against 50-digit values.
"""

from focal.reference._common import expand_targets
from focal.reference.quality import quality_focal_loss, quality_targets, varifocal_loss
from focal.reference.sigmoid import sigmoid_focal_loss, sigmoid_focal_loss_grad
from focal.reference.softmax import softmax_focal_loss
from focal.reference.star import sigmoid_focal_loss_star

__all__ = [
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_grad",
    "expand_targets",
    "softmax_focal_loss",
    "sigmoid_focal_loss_star",
    "quality_focal_loss",
    "varifocal_loss",
    "quality_targets",
]
