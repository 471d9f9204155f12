"""focal.integrations.ultralytics: RT-DETR's classification losses, fused, equal ultralytics' own.

The network is ultralytics' ``RTDETRDetectionModel`` with its real ``RTDETRDecoder`` (queries,
denoising groups, auxiliary layers, Hungarian matcher) and loss, on a five-convolution backbone and a
32-wide decoder so that a float64 training step takes a fraction of a second; the loss sees only the
decoder's ``(layers, batch, queries, classes)`` scores, whatever the width.
"""

import contextlib
import copy
import os
import types

import pytest
import torch

os.environ.setdefault("YOLO_VERBOSE", "False")
from PIL import Image  # noqa: E402

_PIL_OPEN = Image.open
import ultralytics  # noqa: E402  (installed by make: requirements-integrations.txt)
from ultralytics.models.utils.loss import DETRLoss  # noqa: E402
from ultralytics.nn.tasks import RTDETRDetectionModel  # noqa: E402

import focal.integrations.ultralytics as fused_ultralytics  # noqa: E402

# Importing ultralytics replaces PIL's Image.open with its own (which tries an optional HEIF plugin on
# files PIL cannot read); the rest of the suite expects PIL's errors.
Image.open = _PIL_OPEN

NUM_CLASSES = 80
# RT-DETR's layout at a small width: stride-8/16/32 features into the decoder (hidden 32, 30 queries,
# 4 points, 2 heads, 2 layers, feed-forward 64).
TINY_RTDETR = {
    "nc": NUM_CLASSES,
    "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [32, 3, 2]],
                 [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [32, 3, 2]]],
    "head": [[[2, 3, 4], 1, "RTDETRDecoder", ["nc", 32, 30, 4, 2, 2, 64]]],
}


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    model = RTDETRDetectionModel(copy.deepcopy(TINY_RTDETR), verbose=False)
    model.nc = NUM_CLASSES  # ultralytics' trainer sets it from the data
    return model


def _batch(dtype, boxes_per_image=(5, 0)):
    """ultralytics' training batch: images and normalised xywh boxes with their image index."""
    g = torch.Generator().manual_seed(2)
    n = sum(boxes_per_image)
    index = torch.cat([torch.full((k,), float(i)) for i, k in enumerate(boxes_per_image)])
    boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)
    return {"img": torch.rand(len(boxes_per_image), 3, 128, 128, generator=g, dtype=torch.float64).to(dtype),
            "batch_idx": index, "cls": torch.randint(0, NUM_CLASSES, (n, 1), generator=g).float(),
            "bboxes": boxes.to(dtype)}


@contextlib.contextmanager
def _float64(stock_in_float64=False):
    """A float64 model needs float64 default tensors in ultralytics' decoder. ``stock_in_float64``
    also makes ``Tensor.float()`` cast to float64, so that ultralytics' varifocal loss, which casts
    to float32, runs in float64 too and can serve as the exact value."""
    default, to_float = torch.get_default_dtype(), torch.Tensor.float
    torch.set_default_dtype(torch.float64)
    if stock_in_float64:
        torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)
        torch.Tensor.float = to_float


def _train_step(network, dtype, fused, batch=None, channels_last=False, autocast=False):
    """Loss, every parameter's gradient (float64) and the arguments of each classification-loss
    call, for one forward + backward of a copy of ``network``."""
    model = copy.deepcopy(network).to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fused:
        assert fused_ultralytics.use_fused_loss(model) is model
    model.train()
    batch = batch or _batch(dtype)
    if channels_last:
        batch["img"] = batch["img"].contiguous(memory_format=torch.channels_last)
    calls = []
    criterion = model.init_criterion()
    loss_class = criterion._get_loss_class
    criterion._get_loss_class = lambda *args: (calls.append(args), loss_class(*args))[1]
    model.criterion = criterion
    context = _float64(stock_in_float64=not fused) if dtype == torch.float64 else contextlib.nullcontext()
    torch.manual_seed(3)  # the denoising queries are random
    with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, _ = model.loss(batch)
    total.backward()
    return total.detach().double(), [p.grad.double() for p in model.parameters()], calls


