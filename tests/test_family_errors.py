"""Bad arguments to the sigmoid focal loss, FL*, QFL and VFL: each is refused with ValueError or
TypeError and a message that names the argument, before any kernel runs (or by the kernel's own
check, for what only the data shows). The focal loss's own arguments are in test_errors.py."""

from __future__ import annotations

import re

import pytest
import torch

import focal

N, C = 4, 3
FUNCTIONS = {
    "focal": focal.sigmoid_focal_loss,
    "star": focal.sigmoid_focal_loss_star,
    "qfl": focal.quality_focal_loss,
    "vfl": focal.varifocal_loss,
}
QUALITY = ["qfl", "vfl"]


def _x(dtype=torch.float32):
    return torch.randn(N, C, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _ids():
    return torch.tensor([0, 2, -1, 1])


def _targets(name):
    """Valid targets: class ids for FL*, the pair (ids, scores) for the quality losses."""
    return (_ids(), torch.rand(N)) if name in QUALITY else _ids()


def call(name, **overrides):
    kwargs = dict(inputs=_x(), targets=_targets(name))
    kwargs.update(overrides)
    return FUNCTIONS[name](**kwargs)


def test_valid_call_runs():
    """The baseline every test below changes one argument of."""
    for name in FUNCTIONS:
        assert call(name).shape == (N, C)


# --- hyper-parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("inf"), float("nan")])
def test_star_gamma_must_be_positive(gamma):
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        call("star", gamma=gamma)


@pytest.mark.parametrize("beta", [float("inf"), float("nan")])
def test_star_beta_must_be_finite(beta):
    with pytest.raises(ValueError, match="beta must be a finite number"):
        call("star", beta=beta)


@pytest.mark.parametrize("alpha", [1.5, -0.5, -2.0])
def test_star_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=r"alpha must be"):
        call("star", alpha=alpha)


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.5])
def test_star_label_smoothing_out_of_range(label_smoothing):
    with pytest.raises(ValueError, match="label_smoothing must be"):
        call("star", label_smoothing=label_smoothing)


@pytest.mark.parametrize("beta", [-1.0, -1e-9, float("inf")])
def test_qfl_beta_must_be_non_negative(beta):
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        call("qfl", beta=beta)


@pytest.mark.parametrize("name,value", [("alpha", -0.25), ("gamma", -1.0), ("gamma", float("nan"))])
def test_vfl_alpha_and_gamma_must_be_non_negative(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
        call("vfl", **{name: value})


@pytest.mark.parametrize("name,argument", [("star", "gamma"), ("star", "beta"), ("star", "label_smoothing"),
                                           ("qfl", "beta"), ("vfl", "alpha"), ("vfl", "gamma")])
@pytest.mark.parametrize("value", ["2", None, True, torch.tensor([1.0, 2.0])], ids=["str", "None", "bool", "tensor"])
def test_hyperparameter_of_wrong_type(name, argument, value):
    if argument == "alpha" and isinstance(value, torch.Tensor):  # one alpha per class: a (C,) tensor
        with pytest.raises(ValueError, match=r"alpha as a tensor must have shape \(\d+,\)"):
            call(name, **{argument: value})
        return
    with pytest.raises(TypeError, match=f"{argument} must be a real number"):
        call(name, **{argument: value})


# --- reduction, ignore_index, normaliser, weight -------------------------------------------------


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("reduction", ["avg", "", "None", "SUM"])
def test_unknown_reduction(name, reduction):
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'mean', 'sum'\)"):
        call(name, reduction=reduction)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_reduction_of_wrong_type(name):
    with pytest.raises(TypeError, match="reduction must be a string"):
        call(name, reduction=None)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("ignore_index", [-1, 0, C - 1])
def test_ignore_index_colliding_with_a_class(name, ignore_index):
    with pytest.raises(ValueError, match=f"ignore_index={ignore_index} collides with a class id"):
        call(name, ignore_index=ignore_index)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("ignore_index", [1.5, "x", True])
def test_ignore_index_of_wrong_type(name, ignore_index):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        call(name, ignore_index=ignore_index)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("bad_id", [C, C + 10, -2, -99, -101])
def test_class_id_out_of_range_on_cpu(name, bad_id):
    ids = _ids()
    ids[1] = bad_id
    targets = (ids, torch.rand(N)) if name in QUALITY else ids
    message = rf"class id {bad_id} at row 1 is out of range: expected a class in \[0, {C}\)"
    for reduction in ("none", "sum", "mean"):
        with pytest.raises(ValueError, match=message):
            call(name, targets=targets, reduction=reduction)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("normalizer", [2.0, torch.tensor(2.0)], ids=["number", "tensor"])
