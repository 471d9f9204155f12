"""bfloat16 and float16 inputs: the float32 kernel's results, rounded once.

The kernel widens half-precision inputs to float32, runs the float32 math, and rounds the loss and
gradient to the input dtype on the way out (its own vectorised round-to-nearest-even for bfloat16).
So for every one of the 65536 bit patterns of a 16-bit dtype, as logits, the results must be bitwise
those of the float32 op on the widened logits, rounded by torch's own conversion: NaN, infinities,
subnormals and ties included. Run for each instruction-set copy by test_cpu_isa.py.
"""

from __future__ import annotations

import pytest
import torch

import focal  # noqa: F401  (loads the operators)
from bitwise import assert_bitwise_equal

OP = torch.ops.focal.sigmoid_focal_loss.default
HALF_DTYPES = [torch.bfloat16, torch.float16]


def every_value(dtype: torch.dtype, cols: int) -> torch.Tensor:
    """All 65536 bit patterns of ``dtype``, laid out as (rows, cols) (the last row padded with zeros)."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    rows = -(-values.numel() // cols)
    padded = torch.zeros(rows * cols, dtype=dtype)
    padded[: values.numel()] = values
    return padded.reshape(rows, cols)


def run_op(logits, targets, weight, gamma, reduction, label_smoothing=0.0, normalizer=None):
    return OP(logits, targets, weight, None, normalizer, 0.25, gamma, label_smoothing, -100, reduction, 1.0, True)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 2.5])
@pytest.mark.parametrize("targets", ["ids", "float", "ids-smoothed"])
@pytest.mark.parametrize("cols", [37])  # full vectors (pairs of them too) and a tail in every row
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_every_half_precision_logit_is_the_float32_result_rounded_once(dtype, cols, targets, gamma):
    x = every_value(dtype, cols)
    rows = x.shape[0]
    g = torch.Generator().manual_seed(cols)
    smoothing = 0.0
    if targets == "float":
        t = torch.rand(rows, cols, generator=g).round().to(dtype)  # hard 0/1 ...
        t[::3] = torch.rand(t[::3].shape, generator=g).to(dtype)  # ... and soft
        t_float = t.float()
    else:
        t = t_float = torch.randint(-1, cols, (rows,), generator=g)  # background and every lane
        smoothing = 0.125 if targets == "ids-smoothed" else 0.0
    # A weight of 1 keeps every subnormal in the outputs; 0.75 exercises the weighted path.
    for weight in (None, torch.full((cols,), 0.75, dtype=dtype)):
        w_float = None if weight is None else weight.float()
        loss, grad = run_op(x, t, weight, gamma, "none", smoothing)
        loss_f, grad_f = run_op(x.float(), t_float, w_float, gamma, "none", smoothing)
        assert_bitwise_equal(loss, loss_f.to(dtype), f"loss, weight={weight is not None}")
        assert_bitwise_equal(grad, grad_f.to(dtype), f"grad, weight={weight is not None}")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_reduced_loss_is_the_float32_sum(dtype):
    """The sum is accumulated in float32 lanes from the same float32 values, then in float64."""
    x = every_value(dtype, 64)
    # Logits near the dtype's maximum have losses whose float32 sum overflows (in both paths).
    finite = torch.where(x.float().abs() <= 1e4, x, torch.zeros((), dtype=dtype))
    ids = torch.randint(-1, 64, (finite.shape[0],), generator=torch.Generator().manual_seed(0))
    norm = torch.tensor(17.0)
    loss, _ = run_op(finite, ids, None, 2.0, "sum", normalizer=norm)
    loss_f, _ = run_op(finite.float(), ids, None, 2.0, "sum", normalizer=norm)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.equal(loss, loss_f)


@pytest.mark.parametrize("cols", [16, 37])
def test_bfloat16_rounding_ties_go_to_even(cols):
    """Gradients that land exactly halfway between two bfloat16 values round to the even one.

    With gamma = 0, alpha off and class ids, the gradient at x = 0 is sigmoid(0) * scale = 0.5 * scale
    for a negative and (sigmoid(0) - 1) * scale = -0.5 * scale for the positive; scales of
    1 + k * 2^-8 put those halfway between bfloat16 values for odd k. 37 columns include a tail.
    """
    x = torch.zeros(2, cols, dtype=torch.bfloat16)
    ids = torch.tensor([-1, cols - 1])  # a background row; a row whose positive is in the tail
    for k in range(1, 16):
        scale = 1.0 + k * 2.0**-8
        _, grad = OP(x, ids, None, None, None, -1.0, 0.0, 0.0, -100, "sum", scale, True)
        half = torch.tensor(0.5 * scale, dtype=torch.float32).to(torch.bfloat16).item()
        want = torch.full((2, cols), half, dtype=torch.bfloat16)
        want[1, cols - 1] = -half
        assert torch.equal(grad, want), (k, grad, want)