def _assert_grads_close(got, want, rtol):
    scale = max(g.abs().max() for g in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("boxes_per_image", [(5, 0), (0, 0)], ids=["varifocal", "focal-no-boxes"])
def test_float64_loss_and_every_gradient_equal_ultralytics(network, boxes_per_image):
    stock, stock_grads, calls = _train_step(network, torch.float64, False, _batch(torch.float64, boxes_per_image))
    fused, fused_grads, fused_calls = _train_step(network, torch.float64, True, _batch(torch.float64, boxes_per_image))
    assert len(calls) == len(fused_calls) >= 3  # decoder layers, encoder queries (and denoising groups)
    if sum(boxes_per_image):
        matched = [(call[1] < NUM_CLASSES) for call in calls]
        zero_iou = [(m & (call[2].view(m.shape) == 0)).any() for call, m in zip(calls, matched)]
        assert any(zero_iou), "some matched query should have IoU 0 with its box"
    torch.testing.assert_close(fused, stock, rtol=1e-10, atol=0)
    names = [name for name, _ in network.named_parameters()]
    score_heads = [g for name, g in zip(names, fused_grads) if "score_head" in name]
    assert score_heads and all(g.abs().sum() > 0 for g in score_heads)
    _assert_grads_close(fused_grads, stock_grads, 1e-10)


@pytest.mark.parametrize("setting", ["float32-channels-last", "bfloat16-autocast"])
def test_reduced_precision_as_exact_as_ultralytics(network, setting):
    """ultralytics computes its varifocal loss in float32: the fused loss and the whole network's
    gradients are as close to float64 as ultralytics' own, and within float32's resolution of it
    (bfloat16: of the rounding autocast leaves)."""
    autocast = setting == "bfloat16-autocast"
    exact, exact_grads, _ = _train_step(network, torch.float64, False)
    stock, stock_grads, _ = _train_step(network, torch.float32, False, channels_last=not autocast, autocast=autocast)
    fused, fused_grads, calls = _train_step(network, torch.float32, True, channels_last=not autocast,
                                            autocast=autocast)
    assert calls[0][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    rtol = 2**-7 if autocast else 1e-5
    assert (fused - exact).abs() <= 2 * (stock - exact).abs() + rtol * exact.abs()
    torch.testing.assert_close(fused, stock, rtol=2 * rtol, atol=0)
    scale = max(g.norm() for g in exact_grads)
    for g, s, e in zip(fused_grads, stock_grads, exact_grads):
        assert (g - e).norm() <= 2 * (s - e).norm() + rtol * (e.norm() + 1e-3 * scale)


def test_user_model_and_its_trainer_are_adapted(network, tmp_path):
    import yaml

    path = tmp_path / "tiny-rtdetr.yaml"
    path.write_text(yaml.safe_dump(TINY_RTDETR))
    user_model = ultralytics.RTDETR(str(path))
    assert fused_ultralytics.use_fused_loss(user_model) is user_model
    user_model.model.nc = NUM_CLASSES
    assert user_model.model.init_criterion()._get_loss_class.__func__ is not DETRLoss._get_loss_class
    # Training builds a new network (wrapped for DDP or torch.compile): adapted when training starts.
    trained = copy.deepcopy(network)
    trainer = types.SimpleNamespace(model=types.SimpleNamespace(module=trained))
    user_model.callbacks["on_pretrain_routine_end"][-1](trainer)
    assert trained.init_criterion()._get_loss_class.__func__ is not DETRLoss._get_loss_class


def test_rejects_other_objects():
    with pytest.raises(TypeError, match="RTDETR"):
        fused_ultralytics.use_fused_loss(torch.nn.Linear(2, 2))
