"""focal.integrations.torchvision: RetinaNet and FCOS give stock torchvision's losses and gradients.

The models are torchvision's own ``RetinaNet`` and ``FCOS`` classes with their stock heads (at 32
channels), FPN, anchors, matchers and transforms; only the ResNet-50 body is replaced by four strided
convolutions with batch norm giving the same strides (8, 16, 32, then P6 and P7), so that a float64
training step takes a fraction of a second. The adapter sees only the head outputs, whose layout
``(N, HWA, C)`` neither the body nor the width changes; the resnet50 builders are compared at real
sizes by ``benchmarks/bench_detectors.py``, which checks the three paths agree before timing them.
"""

import copy
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation

import focal.integrations.torchvision as fused_torchvision

KINDS = ["retinanet", "fcos"]
NUM_CLASSES = 91
# Precision contract (README "Precision") for gradients, relative: float32 a few ulp, 16-bit one ulp
# of the stored result.
GRAD_RTOL = {torch.float32: 16 * 2**-23, torch.bfloat16: 2**-7}


def _conv(cin, cout, stride):
    return Conv2dNormActivation(cin, cout, stride=stride)


def _build(kind):
    torch.manual_seed(0)
    body = torch.nn.Sequential(OrderedDict(
        stem=torch.nn.Sequential(_conv(3, 8, 2), _conv(8, 16, 2)), c3=_conv(16, 16, 2), c4=_conv(16, 32, 2),
        c5=_conv(32, 32, 2)))
    backbone = BackboneWithFPN(body, {"c3": "0", "c4": "1", "c5": "2"}, [16, 32, 32], 32,
                               extra_blocks=LastLevelP6P7(32, 32))
    detector = RetinaNet if kind == "retinanet" else FCOS
    return detector(backbone, num_classes=NUM_CLASSES, min_size=128, max_size=160)


