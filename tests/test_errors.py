"""Bad arguments to the sigmoid focal loss: each is refused with the right exception type and a message
naming the problem. What the four losses of the family share (reduction, ignore_index, class ids,
normaliser with "mean", devices) is tested once for all of them in test_family_errors.py."""

from __future__ import annotations

import math
import re

import pytest
import torch

import focal

N, C = 4, 3


def _x(dtype=torch.float32):
    return torch.randn(N, C, dtype=dtype)


def _t():
    return torch.randint(0, 2, (N, C)).float()


def call(**overrides):
    kwargs = dict(inputs=_x(), targets=_t())
    kwargs.update(overrides)
    return focal.sigmoid_focal_loss(**kwargs)


# --- inputs and targets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets",
    [torch.zeros(N, C + 1), torch.zeros(C, N), torch.zeros(N * C), torch.zeros(1, C), torch.zeros(N, C, 1)],
    ids=["more-classes", "transposed", "flat", "broadcastable", "extra-dim"],
)
def test_float_targets_shape_mismatch(targets):
    with pytest.raises(ValueError, match=r"float targets must have the shape of inputs \(4, 3\)"):
        call(targets=targets)


@pytest.mark.parametrize(
    "targets",
    [torch.zeros(N + 1, dtype=torch.long), torch.zeros(N, C, dtype=torch.long), torch.zeros(1, dtype=torch.long),
     torch.zeros((), dtype=torch.long), torch.zeros(N, 1, dtype=torch.long)],
    ids=["more-rows", "one-hot-as-int", "one-row", "scalar", "trailing-1"],
)
def test_class_id_targets_shape_mismatch(targets):
    with pytest.raises(ValueError, match=r"class-id targets must have shape inputs.shape\[:-1\] = \(4,\)"):
        call(targets=targets)


def test_class_id_targets_need_a_class_dimension():
    with pytest.raises(ValueError, match="class-id targets must have shape"):
        focal.sigmoid_focal_loss(torch.tensor(0.5), torch.tensor(0))


@pytest.mark.parametrize(
    "inputs",
    [torch.zeros(N, C, dtype=torch.int64), torch.zeros(N, C, dtype=torch.int32), torch.zeros(N, C, dtype=torch.uint8),
     torch.zeros(N, C, dtype=torch.bool), torch.zeros(N, C, dtype=torch.complex64)],
    ids=lambda t: str(t.dtype),
)
def test_non_float_inputs(inputs):
    with pytest.raises(TypeError, match=r"inputs must be float32, float64, float16 or bfloat16 logits, got torch\.\w+"):
        call(inputs=inputs)


@pytest.mark.parametrize("inputs", [[[0.0] * C] * N, 0.5, None, "logits"], ids=["list", "float", "None", "str"])
def test_non_tensor_inputs(inputs):
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor, got"):
        call(inputs=inputs)


@pytest.mark.parametrize("targets", [[[0.0] * C] * N, 1, None], ids=["list", "int", "None"])
def test_non_tensor_targets(targets):
    with pytest.raises(TypeError, match="targets must be a torch.Tensor, got"):
        call(targets=targets)


def test_complex_targets():
    with pytest.raises(TypeError, match="targets must be float .* or integer class ids, got torch.complex64"):
        call(targets=torch.zeros(N, C, dtype=torch.complex64))


# --- hyper-parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.5, -0.5, -2.0, 1.0000001, math.inf, math.nan])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], or None / -1 for no weighting"):
        call(alpha=alpha)


@pytest.mark.parametrize("alpha", ["0.25", True, [0.25, 0.5]], ids=["str", "bool", "list"])
def test_alpha_wrong_type(alpha):
    with pytest.raises(TypeError, match="alpha must be a real number"):
        call(alpha=alpha)


def test_alpha_tensor_of_no_class_dimension():
    """A 0-dim tensor is not a number here: alpha as a tensor is one value per class."""
    with pytest.raises(ValueError, match=r"alpha as a tensor must have shape \(\d+,\)"):
        call(alpha=torch.tensor(0.25))


@pytest.mark.parametrize("gamma", [-1.0, -1e-9, math.nan, math.inf, -math.inf])
def test_gamma_negative_or_not_finite(gamma):
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        call(gamma=gamma)


@pytest.mark.parametrize("gamma", ["2", None, False])
def test_gamma_wrong_type(gamma):
    with pytest.raises(TypeError, match="gamma must be a real number"):
        call(gamma=gamma)


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.5, math.nan, math.inf])
def test_label_smoothing_out_of_range(label_smoothing):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        call(label_smoothing=label_smoothing)


def test_label_smoothing_wrong_type():
    with pytest.raises(TypeError, match="label_smoothing must be a real number"):
        call(label_smoothing="0.1")


# --- normalizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("normalizer", [0, 0.0, -1, -1.0, math.nan, math.inf])
def test_non_positive_normalizer(normalizer):
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        call(normalizer=normalizer, reduction="sum")


