"""The fused FCOS box-regression and centerness losses (torch.ops.focal.fcos_box_losses,
focal/integrations/_fcos_boxes.py) against torchvision's own box coder, GIoU loss and
cross-entropy: values and gradients, background, ties, every dtype, bad input, registration."""

from __future__ import annotations

import pytest
import torch
from fcos_box_cases import problem, stock_sums
from focal.integrations._fcos_boxes import fcos_box_losses

OP = torch.ops.focal.fcos_box_losses


def sums(codes, ctrness, anchors, gt_boxes, matched, normalize, normalizer=None):
    """The two losses of the fused op, stacked as stock_sums gives them."""
    return torch.stack(fcos_box_losses(codes, ctrness, anchors, gt_boxes, matched, normalizer, normalize))


@pytest.mark.parametrize("normalize", [False, True])
def test_float64_values_and_gradients_equal_torchvisions(normalize):
    codes, ctrness, anchors, gt_boxes, matched = problem()
    if normalize:  # the exact codes above are for unnormalised decoding
        codes = codes / torch.cat([anchors[..., 2:] - anchors[..., :2]] * 2, -1)
    ours = [t.clone().requires_grad_() for t in (codes, ctrness)]
    theirs = [t.clone().requires_grad_() for t in (codes, ctrness)]
    got = sums(*ours, anchors, gt_boxes, matched, normalize)
    want = stock_sums(*theirs, anchors, gt_boxes, matched, normalize)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    got_grads = torch.autograd.grad((got * weights).sum(), ours)
    want_grads = torch.autograd.grad((want * weights).sum(), theirs)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    background = matched < 0
    assert got_grads[0][background].eq(0).all() and got_grads[1][background].eq(0).all()
    assert got_grads[0][~background].ne(0).any()


def test_ties_split_the_gradient_as_autograd_does():
    """A predicted box equal to its ground truth: every min and max of the GIoU ties, and autograd
    gives each operand half; the loss there is 0 up to eps."""
    codes, ctrness, anchors, gt_boxes, matched = problem(n=1, locations=20, boxes=1)
    matched[:] = 0
    got, want = [], []
    for fn, out in ((sums, got), (stock_sums, want)):
        c = codes.clone().requires_grad_()
        total = fn(c, ctrness, anchors, gt_boxes, matched, False)
        out += [total.detach(), torch.autograd.grad(total[0], c)[0]]
    assert got[0][0] < 1e-6
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_inputs_give_the_float64_terms_of_their_values(dtype):
    """The math runs in float64 whatever the codes' dtype: the sums are those of the rounded inputs,
    rounded once to float32; the gradients are kept in float32 and rounded to the codes' dtype after
    the backward scales them."""
    codes, ctrness, anchors, gt_boxes, matched = problem(dtype=dtype)
    c, x = codes.requires_grad_(), ctrness.requires_grad_()
    got = sums(c, x, anchors.float(), gt_boxes.float(), matched, True)
    assert got.dtype == torch.float32
    c64, x64 = codes.detach().double().requires_grad_(), ctrness.detach().double().requires_grad_()
    want = sums(c64, x64, anchors.float().double(), gt_boxes.float().double(), matched, True)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)
    grads = torch.autograd.grad(got.sum(), (c, x))
    want_grads = torch.autograd.grad(want.sum(), (c64, x64))
    for a, b in zip(grads, want_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.float().to(dtype), rtol=0, atol=0)


def test_a_normalizer_divides_both_losses_and_their_gradients():
    codes, ctrness, anchors, gt_boxes, matched = problem()
    inputs = [codes.clone().requires_grad_(), ctrness.clone().requires_grad_()]
    plain = [codes.clone().requires_grad_(), ctrness.clone().requires_grad_()]
    got = sums(*inputs, anchors, gt_boxes, matched, True, normalizer=torch.tensor(37))
    want = sums(*plain, anchors, gt_boxes, matched, True) / 37
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), plain)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-18)


