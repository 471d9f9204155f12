"""ultralytics RT-DETR with its focal and varifocal classification losses as fused calls.

>>> import focal.integrations.ultralytics
>>> model = ultralytics.RTDETR("rtdetr-l.yaml")
>>> model = focal.integrations.ultralytics.use_fused_loss(model)      # then model.train(...) as usual

RT-DETR's ``DETRLoss._get_loss_class`` builds, for the last decoder layer, every auxiliary layer, the
encoder queries and the denoising queries alike, an integer one-hot tensor of shape
``(batch, queries, classes + 1)``, multiplies the IoU scores into it and calls
``ultralytics.utils.loss.VarifocalLoss`` (or ``FocalLoss`` when the batch has no boxes), whose
sigmoid, power, binary cross entropy and products each make a pass over the logits. Here the
matched class ids (``nc``, ultralytics' background, becomes ``-1``) and their IoU go straight to
:func:`focal.varifocal_loss` as the pair ``(ids, scores)``, or to :func:`focal.sigmoid_focal_loss`,
in one fused call each.

ultralytics' conventions, reproduced here, and where they differ from the papers:

- Reduction: ``loss.mean(1).sum()`` over ``(batch, queries, classes)``, i.e. the sum divided by the
  number of queries, then divided by ``max(num_gts, 1) / queries``: the sum over the batch divided
  by the number of ground-truth boxes, with the rounding of those two steps (the op's normaliser
  is the number of queries).
- Varifocal loss (Zhang et al. 2021): ``bce(x, q) * (alpha p^gamma (1 - label) + q label)`` with
  ``label`` the one-hot of the matched class, ``q`` its IoU and ``alpha = 0.25``, ``gamma = 1.5``
  (``DETRLoss``'s defaults, where the paper uses 0.75 and 2). The weight is not detached, as in
  the paper. Where a query is matched but its predicted box has IoU 0 with its ground truth, the
  paper (and :func:`focal.varifocal_loss`) counts that class as a negative,
  ``-alpha p^gamma log(1 - p)``; ultralytics' weight is ``q = 0`` there, so the element adds
  nothing. The adapter reproduces that by giving such a query the score ``q`` = the smallest
  normal number of its dtype (2^-126 in float32, 2^-1022 in float64): its term ``q bce(x, q)``
  and its gradient ``q (p - q)`` are that small, lost in the rounding of any loss or gradient
  they are added to.
- Focal loss (Lin et al. 2017), used when the batch has no boxes: the paper's loss with
  ``alpha = 0.25`` and ``gamma = 1.5`` (the paper's default is 2); ``alpha`` is applied only when
  it is > 0.
- Precision: ultralytics computes the varifocal loss in float32 (``.float()``, autocast off) with
  its weight in the logits' dtype; the fused op computes it in float32 for 16-bit and float32
  logits (the weight included) and in float64 for float64 logits; the scores are rounded to the
  logits' dtype, so under bfloat16 autocast each IoU is rounded to bfloat16 (2^-9).

Without focal or varifocal loss (``use_fl=False``) the criterion is left as it is.
"""

from __future__ import annotations

import types
from typing import Any, Dict

import torch
from torch import Tensor
from ultralytics.models.utils.loss import DETRLoss
from ultralytics.nn.tasks import RTDETRDetectionModel

import focal

__all__ = ["use_fused_loss"]


def use_fused_loss(model: Any) -> Any:
    """Compute RT-DETR's classification losses with focal's fused operators.

    Args:
        model: an ``ultralytics.RTDETR`` (the user-facing model: its training builds a new
            network, which is adapted when training starts), an ``RTDETRDetectionModel``, or an
            RT-DETR criterion (``DETRLoss`` / ``RTDETRDetectionLoss``).

    Returns:
        ``model``, adapted in place; adapting it again does nothing more.

    Raises:
        TypeError: ``model`` is none of those.
    """
    if isinstance(model, DETRLoss):
        _adapt_criterion(model)
    elif isinstance(model, RTDETRDetectionModel):
        _adapt_network(model)
    elif isinstance(getattr(model, "model", None), RTDETRDetectionModel) and hasattr(model, "add_callback"):
        _adapt_network(model.model)
        model.add_callback("on_pretrain_routine_end", lambda trainer: _adapt_network(_unwrap(trainer.model)))
    else:
        raise TypeError(
            "use_fused_loss expects an ultralytics RTDETR, an RTDETRDetectionModel or a DETRLoss, got "
            f"{type(model).__name__}"
        )
    return model


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


def _adapt_network(model: RTDETRDetectionModel) -> None:
    if not isinstance(model, RTDETRDetectionModel):
        raise TypeError(f"expected an RTDETRDetectionModel, got {type(model).__name__}")
    if getattr(model, "criterion", None) is not None:
        _adapt_criterion(model.criterion)
    # ultralytics creates the criterion at the first loss (and again whenever it is reset)
    model.init_criterion = lambda: _adapt_criterion(type(model).init_criterion(model))


def _adapt_criterion(criterion: DETRLoss) -> DETRLoss:
    if criterion.fl is not None:
        criterion._get_loss_class = types.MethodType(_loss_class, criterion)
    return criterion


def _loss_class(
    self: DETRLoss, pred_scores: Tensor, targets: Tensor, gt_scores: Tensor, num_gts: int, postfix: str = ""
) -> Dict[str, Tensor]:
    """``DETRLoss._get_loss_class`` as one fused call: ``pred_scores`` (B, Q, C) logits,
    ``targets`` (B, Q) matched class ids with ``nc`` for unmatched queries, ``gt_scores`` (B, Q)
    the IoU of each matched query's box."""
    num_queries = pred_scores.shape[1]
    ids = torch.where(targets == self.nc, -1, targets)
    if num_gts and self.vfl is not None:
        dtype = torch.float64 if pred_scores.dtype == torch.float64 else torch.float32
        scores = gt_scores.to(dtype)
        scores = torch.where((ids >= 0) & (scores == 0), torch.finfo(dtype).tiny, scores)
        loss = focal.varifocal_loss(
            pred_scores, (ids, scores), alpha=float(self.vfl.alpha), gamma=float(self.vfl.gamma), reduction="sum",
            normalizer=num_queries,
        )
    else:
        alpha = float(self.fl.alpha.cpu()) if torch.is_tensor(self.fl.alpha) else float(self.fl.alpha)
        loss = focal.sigmoid_focal_loss(
            pred_scores, ids, alpha=alpha if alpha > 0 else None, gamma=float(self.fl.gamma), reduction="sum",
            normalizer=num_queries,
        )
    loss = loss / (max(num_gts, 1) / num_queries)
    return {f"loss_class{postfix}": loss.squeeze() * self.loss_gain["class"]}
