"""Pure-PyTorch references for the focal-loss family: the plain statements the fused ops are tested against.

Each module holds one member of the family, written directly from its paper; see its docstring.

* :mod:`focal.reference.sigmoid`: the sigmoid focal loss and its Appendix B derivative.
"""

from focal.reference.sigmoid import expand_targets, sigmoid_focal_loss, sigmoid_focal_loss_grad

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_grad", "expand_targets"]