def test_normalizer_with_mean(name, normalizer):
    with pytest.raises(ValueError, match="normalizer divides the summed loss: use it with reduction='sum'"):
        call(name, reduction="mean", normalizer=normalizer)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("normalizer", [0.0, -1.0, float("inf"), float("nan")])
def test_non_positive_normalizer(name, normalizer):
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        call(name, reduction="sum", normalizer=normalizer)
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        call(name, reduction="sum", normalizer=torch.tensor(normalizer))  # checked by the CPU kernel


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_normalizer_of_several_elements_or_requiring_grad(name):
    with pytest.raises(ValueError, match=r"normalizer must be a number or a one-element tensor, got shape \(2,\)"):
        call(name, reduction="sum", normalizer=torch.ones(2))
    with pytest.raises(ValueError, match="normalizer must not require grad"):
        call(name, reduction="sum", normalizer=torch.tensor(2.0, requires_grad=True))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_weight_requiring_grad(name):
    with pytest.raises(ValueError, match="gradients with respect to weight are not supported"):
        call(name, weight=torch.ones(C, requires_grad=True))


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("shape", [(C + 1,), (N, 1, C), (2, C), (N + 1, 1)], ids=str)
def test_weight_that_does_not_broadcast(name, shape):
    with pytest.raises(ValueError, match=re.escape(f"weight of shape {shape} cannot be broadcast to inputs")):
        call(name, weight=torch.ones(shape))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_weight_of_wrong_type(name):
    with pytest.raises(TypeError, match="weight must be a floating point tensor"):
        call(name, weight=torch.ones(C, dtype=torch.long))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        call(name, weight=[1.0, 2.0, 3.0])


# --- inputs and targets --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_inputs_of_wrong_type(name):
    with pytest.raises(TypeError, match="inputs must be float32, float64, float16 or bfloat16 logits"):
        call(name, inputs=torch.zeros(N, C, dtype=torch.int64))
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        call(name, inputs=[[0.0] * C] * N)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("shape", [(N, C + 1), (C, N), (N * C,), (1, C), (N, C, 1)], ids=str)
def test_dense_targets_of_wrong_shape(name, shape):
    with pytest.raises(ValueError, match=re.escape(f"float targets must have the shape of inputs ({N}, {C})")):
        call(name, targets=torch.zeros(shape))


def test_star_class_ids_of_wrong_shape():
    message = re.escape(f"integer class-id targets must have shape inputs.shape[:-1] = ({N},)")
    with pytest.raises(ValueError, match=message):
        call("star", targets=torch.zeros(N + 1, dtype=torch.long))


@pytest.mark.parametrize("name", QUALITY)
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8])
def test_quality_losses_refuse_ids_without_scores(name, dtype):
    with pytest.raises(ValueError, match="quality targets need scores: pass dense float targets .* or the pair"):
        call(name, targets=_ids().clamp(min=0).to(dtype))


@pytest.mark.parametrize("name", QUALITY)
@pytest.mark.parametrize("length", [0, 1, 3])
def test_pair_of_wrong_length(name, length):
    pair = (_ids(), torch.rand(N), torch.rand(N))[:length]
    with pytest.raises(ValueError, match=f"quality targets as a pair are \\(ids, scores\\), got {length} items"):
        call(name, targets=pair)
    with pytest.raises(ValueError, match=f"got {length} items"):
        call(name, targets=list(pair))


@pytest.mark.parametrize("name", QUALITY)
def test_pair_ids_must_be_integers(name):
    with pytest.raises(TypeError, match="the ids of \\(ids, scores\\) must be integer class ids, got torch.float32"):
        call(name, targets=(_ids().float(), torch.rand(N)))


@pytest.mark.parametrize("name", QUALITY)
def test_pair_scores_must_be_floats(name):
    with pytest.raises(TypeError, match="the scores of \\(ids, scores\\) must be floating point, got torch.int64"):
        call(name, targets=(_ids(), torch.ones(N, dtype=torch.long)))


@pytest.mark.parametrize("name", QUALITY)
@pytest.mark.parametrize("shape", [(N + 1,), (N, 1), (), (N, C)], ids=str)
def test_pair_scores_of_wrong_shape(name, shape):
    with pytest.raises(ValueError, match=re.escape(f"scores must have the shape of ids ({N},), got {shape}")):
        call(name, targets=(_ids(), torch.rand(shape)))


@pytest.mark.parametrize("name", QUALITY)
def test_pair_ids_of_wrong_shape(name):
    with pytest.raises(ValueError, match=re.escape(f"ids must have shape inputs.shape[:-1] = ({N},)")):
        call(name, targets=(torch.zeros(N + 1, dtype=torch.long), torch.rand(N + 1)))