def test_boxes_of_mixed_dtypes_are_read_exactly():
    """Under bfloat16 autocast torchvision's anchors are bfloat16 while the targets' boxes stay float32:
    neither is rounded to the other's dtype."""
    codes, ctrness, anchors, gt_boxes, matched = problem()
    gt_boxes = gt_boxes + 1 / 3  # not representable in bfloat16
    got = sums(codes, ctrness, anchors.bfloat16(), gt_boxes.float(), matched, True)
    want = sums(codes, ctrness, anchors.bfloat16().double(), gt_boxes.float().double(), matched, True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_background_and_empty_batches_add_nothing():
    codes, ctrness, anchors, gt_boxes, matched = problem(n=2, locations=7)
    matched[:] = -1
    codes.requires_grad_()
    total = sums(codes, ctrness, anchors, gt_boxes, matched, True)
    assert total.tolist() == [0.0, 0.0]
    assert torch.autograd.grad(total.sum(), codes)[0].eq(0).all()
    empty = sums(codes[:, :0], ctrness[:, :0], anchors[:, :0], gt_boxes, matched[:, :0], True)
    assert empty.tolist() == [0.0, 0.0]


def test_a_centre_outside_its_box_gives_nan_as_stock():
    """torchvision's centerness target is the square root of a negative ratio when the anchor's centre
    lies outside its ground-truth box: NaN, which the fused op reports too rather than hiding."""
    codes, ctrness, anchors, gt_boxes, matched = problem(n=1, locations=4, boxes=1)
    gt_boxes[0, 0] = torch.tensor([200.0, 200.0, 220.0, 210.0])  # right of and below every centre
    anchors[0, 0] = torch.tensor([190.0, 205.0, 194.0, 209.0])  # centre left of the box only
    matched[:] = 0
    got = sums(codes, ctrness, anchors, gt_boxes, matched, True)
    want = stock_sums(codes, ctrness, anchors, gt_boxes, matched, True)
    assert got[1].isnan() and want[1].isnan()
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)


def test_bad_input_is_rejected_with_a_message():
    codes, ctrness, anchors, gt_boxes, matched = problem(n=2, locations=6, boxes=3)
    args = dict(codes=codes, ctrness=ctrness, anchors=anchors, gt_boxes=gt_boxes, matched=matched)
    cases = [
        ({"codes": codes[..., :3]}, ValueError, r"codes must have shape \(N, L, 4\)"),
        ({"codes": codes.long()}, TypeError, "codes must be float32"),
        ({"ctrness": ctrness.float()}, TypeError, "ctrness must have the codes' dtype"),
        ({"ctrness": ctrness[:, :5]}, ValueError, "ctrness must have shape"),
        ({"anchors": anchors[:1]}, ValueError, "anchors must have shape"),
        ({"gt_boxes": gt_boxes[:, :0]}, ValueError, "G >= 1"),
        ({"gt_boxes": gt_boxes.int()}, TypeError, "must be floating point tensors"),
        ({"matched": matched.int()}, TypeError, "matched must be int64"),
        ({"matched": matched[:, :5]}, ValueError, "matched must have shape"),
        ({"matched": torch.full_like(matched, 3)}, ValueError, "matched index 3 at image 0, location 0 is beyond"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            OP(**{**args, **change}, normalizer=None, normalize_by_size=True)
    for bad in (0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
            OP(**args, normalizer=torch.tensor(bad), normalize_by_size=True)
    with pytest.raises(ValueError, match="normalizer must hold one value"):
        OP(**args, normalizer=torch.ones(2), normalize_by_size=True)


def test_second_derivatives_raise():
    codes, ctrness, anchors, gt_boxes, matched = problem(n=1, locations=6, boxes=2)
    codes.requires_grad_()
    total = sums(codes, ctrness, anchors, gt_boxes, matched, True)
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        torch.autograd.grad(total.sum(), codes, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck(dtype):
    codes, ctrness, anchors, gt_boxes, matched = problem(n=2, locations=9, boxes=3, dtype=dtype)
    args = (codes.requires_grad_(), ctrness.requires_grad_(), anchors.to(dtype), gt_boxes.to(dtype), matched)
    torch.library.opcheck(OP, (*args, None, True))
    torch.library.opcheck(OP, (*args, torch.tensor(7), False))
