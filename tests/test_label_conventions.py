"""The label conventions of the detection frameworks: ``background_index`` (mmdetection, detectron2 and
ultralytics mark background as class ``C``) and ``alpha`` as a ``(C,)`` tensor, one per class, for every
loss of the family that takes them, against the reference and through every transform the other
arguments go through.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import focal
from family_cases import (
    FOCAL, LOSSES, QFL, SHAPE, STAR, VFL, assert_close, cast_targets, class_ids, loss_and_grad, logits,
)

ALPHA_LOSSES = [FOCAL, STAR, VFL]  # QFL takes no alpha
CLASSES = SHAPE[-1]
REDUCTIONS = ["none", "sum", "mean"]


def ids_with_background(background_index: int, ignore_index: int = -100, shape=SHAPE):
    """Every kind of row: each class, background (marked ``background_index``) and ignored, in turn."""
    return class_ids("cpu", shape, ignore_index, background_index)


def targets_of(loss, ids, seed=4):
    """The loss's class-id targets: the ids, or (ids, scores) for the quality losses."""
    if loss in (QFL, VFL):
        scores = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return ids, scores
    return ids


def per_class_alpha(dtype=torch.float64, classes=CLASSES):
    """Distinct values in [0, 1], both ends included."""
    return torch.linspace(0.0, 1.0, classes, dtype=dtype).flip(0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_background_marked_c_is_background_marked_minus_one(loss, reduction):
    """mmdetection's labels (background = C) give exactly the loss and gradient of ours (-1)."""
    x = logits("cpu").float()
    ours = cast_targets(targets_of(loss, ids_with_background(-1)), torch.float32)
    theirs = cast_targets(targets_of(loss, ids_with_background(CLASSES)), torch.float32)
    want = loss_and_grad(loss.fused, x, ours, reduction=reduction, **loss.default)
    got = loss_and_grad(loss.fused, x, theirs, reduction=reduction, background_index=CLASSES, **loss.default)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_detectron2_labels_ignore_minus_one_and_background_c(loss):
    """detectron2's RetinaNet: -1 ignored, C background; the same as ignore_index=-100 with -1 background."""
    x = logits("cpu")
    ours = targets_of(loss, ids_with_background(-1, -100))
    theirs = targets_of(loss, ids_with_background(CLASSES, -1))
    want = loss_and_grad(loss.fused, x, ours, reduction="sum", **loss.default)
    got = loss_and_grad(loss.fused, x, theirs, reduction="sum", background_index=CLASSES, ignore_index=-1,
                        **loss.default)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("background_index", [-1, CLASSES, 255, -7])
def test_any_background_index_matches_the_reference(background_index):
    x = logits("cpu")
    ids = ids_with_background(background_index)
    for loss in LOSSES:
        targets = targets_of(loss, ids)
        got = loss_and_grad(loss.fused, x, targets, reduction="none", background_index=background_index,
                            **loss.default)
        want = loss_and_grad(loss.reference, x, targets, reduction="none", background_index=background_index,
                             **loss.default)
        assert_close(got[0], want[0], 1e-12, 1e-300, f"{loss} loss")
        assert_close(got[1], want[1], 1e-12, 1e-300, f"{loss} grad")


@pytest.mark.parametrize("loss", ALPHA_LOSSES, ids=str)
def test_a_constant_alpha_tensor_is_the_number_bit_for_bit(loss):
    """Elementwise the same bits; a reduced loss also, but for the order of a float-target sum."""
    value = loss.default["alpha"]
    hyper = {k: v for k, v in loss.default.items() if k != "alpha"}
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = logits("cpu").to(dtype)
        for form in (loss.ids_form, loss.dense_form):
            targets = cast_targets(loss.targets[form]("cpu", SHAPE)[0], dtype)
            alpha = torch.full((CLASSES,), value, dtype=torch.float64)
            for reduction in ("none", "sum"):
                want = loss_and_grad(loss.fused, x, targets, alpha=value, reduction=reduction, **hyper)
                got = loss_and_grad(loss.fused, x, targets, alpha=alpha, reduction=reduction, **hyper)
                assert torch.equal(got[1], want[1]), (dtype, form, reduction)
                if reduction == "none" or form == loss.ids_form:
                    assert torch.equal(got[0], want[0]), (dtype, form, reduction)
                else:  # the CPU sums float targets over a block's rows at once, unless alpha is per class
                    assert_close(got[0], want[0], 4 * torch.finfo(got[0].dtype).eps, 0, f"{dtype} {form}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", ALPHA_LOSSES, ids=str)
def test_per_class_alpha_matches_the_reference_in_every_target_form(loss, reduction):
    x = logits("cpu")
    alpha = per_class_alpha()
    hyper = {k: v for k, v in loss.default.items() if k != "alpha"}
    for form, build in loss.targets.items():
        targets, kwargs = build("cpu", SHAPE)
        got = loss_and_grad(loss.fused, x, targets, alpha=alpha, reduction=reduction, **hyper, **kwargs)
        want = loss_and_grad(loss.reference, x, targets, alpha=alpha, reduction=reduction, **hyper, **kwargs)
        assert_close(got[0], want[0], 1e-12, 1e-300, f"{loss}-{form} loss")
        assert_close(got[1], want[1], 1e-12, 1e-300, f"{loss}-{form} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_per_class_alpha_in_reduced_precision(dtype):
    """A float32 alpha with 16-bit or float32 logits: the math in float32, as for a number."""
    x = logits("cpu", shape=(64, 37)).to(dtype)
    ids = ids_with_background(37, shape=(64, 37))
    alpha = torch.rand(37, generator=torch.Generator().manual_seed(5))
    loss, grad = loss_and_grad(focal.sigmoid_focal_loss, x, ids, alpha=alpha, reduction="none", background_index=37)
    want_loss, want_grad = loss_and_grad(
        focal.reference.sigmoid_focal_loss, x.double(), ids, alpha=alpha.double(), reduction="none",
        background_index=37,
    )
    # The precision contract (README): a few float32 ulps (2e-6), 16-bit outputs rounded from them.
    rtol = 2e-6 + (0 if dtype == torch.float32 else torch.finfo(dtype).eps)
    assert_close(loss, want_loss.to(dtype), rtol, 1e-30, "loss")
    assert_close(grad, want_grad.to(dtype), rtol, 1e-30, "grad")


def test_second_derivatives_with_per_class_alpha_and_background_c():
    alpha = per_class_alpha()
    ids = ids_with_background(CLASSES, ignore_index=-1)
    x = logits("cpu").requires_grad_()
    for loss in ALPHA_LOSSES:
        hyper = {k: v for k, v in loss.default.items() if k != "alpha"}
        targets = targets_of(loss, ids)

        def fn(v, loss=loss, targets=targets, hyper=hyper):
            return loss.fused(v, targets, alpha=alpha, reduction="sum", background_index=CLASSES, ignore_index=-1,
                              **hyper)

        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_compile_vmap_and_script_take_the_new_arguments():
    x = logits("cpu").float()
    ids = ids_with_background(CLASSES)
    alpha = per_class_alpha(torch.float32)

    def fn(v):
        return focal.sigmoid_focal_loss(v, ids, alpha, reduction="sum", background_index=CLASSES)

    eager = fn(x)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)
    per_sample = torch.func.vmap(torch.func.grad(lambda v, t: focal.sigmoid_focal_loss(
        v, t, alpha, reduction="sum", background_index=CLASSES)))(x, ids)
    want = torch.stack([torch.func.grad(lambda v, t=t: focal.sigmoid_focal_loss(
        v, t, alpha, reduction="sum", background_index=CLASSES))(xi) for xi, t in zip(x, ids)])
    assert torch.equal(per_sample, want)
    scripted = torch.jit.script(focal.sigmoid_focal_loss)
    assert torch.equal(scripted(x, ids, alpha, 2.0, "sum", None, None, -100, 0.0, CLASSES), eager)
    module = torch.jit.script(focal.SigmoidFocalLoss(alpha=alpha, reduction="sum", background_index=CLASSES))
    assert torch.equal(module(x, ids), eager)


def test_opcheck_with_class_alpha_and_background_index():
    x = logits("cpu").float().requires_grad_()
    ids = ids_with_background(CLASSES)
    alpha = per_class_alpha(torch.float32)
    scores = torch.rand(ids.shape)
    calls = [
        (torch.ops.focal.sigmoid_focal_loss.default,
         (x, ids, None, None, None, -1.0, 2.0, 0.0, -100, "sum", 1.0, True, alpha, CLASSES)),
        (torch.ops.focal.sigmoid_focal_loss_star.default,
         (x, ids, None, None, None, -1.0, 2.0, 1.0, 0.0, -100, "none", 1.0, True, alpha, CLASSES)),
        (torch.ops.focal.quality_focal_loss.default,
         (x, ids, scores, None, None, None, 2.0, -100, "mean", 1.0, True, CLASSES)),
        (torch.ops.focal.varifocal_loss.default,
         (x, ids, scores, None, None, None, -1.0, 2.0, -100, "sum", 1.0, True, alpha, CLASSES)),
    ]
    for op, args in calls:
        opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_the_older_schema_still_calls():
    """Callers of the raw op written before the new arguments get their defaults."""
    x = logits("cpu").float()
    ids = ids_with_background(-1)
    old = torch.ops.focal.sigmoid_focal_loss(x, ids, None, None, None, 0.25, 2.0, 0.0, -100, "sum", 1.0, False)
    new = torch.ops.focal.sigmoid_focal_loss(x, ids, None, None, None, 0.25, 2.0, 0.0, -100, "sum", 1.0, False,
                                             None, -1)
    assert torch.equal(old[0], new[0])


def test_alpha_tensor_moves_with_the_module():
    alpha = per_class_alpha(torch.float32)
    criterion = focal.SigmoidFocalLoss(alpha=alpha, background_index=CLASSES)
    assert "alpha" in dict(criterion.named_buffers())
    assert criterion.to(torch.float64).alpha.dtype == torch.float64
    assert "background_index=4" in repr(criterion)


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_background_index_must_not_be_a_class_or_the_ignore_index(loss):
    x = logits("cpu")
    targets = targets_of(loss, ids_with_background(-1))
    with pytest.raises(ValueError, match="background_index=2 is a class id"):
        loss.fused(x, targets, background_index=2, **loss.default)
    with pytest.raises(ValueError, match="ignore_index=4 collides .* background_index \\(4\\)"):
        loss.fused(x, targets, background_index=CLASSES, ignore_index=CLASSES, **loss.default)
    with pytest.raises(TypeError, match="background_index must be an int"):
        loss.fused(x, targets, background_index=True, **loss.default)


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_minus_one_is_an_invalid_id_once_background_is_c(loss):
    x = logits("cpu")
    targets = targets_of(loss, ids_with_background(-1))
    with pytest.raises(ValueError, match=r"class id -1 at row 4 is out of range.*background_index \(4\)"):
        loss.fused(x, targets, background_index=CLASSES, **loss.default)


@pytest.mark.parametrize(
    ("alpha", "error", "message"),
    [
        (torch.ones(3), ValueError, r"alpha as a tensor must have shape \(4,\)"),
        (torch.ones(1, 4), ValueError, r"alpha as a tensor must have shape \(4,\)"),
        (torch.ones(4, dtype=torch.long), TypeError, "alpha as a tensor must be floating point"),
        (torch.ones(4, requires_grad=True), ValueError, "gradients with respect to alpha"),
        (torch.ones(4, device="meta"), ValueError, "alpha is on meta"),
        (torch.tensor([0.25, 0.5, 1.5, 0.0]), ValueError, r"class_alpha values must be in \[0, 1\]"),
        (torch.tensor([0.25, float("nan"), 0.5, 0.0]), ValueError, r"class_alpha values must be in \[0, 1\]"),
    ],
)
def test_bad_alpha_tensors(alpha, error, message):
    x = logits("cpu").float()
    for loss in (FOCAL, STAR):
        hyper = {k: v for k, v in loss.default.items() if k != "alpha"}
        with pytest.raises(error, match=message):
            loss.fused(x, ids_with_background(-1), alpha=alpha, **hyper)


def test_varifocal_alpha_tensor_is_a_negatives_weight_so_any_finite_nonnegative_value():
    x = logits("cpu").float()
    targets = cast_targets(targets_of(VFL, ids_with_background(-1)), torch.float32)
    alpha = torch.tensor([0.0, 0.5, 2.0, 7.5])
    got = loss_and_grad(VFL.fused, x, targets, alpha=alpha, reduction="sum")
    want = loss_and_grad(VFL.reference, x.double(), cast_targets(targets, torch.float64), alpha=alpha.double(),
                         reduction="sum")
    assert_close(got[0], want[0].float(), 1e-6, 0, "loss")
    with pytest.raises(ValueError, match="class_alpha values must be finite and >= 0"):
        VFL.fused(x, targets, alpha=torch.tensor([0.0, -0.5, 1.0, 1.0]))


def test_quality_focal_loss_takes_no_alpha():
    x = logits("cpu")
    with pytest.raises(TypeError, match="alpha"):
        focal.quality_focal_loss(x, targets_of(QFL, ids_with_background(-1)), alpha=torch.ones(CLASSES))