@pytest.mark.parametrize("name", QUALITY)
@pytest.mark.parametrize("part", ["ids", "scores"])
def test_pair_parts_must_be_tensors(name, part):
    ids, scores = _ids(), torch.rand(N)
    pair = (ids.tolist(), scores) if part == "ids" else (ids, scores.tolist())
    with pytest.raises(TypeError, match=f"{part} must be a torch.Tensor"):
        call(name, targets=pair)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_targets_requiring_grad(name):
    if name not in QUALITY:
        targets = torch.rand(N, C, requires_grad=True)
        what = "targets"
    else:
        targets, what = (_ids(), torch.rand(N, requires_grad=True)), "scores"
    with pytest.raises(ValueError, match=f"gradients with respect to {what} are not supported"):
        call(name, targets=targets)


@pytest.mark.parametrize("name", QUALITY)
def test_star_only_arguments_are_not_taken(name):
    with pytest.raises(TypeError, match="label_smoothing"):
        call(name, label_smoothing=0.1)


# --- devices: "meta" stands in for a second device -----------------------------------------------


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_tensors_on_another_device(name):
    ids, scores = _ids(), torch.rand(N)
    cases = [
        ("targets", dict(targets=torch.rand(N, C, device="meta"))),
        ("weight", dict(weight=torch.ones(C, device="meta"))),
        ("normalizer", dict(normalizer=torch.tensor(2.0, device="meta"), reduction="sum")),
    ]
    if name not in QUALITY:
        cases.append(("targets", dict(targets=ids.to("meta"))))
    else:
        cases += [("ids", dict(targets=(ids.to("meta"), scores))), ("scores", dict(targets=(ids, scores.to("meta"))))]
    for what, overrides in cases:
        with pytest.raises(ValueError, match=f"{what} is on meta but inputs are on cpu"):
            call(name, **overrides)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_inputs_on_an_unsupported_device(name):
    targets = torch.rand(N, C, device="meta")
    with pytest.raises(RuntimeError, match="focal has no kernel for meta tensors"):
        call(name, inputs=_x().to("meta"), targets=targets)


# --- the raw operators check their own arguments too ---------------------------------------------


def _raw(name, **overrides):
    x = _x()
    common = dict(logits=x, targets=_ids(), weight=None, row_weight=None, normalizer=None)
    if name == "sigmoid_focal_loss_star":
        args = dict(common, alpha=0.25, gamma=2.0, beta=1.0, label_smoothing=0.0)
    elif name == "quality_focal_loss":
        args = dict(logits=x, targets=_ids(), scores=torch.rand(N), weight=None, row_weight=None, normalizer=None,
                    beta=2.0)
    else:
        args = dict(logits=x, targets=_ids(), scores=torch.rand(N), weight=None, row_weight=None, normalizer=None,
                    alpha=0.75, gamma=2.0)
    args.update(ignore_index=-100, reduction="sum", scale=1.0, compute_grad=False)
    args.update(overrides)
    return getattr(torch.ops.focal, name).default(*args.values())


RAW_OPS = ["sigmoid_focal_loss_star", "quality_focal_loss", "varifocal_loss"]


@pytest.mark.parametrize("name", RAW_OPS)
@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (dict(logits=torch.zeros(C, N).t()), ValueError, "logits must be contiguous"),
        (dict(targets=torch.zeros(N + 1, dtype=torch.long)), ValueError, r"must have the shape logits.shape\[:-1\]"),
        (dict(weight=torch.ones(C + 1)), ValueError, "weight must have shape"),
        (dict(normalizer=torch.tensor(0.0)), ValueError, "normalizer must be a finite number > 0"),
        (dict(reduction="avg"), ValueError, "reduction must be 'none', 'mean' or 'sum'"),
        (dict(ignore_index=0), ValueError, "ignore_index 0 collides"),
    ],
    ids=["non-contiguous", "ids-shape", "weight-shape", "normalizer", "reduction", "ignore-index"],
)
def test_raw_op_argument_checks(name, overrides, error, message):
    with pytest.raises(error, match=message):
        _raw(name, **overrides)


@pytest.mark.parametrize("name", ["quality_focal_loss", "varifocal_loss"])
def test_raw_quality_ops_check_their_scores(name):
    with pytest.raises(ValueError, match="scores"):
        _raw(name, scores=torch.rand(N + 1))
    with pytest.raises((ValueError, RuntimeError), match="scores"):
        _raw(name, scores=None)  # class ids without scores


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_raw_star_refuses_non_positive_gamma(gamma):
    with pytest.raises((ValueError, RuntimeError), match="gamma"):
        _raw("sigmoid_focal_loss_star", gamma=gamma)
