"""Argument sets of the family's elementwise ops (FL*, QFL, VFL) for the CUDA tests that compare one
backend with another and with focal.reference: the same call on any op namespace (torch.ops.focal,
the emulated torch.ops.focal_emu) and its float64 reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cuda_cases import make_targets
from focal import reference

IGNORE = -100


@dataclass
class FamilyCall:
    """One call: ``loss`` names the op; ``param`` its hyper-parameter (FL*: (gamma, beta); QFL: beta;
    VFL: gamma); ``targets`` and ``scores`` as the op takes them."""

    loss: str
    x: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor | None
    param: object
    alpha: float = -1.0
    smoothing: float = 0.0
    weight: torch.Tensor | None = None
    row_weight: torch.Tensor | None = None
    normalizer: torch.Tensor | None = None
    reduction: str = "none"
    scale: float = 1.0

    def run(self, ops):
        """(loss, grad) of the op in namespace ``ops``."""
        common = (self.weight, self.row_weight, self.normalizer)
        tail = (IGNORE, self.reduction, self.scale, True)
        if self.loss == "star":
            gamma, beta = self.param
            return ops.sigmoid_focal_loss_star(self.x, self.targets, *common, self.alpha, gamma, beta, self.smoothing,
                                               *tail)
        if self.loss == "quality":
            return ops.quality_focal_loss(self.x, self.targets, self.scores, *common, self.param, *tail)
        return ops.varifocal_loss(self.x, self.targets, self.scores, *common, self.alpha, self.param, *tail)

    def expected(self, norm_value: float | None):
        """Loss and d(loss)/d(logits) (of loss.sum() for "none") by focal.reference in float64."""
        xd = self.x.double().requires_grad_()
        t = self.targets.double() if self.targets.is_floating_point() else self.targets
        if self.scores is not None:
            t = (t, self.scores.double())
        w = None if self.weight is None else self.weight.double()
        if self.row_weight is not None:
            rw = self.row_weight.double().unsqueeze(-1)
            w = rw if w is None else w * rw
        kw = dict(weight=w, normalizer=norm_value, ignore_index=IGNORE)
        if self.loss == "star":
            gamma, beta = self.param
            alpha = None if self.alpha < 0 else self.alpha
            loss = reference.sigmoid_focal_loss_star(xd, t, gamma, beta, alpha, self.reduction,
                                                     label_smoothing=self.smoothing, **kw)
        elif self.loss == "quality":
            loss = reference.quality_focal_loss(xd, t, self.param, self.reduction, **kw)
        else:
            loss = reference.varifocal_loss(xd, t, self.alpha, self.param, self.reduction, **kw)
        loss = loss * self.scale
        (grad,) = torch.autograd.grad(loss.sum(), xd)
        return loss.detach(), grad


# loss -> (target kinds, hyper-parameters): the paper's settings and the fast and general exponents
FAMILY = {
    "star": (["hard", "soft", "ids", "ids_smoothed"], [(2.0, 1.0), (4.0, 0.0), (1.0, 0.0)]),
    "quality": (["soft", "pair"], [2.0, 1.0, 0.0, 1.5]),
    "varifocal": (["soft_with_zeros", "pair"], [2.0, 1.0, 0.0, 1.5]),
}


def family_targets(loss: str, kind: str, x: torch.Tensor, g: torch.Generator):
    """(targets, scores, label smoothing) of a target kind."""
    if kind == "pair":
        ids = make_targets("ids", x, g, IGNORE)
        scores = torch.rand(ids.shape, generator=g, dtype=torch.float64)
        scores.view(-1)[1::5] = 0.0  # positives of quality 0 (a missed box), background rows' unread scores
        return ids, scores.to(x.dtype), 0.0
    if kind == "soft_with_zeros":
        t = make_targets("soft", x, g)
        keep = torch.rand(x.shape, generator=g) < 0.3
        return torch.where(keep, t, torch.zeros_like(t)), None, 0.0
    if kind == "ids_smoothed":
        return make_targets("ids", x, g, IGNORE), None, 0.1
    return make_targets(kind, x, g, IGNORE), None, 0.1 if kind == "soft" and loss == "star" else 0.0