@pytest.fixture(scope="module")
def models():
    return {kind: _build(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def float64_steps(models):
    """Stock and fused float64 training steps of each model, shared by the tests."""
    return {(kind, fused): _train_step(models[kind], torch.float64, fused) for kind in KINDS for fused in (False, True)}


def _batch(dtype):
    """Two images of different sizes, the second without boxes. Random boxes of 6-66 px leave many
    anchors between RetinaNet's IoU thresholds."""
    g = torch.Generator().manual_seed(1)
    images, targets = [], []
    for (h, w), k in zip([(128, 150), (140, 128)], [4, 0]):
        images.append(torch.rand(3, h, w, generator=g, dtype=torch.float64).to(dtype))
        corner = torch.rand(k, 2, generator=g, dtype=torch.float64) * 90
        size = torch.rand(k, 2, generator=g, dtype=torch.float64) * 60 + 6
        targets.append({"boxes": torch.cat([corner, corner + size], 1).to(dtype),
                        "labels": torch.randint(0, NUM_CLASSES, (k,), generator=g)})
    return images, targets


def _train_step(model, dtype, fused, channels_last=False, autocast=False):
    """Losses, every parameter's gradient (float64 copies) and the arguments the head's
    ``compute_loss`` received, for one forward + backward of a copy of ``model``."""
    model = copy.deepcopy(model).to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fused:
        assert fused_torchvision.use_fused_loss(model) is model
    seen = []
    head_loss = model.head.compute_loss
    model.head.compute_loss = lambda *args: (seen.append(args), head_loss(*args))[1]
    model.train()
    images, targets = _batch(torch.float32 if autocast else dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = model(images, targets)
    sum(losses.values()).backward()
    grads = [p.grad.double() for p in model.parameters()]
    return {k: v.detach().double() for k, v in losses.items()}, grads, seen[0], model


def _assert_grads_close(got, want, rtol):
    scale = max(g.abs().max() for g in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_losses_and_every_gradient_equal_stock(float64_steps, kind):
    stock, stock_grads, (targets, _, *rest), _ = float64_steps[kind, False]
    fused, fused_grads, _, model = float64_steps[kind, True]
    matched = torch.cat(rest[-1])
    assert (matched >= 0).any() and (matched == -1).any()
    if kind == "retinanet":
        assert (matched == -2).any(), "the batch should hold anchors between the IoU thresholds"
    assert any(len(t["labels"]) == 0 for t in targets)
    assert stock.keys() == fused.keys()
    for name in stock:
        torch.testing.assert_close(fused[name], stock[name], rtol=1e-10, atol=0)
    assert len(fused_grads) == len(list(model.parameters())) and all(g.abs().sum() > 0 for g in fused_grads[-8:])
    _assert_grads_close(fused_grads, stock_grads, 1e-10)


def _stock_loss(kind, head, args):
    if kind == "retinanet":
        targets, outputs, _, matched = args
        return RetinaNetClassificationHead.compute_loss(head.classification_head, targets, outputs, matched)
    return FCOSHead.compute_loss(head, *args)["classification"]


def _fused_loss(kind, head, args):
    if kind == "retinanet":
        targets, outputs, _, matched = args
        return head.classification_head.compute_loss(targets, outputs, matched)
    return head.compute_loss(*args)["classification"]


def _loss_and_logit_grad(loss_fn, kind, head, args, dtype):
    """The classification loss and its gradient with respect to the logits, from the head outputs
    ``args`` cast to ``dtype`` (float64 for the exact value)."""
    targets, outputs, anchors, matched = args
    logits = outputs["cls_logits"].detach().to(dtype).requires_grad_()
    outputs = {k: (logits if k == "cls_logits" else v.detach().to(dtype)) for k, v in outputs.items()}
    anchors = [a.to(dtype) for a in anchors]
    targets = [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in t.items()} for t in targets]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = loss_fn(kind, head, (targets, outputs, anchors, matched))
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach().double(), grad.double(), grad.dtype


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("setting", ["float32-channels-last", "bfloat16-autocast"])
def test_reduced_precision_within_the_contract(models, float64_steps, kind, setting):
    """The loss path on the head outputs a float32 channels-last (or bfloat16 autocast) training step
    produced is within the precision contract of its exact value; and the whole model's gradients
    are as close to float64 as stock's are."""
    autocast = setting == "bfloat16-autocast"
    dtype = torch.bfloat16 if autocast else torch.float32
    exact_losses, exact_grads, _, _ = float64_steps[kind, False]
    stock_losses, stock_grads, _, _ = _train_step(models[kind], torch.float32, False, not autocast, autocast)
    losses, grads, args, model = _train_step(models[kind], torch.float32, True, not autocast, autocast)
    assert args[1]["cls_logits"].dtype == dtype

    exact_loss, exact_grad, _ = _loss_and_logit_grad(_stock_loss, kind, model.head, args, torch.float64)
    loss, grad, grad_dtype = _loss_and_logit_grad(_fused_loss, kind, model.head, args, dtype)
    assert grad_dtype == dtype
    # bfloat16: RetinaNet's per-image weight is rounded to the logits' dtype (2^-9).
    torch.testing.assert_close(loss, exact_loss, rtol=1e-5 if dtype == torch.float32 else 2**-8, atol=0)
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(grad, exact_grad, rtol=rtol, atol=rtol * exact_grad.abs().max())

    for name in exact_losses:
        stock_error = (stock_losses[name] - exact_losses[name]).abs()
        assert (losses[name] - exact_losses[name]).abs() <= 2 * stock_error + 1e-4 * exact_losses[name].abs()
    scale = max(g.norm() for g in exact_grads)
    for g, s, e in zip(grads, stock_grads, exact_grads):
        assert (g - e).norm() <= 2 * (s - e).norm() + 1e-4 * (e.norm() + 1e-3 * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_training_loss_is_replaced(models, kind):
    """Inference never calls ``compute_loss``: the adapter changes that one attribute of one head
    and no parameter, buffer or other attribute."""
    model = copy.deepcopy(models[kind])
    heads = [m for m in model.modules() if isinstance(m, (RetinaNetClassificationHead, FCOSHead))]
    before = [dict(vars(m)) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused_torchvision.use_fused_loss(model)
    changed = [m for m, b in zip(model.modules(), before) if vars(m) != b]
    assert changed == heads and set(vars(heads[0])) - set(before[list(model.modules()).index(heads[0])]) == {
        "compute_loss"}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_rejects_other_models():
    with pytest.raises(TypeError, match="RetinaNet or FCOS"):
        fused_torchvision.use_fused_loss(torch.nn.Linear(2, 2))
