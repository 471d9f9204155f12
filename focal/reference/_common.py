"""What the references share: target expansion, the alpha factor, guarded powers, exact sigmoids and
softplus, and the reductions.

The conventions are those of :func:`focal.sigmoid_focal_loss` (see its docstring):

* class ids ``c`` in ``[0, C)`` mark a positive for class ``c``, ``background_index`` (``-1`` by default)
  is background (negative for every class) and ``ignore_index`` marks a row that contributes neither
  loss nor gradient;
* ``alpha`` may be a ``(C,)`` tensor, one value per class;
* ``reduction="mean"`` divides by the number of elements that are not ignored; with class ids a batch
  whose rows are all ignored gives 0, while dense float targets follow ``torch.mean`` (NaN when empty);
* a ``normalizer`` (a number, or a one-element tensor on any device) divides the loss before the
  reduction.
"""

from __future__ import annotations

import torch

__all__ = [
    "alpha_t",
    "as_divisor",
    "element_count",
    "expand_targets",
    "is_class_ids",
    "logistic",
    "one_hot_rows",
    "power",
    "reduce_elements",
    "reduce_loss",
]


def is_class_ids(targets: torch.Tensor) -> bool:
    """Whether ``targets`` holds integer class ids (not float or bool targets)."""
    return not (targets.is_floating_point() or targets.dtype == torch.bool)


def one_hot_rows(
    ids: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype, background_index: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(one_hot, kept)``: ``one_hot`` of shape ``ids.shape + (num_classes,)`` in ``dtype``, with an
    all-zero row for ``background_index`` and for ``ignore_index``; ``kept`` a bool tensor of ``ids``'s
    shape, False where the id is ``ignore_index``."""
    ids = ids.long()
    kept = ids != ignore_index
    ids = torch.where(kept & (ids != background_index), ids, torch.full_like(ids, -1))
    classes = torch.arange(num_classes, device=ids.device)
    return (ids.unsqueeze(-1) == classes).to(dtype), kept


def expand_targets(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    background_index: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(soft_targets, keep)``, both shaped like ``inputs`` and in its dtype.

    Float targets pass through. Integer class ids of shape ``inputs.shape[:-1]`` become one-hot rows
    (``background_index`` is an all-zero background row); rows whose id equals ``ignore_index`` get
    ``keep == 0``.
    Label smoothing ``eps`` then maps every binary target ``t`` to ``t * (1 - eps) + eps / 2``.
    """
    if not is_class_ids(targets):
        soft = targets.to(inputs.dtype)
        keep = torch.ones_like(inputs)
    else:
        soft, kept = one_hot_rows(targets, inputs.shape[-1], ignore_index, inputs.dtype, background_index)
        keep = kept.unsqueeze(-1).expand_as(inputs).to(inputs.dtype)
    if label_smoothing:
        soft = soft * (1.0 - label_smoothing) + label_smoothing / 2.0
    return soft, keep


def alpha_t(t: torch.Tensor, alpha: float | torch.Tensor | None) -> torch.Tensor | float:
    """The binary alpha factor ``alpha t + (1 - alpha)(1 - t)``; 1 when ``alpha`` is None or negative.
    A ``(C,)`` tensor ``alpha`` gives each class (the last dimension of ``t``) its own."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(t.dtype)
    elif alpha is None or alpha < 0:
        return 1.0
    return alpha * t + (1.0 - alpha) * (1.0 - t)


def power(base: torch.Tensor, exponent: float) -> torch.Tensor:
    """``base ** exponent`` for ``base >= 0``, whose gradient is 0 where ``base`` is 0.

    Autograd differentiates ``base ** exponent`` as ``exponent * base ** (exponent - 1)``, which is
    infinite at ``base == 0`` for an exponent below 1; the chain rule then multiplies it by the zero
    derivative of a saturated probability and gives NaN. The true derivative of the losses there is 0.
    """
    if exponent == 0:
        return torch.ones_like(base)
    nonzero = base != 0  # NaN stays NaN
    safe = torch.where(nonzero, base, torch.ones_like(base))
    return torch.where(nonzero, safe**exponent, torch.zeros_like(base))


def logistic(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sigmoid(z), sigmoid(-z), softplus(z), softplus(-z))``, each to full relative precision for
    every ``z`` (subnormal results included), and so are their derivatives under autograd, to any
    order; from one ``e = exp(-|z|)`` in (0, 1]: ``sigmoid(|z|) = 1 / (1 + e)``, ``sigmoid(-|z|) =
    e / (1 + e)``, ``softplus(z) = max(z, 0) + log1p(e)``.

    What the torch functions lack (float64): ``torch.sigmoid`` loses its precision below ``z = -709``
    (0 at ``z = -720``, where the exact value is a subnormal, 1.2e-313) and its backward ``y (1 - y)``
    cancels (0 from ``z = 37``, where the derivative is ``exp(-z)``); ``F.softplus`` returns ``z`` itself
    above its threshold (20), off by ``log1p(exp(-z))``: 26 ulps at ``z = 30``; ``logaddexp(z, 0)`` has
    the value but its backward ``1 / (1 + exp(-z))`` is 0 below ``z = -709``.
    """
    negative = z < 0
    # where, not abs() or clamp(): the chosen branch keeps the derivative right at z = 0, where
    # abs() has 0
    e = torch.exp(torch.where(negative, z, -z))
    inv = 1 / (1 + e)
    small = e * inv
    log1p_e = torch.log1p(e)
    zero = torch.zeros_like(z)
    return (
        torch.where(negative, small, inv),
        torch.where(negative, inv, small),
        torch.where(negative, zero, z) + log1p_e,
        torch.where(negative, -z, zero) + log1p_e,
    )


def element_count(keep: torch.Tensor, class_ids: bool) -> torch.Tensor:
    """The denominator of ``reduction="mean"``: the number of elements that are not ignored.

    With class ids a batch whose rows are all ignored contributes 0 (the denominator is at least 1);
    dense float targets follow ``torch.mean``.
    """
    count = keep.sum()
    return count.clamp(min=1) if class_ids else count


def as_divisor(normalizer, like: torch.Tensor):
    """A normaliser as the op takes it: a number, or any one-element tensor on any device."""
    if isinstance(normalizer, torch.Tensor):
        return normalizer.to(like.device).reshape(())
    return normalizer


def reduce_loss(
    loss: torch.Tensor,
    reduction: str,
    normalizer: float | torch.Tensor | None,
    mean_denominator: torch.Tensor,
) -> torch.Tensor:
    """Divide by the normaliser (if any), then reduce: ``"none"``, ``"sum"``, or ``"mean"``, the sum
    divided by ``mean_denominator``."""
    if normalizer is not None:
        loss = loss / as_divisor(normalizer, loss)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / mean_denominator
    raise ValueError(f"unknown reduction {reduction!r}")


def reduce_elements(
    loss: torch.Tensor,
    keep: torch.Tensor,
    class_ids: bool,
    reduction: str,
    normalizer: float | torch.Tensor | None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The common end of the elementwise losses: times ``weight`` (if any), zero where ``keep`` is 0,
    then :func:`reduce_loss` with the mean over the elements that are not ignored."""
    if weight is not None:
        loss = loss * weight
    loss = loss * keep
    return reduce_loss(loss, reduction, normalizer, element_count(keep, class_ids))
