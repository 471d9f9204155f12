"""FCOS's box-regression (GIoU) and centerness losses of a whole batch as one fused operator.

Stock torchvision decodes and encodes the box of every location of every image, keeps the
foreground through boolean masks (each of which waits for the device to count it), and computes the
GIoU loss, the centerness target and its cross-entropy in some 130 tensor operations forward and
backward, each costing its dispatch (on a GPU, its launch) for a few hundred foreground locations.
``torch.ops.focal.fcos_box_losses`` does all of it in one pass over the locations, the foreground
picked inside the kernel from the matcher's indices, divides by the normaliser (read on the device
when it is there) and writes the gradients in the same pass; the backward only scales them. The
per-location math is ``csrc/box_math.h``, in float64 whatever the inputs' dtype, so a float32 or
bfloat16 model's terms are at least as exact as stock's.

The operator's schema and arguments: ``csrc/box_ops.h``. Registered here: its fake kernel (for
``torch.compile``) and its autograd (first derivatives; a second derivative raises).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

import focal  # noqa: F401  (loads the extension that defines the operator)

__all__ = ["fcos_box_losses"]

_OP = "focal::fcos_box_losses"


def fcos_box_losses(codes: Tensor, ctrness: Tensor, anchors: Tensor, gt_boxes: Tensor, matched: Tensor,
                    normalizer: Optional[Tensor], normalize_by_size: bool) -> Tuple[Tensor, Tensor]:
    """FCOS's GIoU and centerness losses, each summed over the foreground locations of a batch and
    divided by ``normalizer``.

    Args:
        codes: ``(N, L, 4)`` the head's box regression (distances to the box's edges from each
            location's anchor centre, in units of the anchor's size if ``normalize_by_size``).
        ctrness: ``(N, L, 1)`` or ``(N, L)`` the head's centerness logits, the codes' dtype.
        anchors: ``(N, L, 4)`` each location's anchor box ``(x1, y1, x2, y2)``.
        gt_boxes: ``(N, G, 4)`` each image's ground-truth boxes, padded to G >= 1 rows (any
            floating dtype, as ``anchors``: both are read exactly).
        matched: ``(N, L)`` int64, the row of ``gt_boxes[n]`` each location was matched to;
            negative for background, which adds nothing.
        normalizer: None or a one-element tensor (for instance the number of foreground locations,
            kept on the device) that divides both sums; finite and > 0.
        normalize_by_size: torchvision's ``BoxLinearCoder.normalize_by_size``.

    Returns:
        The GIoU loss of the decoded boxes and the binary cross-entropy of the centerness logits,
        0-dim float32 (float64 for float64 codes), differentiable with respect to ``codes`` and
        ``ctrness``.
    """
    giou, centerness, _, _ = torch.ops.focal.fcos_box_losses(
        codes, ctrness, anchors, gt_boxes, matched, normalizer, normalize_by_size)
    return giou, centerness


@torch.library.register_fake(_OP)
def _fake(codes, ctrness, anchors, gt_boxes, matched, normalizer, normalize_by_size):
    dtype = torch.float64 if codes.dtype == torch.float64 else torch.float32
    return (codes.new_empty((), dtype=dtype), codes.new_empty((), dtype=dtype),
            codes.new_empty(codes.shape, dtype=dtype), ctrness.new_empty(ctrness.shape, dtype=dtype))


def _setup_context(ctx, inputs, output):
    codes, ctrness = inputs[:2]
    _, _, grad_codes, grad_ctrness = output
    ctx.mark_non_differentiable(grad_codes, grad_ctrness)
    ctx.save_for_backward(grad_codes, grad_ctrness)
    ctx.dtypes = codes.dtype, ctrness.dtype


def _backward(ctx, grad_giou, grad_centerness, _grad_codes, _grad_ctrness):
    if torch.is_grad_enabled():
        raise NotImplementedError("fcos_box_losses has first derivatives only (create_graph=True was asked)")
    grad_codes, grad_ctrness = ctx.saved_tensors  # in the math dtype: rounded once, after scaling
    codes_dtype, ctrness_dtype = ctx.dtypes
    return ((grad_codes * grad_giou).to(codes_dtype), (grad_ctrness * grad_centerness).to(ctrness_dtype),
            None, None, None, None, None)


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
