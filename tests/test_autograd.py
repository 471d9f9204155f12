"""Autograd plumbing: repeated and partial backward passes, non-contiguous inputs, autocast, determinism."""

from __future__ import annotations

import pytest
import torch

import focal
from focal import reference


def _inputs(device, kind, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(device)
    if kind == "ids":
        t = torch.randint(-1, shape[-1], shape[:-1], generator=g)
        t[0] = -100
    elif kind == "soft":
        t = torch.rand(shape, generator=g)
    else:
        t = torch.randint(0, 2, shape, generator=g).float()
    return x, t.to(device)


def _expected_grad(x, t, reduction, **kwargs):
    x = x.detach().double().requires_grad_()
    t = t.double() if t.is_floating_point() else t
    loss = reference.sigmoid_focal_loss(x, t, reduction=reduction, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad.float()


# --- repeated backward through a retained graph -------------------------------------------------


BACKWARDS = {  # name -> (reduction, backward call, how much smaller the gradient is than for "sum")
    "sum": ("sum", lambda loss: loss.backward(retain_graph=True), 1),
    "mean": ("mean", lambda loss: loss.backward(retain_graph=True), 30),
    "none-sum": ("none", lambda loss: loss.sum().backward(retain_graph=True), 1),
    "none-ones": ("none", lambda loss: loss.backward(torch.ones_like(loss), retain_graph=True), 1),
    "none-mean": ("none", lambda loss: loss.mean().backward(retain_graph=True), 30),
}


@pytest.mark.parametrize("kind", ["hard", "soft", "ids"])
@pytest.mark.parametrize("how", list(BACKWARDS))
def test_retain_graph_accumulates(device, kind, how):
    """Backward 1, 2, 3 times through one graph: x.grad is 1, 2 and 3 times the gradient."""
    reduction, backward, divisor = BACKWARDS[how]
    x, t = _inputs(device, kind)  # 6 x 5 = 30 elements
    if kind == "ids" and reduction == "mean":
        t[0] = 2  # no ignored row, so that the mean is over 30 elements
    x.requires_grad_()
    loss = focal.sigmoid_focal_loss(x, t, reduction=reduction)
    once = _expected_grad(x, t, "sum") / divisor
    for times in (1, 2, 3):
        backward(loss)
        torch.testing.assert_close(x.grad, times * once, rtol=1e-5, atol=1e-6)


def test_retain_graph_after_grad_is_zeroed(device):
    """optimizer.zero_grad(set_to_none=False) between two backward passes through one graph."""
    x, t = _inputs(device, "ids")
    x.requires_grad_()
    loss = focal.sigmoid_focal_loss(x, t, reduction="sum")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad.zero_()
    loss.backward()
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)


def test_autograd_grad(device):
    x, t = _inputs(device, "hard")
    x.requires_grad_()
    loss = focal.sigmoid_focal_loss(x, t, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, _expected_grad(x, t, "sum"), rtol=1e-5, atol=1e-6)
    assert x.grad is None  # autograd.grad does not accumulate


def test_autograd_grad_with_grad_outputs(device):
    x, t = _inputs(device, "soft")
    x.requires_grad_()
    loss = focal.sigmoid_focal_loss(x, t)
    upstream = torch.randn_like(loss)
    (grad,) = torch.autograd.grad(loss, x, grad_outputs=upstream)
    torch.testing.assert_close(grad, _expected_grad(x, t, "none") * upstream, rtol=1e-5, atol=1e-6)


def test_autograd_grad_results_belong_to_the_caller(device):
    """Editing a returned gradient in place (clipping, scaling) must not affect a later backward."""
    x, t = _inputs(device, "ids")
    x.requires_grad_()
    loss = focal.sigmoid_focal_loss(x, t, reduction="sum")
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    expected = first.clone()
    first.mul_(0.5)
    (second,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_repeated_autograd_grad_results_do_not_alias(device):
    """Each autograd.grad through a retained graph returns its own tensor, scaled by its grad_outputs."""
    x, t = _inputs(device, "soft")
    x.requires_grad_()
    loss = focal.sigmoid_focal_loss(x, t, reduction="sum")
    (twice,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(2.0, device=device), retain_graph=True)
    kept = twice.clone()
    (three_times,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(3.0, device=device), retain_graph=True)
    (once,) = torch.autograd.grad(loss, x)
    assert torch.equal(twice, kept)
    torch.testing.assert_close(once, _expected_grad(x, t, "sum"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twice, 2 * once, rtol=1e-6, atol=0)
    torch.testing.assert_close(three_times, 3 * once, rtol=1e-6, atol=0)


def test_scaled_and_combined_losses(device):
    """Upstream scalings (2 * loss, loss / n, sums of losses) reach the gradient."""
    x, t = _inputs(device, "ids")
    x.requires_grad_()
    base = _expected_grad(x, t, "sum")
    (2.0 * focal.sigmoid_focal_loss(x, t, reduction="sum")).backward()
    torch.testing.assert_close(x.grad, 2 * base, rtol=1e-5, atol=1e-6)
    x.grad = None
    (focal.sigmoid_focal_loss(x, t, reduction="sum") + focal.sigmoid_focal_loss(x, t).sum() + (x * 3).sum()).backward()
    torch.testing.assert_close(x.grad, 2 * base + 3, rtol=1e-5, atol=1e-6)


def test_gradient_flows_to_upstream_parameters(device):
    layer = torch.nn.Linear(4, 3).to(device)
    features = torch.randn(5, 4, device=device)
    t = torch.tensor([0, 2, -1, 1, -100], device=device)
    focal.sigmoid_focal_loss(layer(features), t, reduction="sum").backward()
    expected = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    reference.sigmoid_focal_loss(layer(features), t, reduction="sum").backward()
    for got, want in zip(expected, (p.grad for p in layer.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_inference_mode(device):
    x, t = _inputs(device, "ids")
    expected = focal.sigmoid_focal_loss(x, t, reduction="sum")
    with torch.inference_mode():
        got = focal.sigmoid_focal_loss(x.clone(), t, reduction="sum")
    assert torch.equal(got, expected)


# --- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hard", "soft", "ids"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_non_contiguous_inputs(device, kind, reduction):
    """Transposed, sliced and expanded inputs give what their contiguous copies give, bitwise."""
    base = torch.randn(7, 10, 6, device=device) * 3
    x = base.transpose(0, 1)[::2, :, 1:]  # (5, 7, 5), strided every which way
    assert not x.is_contiguous()
    if kind == "ids":
        t = torch.randint(-1, 5, (7, 5), device=device).t()  # (5, 7)
    else:
        t = torch.rand(5, 5, 7, device=device).transpose(1, 2)
        if kind == "hard":
            t = t.round()
    weight = torch.rand(5, device=device).expand(7, 5)[0]  # a 0-stride view... of shape (5,)
    row_weight = torch.rand(7, 1, device=device).expand(5, 7, 1)
    for w in (None, weight, row_weight):
        xs = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        xc = x.detach().contiguous().requires_grad_()
        assert not xs.is_contiguous()
        got = focal.sigmoid_focal_loss(xs, t, reduction=reduction, weight=w)
        want = focal.sigmoid_focal_loss(xc, t.contiguous(), reduction=reduction,
                                        weight=None if w is None else w.contiguous())
        assert torch.equal(got, want)
        got.sum().backward()
        want.sum().backward()
        assert torch.equal(xs.grad, xc.grad)


# --- autocast -----------------------------------------------------------------------------------


def test_cpu_autocast_bfloat16_conv_loss_backward():
    """conv (bf16 under autocast) -> loss -> backward works, and agrees with the float32 run."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    images = torch.randn(2, 3, 6, 6)
    labels = torch.randint(-1, 4, (2, 6, 6))

    def step(autocast: bool):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = conv(images).permute(0, 2, 3, 1)  # (N, H, W, classes)
            loss = focal.sigmoid_focal_loss(logits, labels, reduction="sum", normalizer=10.0)
        loss.backward()
        return logits.dtype, loss, conv.weight.grad.clone(), conv.bias.grad.clone()

    dtype, loss, weight_grad, bias_grad = step(autocast=True)
    assert dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    assert weight_grad.dtype == torch.float32 and torch.isfinite(weight_grad).all()
    _, loss32, weight_grad32, bias_grad32 = step(autocast=False)
    # bf16 keeps ~3 significant digits of the logits and of the gradient.
    torch.testing.assert_close(loss, loss32, rtol=2e-2, atol=0)
    assert (weight_grad - weight_grad32).norm() <= 3e-2 * weight_grad32.norm()
    assert (bias_grad - bias_grad32).norm() <= 3e-2 * bias_grad32.norm()


# --- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["hard", "ids"])
def test_reduced_loss_is_bitwise_reproducible_across_runs_and_threads(kind, dtype):
    # 200 x 600 = 120000 elements: several of the kernel's parallel work items.
    x, t = _inputs("cpu", kind, shape=(200, 600), seed=3)
    x = x.to(dtype).requires_grad_()
    t = t.to(dtype) if t.is_floating_point() else t
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            for reduction in ("sum", "mean"):
                x.grad = None
                loss = focal.sigmoid_focal_loss(x, t, reduction=reduction)
                loss.backward()
                results.append((n, reduction, loss.detach().clone(), x.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for reduction in ("sum", "mean"):
        runs = [(loss, grad) for _, r, loss, grad in results if r == reduction]
        for loss, grad in runs[1:]:
            assert torch.equal(loss, runs[0][0]), (loss.item(), runs[0][0].item())
            assert torch.equal(grad, runs[0][1])


def test_cpu_gradient_buffers_are_reused_only_once_freed():
    """Large CPU gradient buffers come from a cache of freed ones: a live gradient is never handed
    out again, and a freed one is (so a training step faults in no new pages)."""
    x = torch.randn(40_000, 80, requires_grad=True)  # 12.8 MB: above the cached size
    ids_a = torch.randint(-1, 80, (40_000,))
    ids_b = torch.randint(-1, 80, (40_000,))

    (grad_a,) = torch.autograd.grad(focal.sigmoid_focal_loss(x, ids_a, reduction="sum"), x)
    snapshot = grad_a.clone()
    (grad_b,) = torch.autograd.grad(focal.sigmoid_focal_loss(x, ids_b, reduction="sum"), x)
    assert grad_b.data_ptr() != grad_a.data_ptr()
    torch.testing.assert_close(grad_a, snapshot, rtol=0, atol=0)

    freed = grad_b.data_ptr()
    del grad_b
    (grad_c,) = torch.autograd.grad(focal.sigmoid_focal_loss(x, ids_a, reduction="sum"), x)
    assert grad_c.data_ptr() == freed
    torch.testing.assert_close(grad_c, snapshot, rtol=0, atol=0)


def _saved_pointers():
    """Records the data pointers of the tensors that autograd saves (the pack hook keeps them as they are)."""
    pointers = []

    def pack(tensor):
        pointers.append(tensor.data_ptr())
        return tensor

    return pointers, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_cpu_backward_hands_over_the_forward_gradient_without_a_copy(reduction):
    """loss.backward() (or loss.sum().backward()) leaves in x.grad the very buffer that the forward
    pass wrote: no pass over the gradient, not even a copy."""
    x = torch.randn(300, 80, requires_grad=True)
    ids = torch.randint(-1, 80, (300,))
    pointers, hooks = _saved_pointers()
    with hooks:
        loss = focal.sigmoid_focal_loss(x, ids, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    assert x.grad.data_ptr() in pointers
    assert x.grad._version == 0  # not even scaled in place
    torch.testing.assert_close(x.grad, _expected_grad(x, ids, reduction if reduction != "none" else "sum"), rtol=1e-5, atol=1e-6)


def test_backward_with_a_grad_output_scales_the_forward_gradient_in_place():
    """A grad_output other than 1 (e.g. a GradScaler's loss scale) costs one in-place pass."""
    x = torch.randn(300, 80, requires_grad=True)
    ids = torch.randint(-1, 80, (300,))
    pointers, hooks = _saved_pointers()
    with hooks:
        loss = focal.sigmoid_focal_loss(x, ids, reduction="sum")
    (loss * 1024.0).backward()
    assert x.grad.data_ptr() in pointers
    torch.testing.assert_close(x.grad, 1024.0 * _expected_grad(x, ids, "sum"), rtol=1e-5, atol=1e-4)


def test_retained_graph_keeps_the_saved_gradient_intact_under_scaling():
    """With retain_graph=True the saved gradient is not scaled in place: each backward sees it as the
    forward wrote it, whatever grad_output the previous one had."""
    x = torch.randn(30, 8, requires_grad=True)
    ids = torch.randint(-1, 8, (30,))
    loss = focal.sigmoid_focal_loss(x, ids, reduction="sum")
    expected = _expected_grad(x, ids, "sum")
    for factor in (3.0, 0.0, -2.0):
        (grad,) = torch.autograd.grad(loss * factor, x, retain_graph=True)
        torch.testing.assert_close(grad, factor * expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "no_requires_grad"])
def test_no_gradient_is_computed_when_autograd_will_not_ask_for_it(context):
    """Evaluation loops pay for the loss only: the op is told not to compute (or allocate) the gradient."""
    x = torch.randn(50, 6, requires_grad=context != "no_requires_grad")
    ids = torch.randint(-1, 6, (50,))
    calls = []
    real = torch.ops.focal.sigmoid_focal_loss.default

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is real:
                calls.append(args[-1])
            return func(*args, **(kwargs or {}))

    guard = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context, torch.enable_grad)
    with guard(), Spy():
        loss = focal.sigmoid_focal_loss(x, ids, reduction="sum")
    assert calls == [False]
    torch.testing.assert_close(loss, reference.sigmoid_focal_loss(x.detach(), ids, reduction="sum"), rtol=1e-5, atol=1e-6)


def test_logits_are_not_kept_alive_by_the_graph():
    """Between forward and backward the graph holds the gradient, not the logits: logits made by an
    op that does not save its output are freed as soon as the caller drops them."""
    import weakref

    w = torch.randn(64, 80, requires_grad=True)
    features = torch.randn(2000, 64)
    ids = torch.randint(-1, 80, (2000,))
    logits = features @ w  # mm saves its inputs, not its output
    ref = weakref.ref(logits)
    loss = focal.sigmoid_focal_loss(logits, ids, reduction="sum")
    del logits
    assert ref() is None
    loss.backward()
    expected = torch.autograd.grad(reference.sigmoid_focal_loss(features @ w, ids, reduction="sum"), w)[0]
    torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-4)


def test_peak_memory_of_forward_and_backward_is_one_gradient_buffer():
    """Forward + backward of a reduced loss allocates one N x C buffer (the gradient, which becomes
    x.grad), measured with the CPU allocator's own statistics."""
    x = torch.randn(20_000, 80, requires_grad=True)
    ids = torch.randint(-1, 80, (20_000,))
    nbytes = x.numel() * x.element_size()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = focal.sigmoid_focal_loss(x, ids, reduction="sum")
        loss.backward()
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    live = peak = 0
    for event in prof.events():
        live += event.cpu_memory_usage
        peak = max(peak, live)
    assert x.grad is not None
    assert peak < 1.1 * nbytes, (peak, nbytes, allocated)