@pytest.mark.parametrize(
    "normalizer",
    [torch.tensor(0.0), torch.tensor(0), torch.tensor(-3.0), torch.tensor([-1]), torch.tensor(math.nan),
     torch.tensor(math.inf)],
    ids=["zero", "int-zero", "negative", "negative-1elem", "nan", "inf"],
)
def test_non_positive_cpu_tensor_normalizer(normalizer):
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        call(normalizer=normalizer, reduction="sum")


def test_normalizer_with_several_elements():
    with pytest.raises(ValueError, match=r"normalizer must be a number or a one-element tensor, got shape \(2,\)"):
        call(normalizer=torch.tensor([1.0, 2.0]), reduction="sum")


@pytest.mark.parametrize("normalizer", [torch.tensor(True), torch.tensor(1 + 1j)], ids=["bool", "complex"])
def test_normalizer_wrong_tensor_dtype(normalizer):
    with pytest.raises(TypeError, match="normalizer must be a real number tensor"):
        call(normalizer=normalizer, reduction="sum")


@pytest.mark.parametrize("normalizer", ["4", True], ids=["str", "bool"])
def test_normalizer_wrong_type(normalizer):
    with pytest.raises(TypeError, match="normalizer must be a real number"):
        call(normalizer=normalizer, reduction="sum")


def test_normalizer_requiring_grad():
    with pytest.raises(ValueError, match=r"normalizer must not require grad \(detach it\)"):
        call(normalizer=torch.tensor(2.0, requires_grad=True), reduction="sum")


# --- weight -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(C + 1,), (N,), (N, 1, 1), (2, C), (N, C, 1), (1, 1, C)],
    ids=["classes+1", "rows-only", "extra-dims", "wrong-rows", "trailing-1", "leading-ones-too-many"],
)
def test_wrong_weight_shape(shape):
    message = re.escape(f"weight of shape {tuple(shape)} cannot be broadcast to inputs of shape (4, 3)")
    with pytest.raises(ValueError, match=message):
        call(weight=torch.ones(shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_weight_wrong_dtype(dtype):
    with pytest.raises(TypeError, match="weight must be a floating point tensor"):
        call(weight=torch.ones(C, dtype=dtype))


def test_weight_not_a_tensor():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        call(weight=[1.0] * C)


# --- the raw operator checks its own arguments too ----------------------------------------------

OP = torch.ops.focal.sigmoid_focal_loss.default


def _op_args(**overrides):
    args = dict(
        logits=_x(), targets=_t(), weight=None, row_weight=None, normalizer=None, alpha=0.25, gamma=2.0,
        label_smoothing=0.0, ignore_index=-100, reduction="sum", scale=1.0, compute_grad=False,
    )
    args.update(overrides)
    return tuple(args.values())


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (dict(logits=torch.zeros(C, N).t()), ValueError, "logits must be contiguous"),
        (dict(logits=torch.zeros(N, C, dtype=torch.int32)), TypeError, "logits must be float32, float64, float16 or bfloat16"),
        (dict(targets=torch.zeros(N, C, dtype=torch.float64)), TypeError, "float targets must have the logits' dtype"),
        (dict(targets=torch.zeros(N, C + 1)), ValueError, "float targets must have the logits' shape"),
        (dict(targets=torch.zeros(N, dtype=torch.int32)), TypeError, "class-id targets must be int64"),
        (dict(targets=torch.zeros(N + 1, dtype=torch.long)), ValueError, r"class-id targets must have the shape logits.shape\[:-1\]"),
        (dict(targets=torch.zeros(N, 2, dtype=torch.long)[:, 0]), ValueError, "targets must be contiguous"),
        (dict(weight=torch.ones(C + 1)), ValueError, "weight must have shape"),
        (dict(weight=torch.ones(C, dtype=torch.float64)), TypeError, "weight must have the logits' dtype"),
        (dict(row_weight=torch.ones(N + 1)), ValueError, r"row_weight must have the shape logits.shape\[:-1\]"),
        (dict(normalizer=torch.ones(2)), ValueError, "normalizer must have one element"),
        (dict(normalizer=torch.tensor(True)), TypeError, "normalizer must be a real number tensor"),
        (dict(normalizer=torch.tensor(0.0)), ValueError, "normalizer must be a finite number > 0"),
        (dict(reduction="avg"), ValueError, "reduction must be 'none', 'mean' or 'sum'"),
        (dict(targets=torch.zeros(N, dtype=torch.long), ignore_index=0), ValueError, "ignore_index 0 collides"),
        (dict(targets=torch.zeros(N, dtype=torch.long), ignore_index=-1), ValueError, "ignore_index -1 collides"),
    ],
)
def test_raw_op_argument_checks(overrides, error, message):
    with pytest.raises(error, match=message):
        OP(*_op_args(**overrides))
