"""CUDA-only behaviour. Everything shared with the CPU runs through the `device` fixture elsewhere;
this file holds what only a GPU can show: no host syncs, CPU/GPU agreement, and the build error."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import focal
import focal._extension
from bitwise import assert_bitwise_equal
from cuda_cases import cuda_reduced_sum, grid_blocks, make_logits, make_targets
from focal import reference

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA tests need a visible GPU (torch.cuda.is_available() is False)"
)
CUDA_KERNEL_BUILT = "cuda" in focal._extension.KERNEL_DEVICE_TYPES


@requires_cuda
@pytest.mark.skipif(CUDA_KERNEL_BUILT, reason="this build has CUDA kernels; the error is for CPU-only builds")
def test_cuda_tensor_on_cpu_only_build_says_how_to_rebuild():
    x = torch.randn(4, 3, device="cuda")
    with pytest.raises(RuntimeError, match=r"focal has no kernel for cuda tensors: rebuild focal .*FOCAL_WITH_CUDA=1"):
        focal.sigmoid_focal_loss(x, torch.zeros_like(x))


cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and CUDA_KERNEL_BUILT),
    reason="needs a visible GPU and focal built with its CUDA kernels (FOCAL_WITH_CUDA=1)",
)


@cuda_kernels
def test_out_of_range_class_id_gives_nan_row_not_an_error():
    """Checking ids on the GPU would need a host sync: a bad id poisons its row instead."""
    x = torch.randn(4, 3, device="cuda", requires_grad=True)
    ids = torch.tensor([0, 3, -1, -2], device="cuda")  # 3 == C and -2 are out of range
    loss = focal.sigmoid_focal_loss(x, ids)
    loss.sum().backward()
    assert torch.isnan(loss[1]).all() and torch.isnan(loss[3]).all()
    assert torch.isnan(x.grad[1]).all() and torch.isnan(x.grad[3]).all()
    good = torch.tensor([0, 2])
    expected = reference.sigmoid_focal_loss(x.detach()[good], ids[good])
    torch.testing.assert_close(loss.detach()[good], expected, rtol=1e-5, atol=1e-7)
    assert math.isnan(focal.sigmoid_focal_loss(x.detach(), ids, reduction="sum").item())


# Precision contract (README.md, "Precision"), as relative errors against float64: float32 a few
# ulp (16 eps), 16-bit one ulp of the stored result, reduced losses of 16-bit data (kept in float32)
# 2^-15. Gradients of soft targets near p = t are a difference of terms of the size of the largest
# gradient: they get the same allowance relative to that largest value.
ELEMENT_RTOL = {torch.float64: 1e-12, torch.float32: 16 * 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}
SUM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-15, torch.float16: 2**-15}


def _exact(x, t, **kwargs):
    """Loss and gradient in float64 from the reference, for comparison with either device."""
    x64 = x.detach().cpu().double().requires_grad_()
    t64 = t.cpu().double() if t.is_floating_point() else t.cpu()
    w = kwargs.pop("weight", None)
    loss = reference.sigmoid_focal_loss(x64, t64, weight=None if w is None else w.cpu().double(), **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x64)
    return loss.detach(), grad


def _assert_within_contract(got, exact, dtype, reduced, normwise=False):
    got = got.detach().cpu().double()
    if reduced:
        torch.testing.assert_close(got, exact, rtol=SUM_RTOL[dtype], atol=0)
        return
    rtol = ELEMENT_RTOL[dtype]
    atol = torch.finfo(dtype).tiny + (rtol * exact.abs().max().item() if normwise else 0.0)
    torch.testing.assert_close(got, exact, rtol=rtol, atol=atol)


@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["hard", "soft", "ids"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 1.5])
def test_cuda_and_cpu_within_the_precision_contract(dtype, kind, gamma):
    """Both devices against a float64 evaluation of the reference, not against each other: they
    may round differently, each within its contract."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 37, generator=g) * 4).to(dtype)
    if kind == "ids":
        t = torch.randint(-1, 37, (300,), generator=g)
        t[::7] = -100
    else:
        t = torch.rand(300, 37, generator=g).to(dtype)
        t = t.round() if kind == "hard" else t
    weight = torch.rand(37, generator=g).to(dtype)
    for reduction in ("none", "sum", "mean"):
        kwargs = dict(alpha=0.25, gamma=gamma, reduction=reduction, weight=weight, label_smoothing=0.1)
        exact_loss, exact_grad = _exact(x, t, **kwargs)
        for device in ("cpu", "cuda"):
            xd = x.detach().to(device).requires_grad_()  # a leaf on each device
            kwargs["weight"] = weight.to(device)
            loss = focal.sigmoid_focal_loss(xd, t.to(device), **kwargs)
            loss.sum().backward()
            assert loss.device.type == device and xd.grad.device.type == device
            # The reference forms 1 - p_t by cancellation: near saturation it is the less accurate
            # side, so elementwise values get the allowance relative to the largest one too.
            _assert_within_contract(loss, exact_loss, dtype, reduced=reduction != "none", normwise=True)
            _assert_within_contract(xd.grad, exact_grad, dtype, reduced=False, normwise=True)


@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 2.5])
def test_saturated_logits_stay_finite_and_agree_with_the_cpu(dtype, gamma):
    """Logits whose sigmoid is subnormal or rounds to 0 / 1 in the math type (where a flushed or
    overflowing reciprocal would turn the soft-target quotient into NaN), every target kind."""
    big = [0.0, 20.0, 87.0, 88.5, 100.0, 200.0, 1e4]
    values = torch.tensor([v * s for v in big for s in (1.0, -1.0)], dtype=torch.float64)
    x = values.to(dtype).repeat(3, 1)  # one row per target below
    for t in (torch.zeros_like(x), torch.ones_like(x), torch.full_like(x, 0.3), None):
        ids = torch.tensor([-1, 0, 5]) if t is None else None
        results = []
        for device in ("cpu", "cuda"):
            xd = x.detach().to(device).requires_grad_()  # a leaf on each device
            target = (ids if t is None else t).to(device)
            loss = focal.sigmoid_focal_loss(xd, target, 0.25, gamma, "none")
            total = focal.sigmoid_focal_loss(xd, target, 0.25, gamma, "sum")
            total.backward()
            results.append((loss.detach().cpu().double(), xd.grad.cpu().double(), total.detach().cpu().double()))
        (cpu_loss, cpu_grad, cpu_total), (cuda_loss, cuda_grad, cuda_total) = results
        assert torch.isfinite(cuda_loss).all() and torch.isfinite(cuda_grad).all() and torch.isfinite(cuda_total)
        rtol = ELEMENT_RTOL[dtype] * 2
        atol = torch.finfo(dtype).tiny
        torch.testing.assert_close(cuda_loss, cpu_loss, rtol=rtol, atol=atol)
        torch.testing.assert_close(cuda_grad, cpu_grad, rtol=rtol, atol=atol)
        torch.testing.assert_close(cuda_total, cpu_total, rtol=SUM_RTOL[dtype] * 2, atol=0)


def _offset_view(shape, dtype, offset=1):
    """A contiguous tensor whose data starts `offset` elements into its storage: not 16-byte aligned."""
    numel = math.prod(shape)
    return torch.randn(numel + offset, device="cuda").to(dtype)[offset:].view(shape)


@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["ids", "soft"])
def test_unaligned_inputs_and_ragged_tails(dtype, kind):
    """Logits (and float targets) that start off a 16-byte boundary, and sizes that are no multiple
    of the vector width, give the aligned results."""
    for rows, cols in ((97, 80), (33, 7), (5, 1203)):
        x = _offset_view((rows, cols), dtype)
        t = torch.randint(-1, cols, (rows,), device="cuda") if kind == "ids" else _offset_view((rows, cols), dtype).sigmoid()
        assert x.data_ptr() % 16 != 0
        xa = x.clone().requires_grad_()
        xu = x.requires_grad_()
        for reduction in ("none", "sum"):
            xa.grad = xu.grad = None
            aligned = focal.sigmoid_focal_loss(xa, t.clone(), reduction=reduction)
            unaligned = focal.sigmoid_focal_loss(xu, t, reduction=reduction)
            aligned.sum().backward()
            unaligned.sum().backward()
            torch.testing.assert_close(unaligned, aligned, rtol=SUM_RTOL[dtype], atol=0)
            torch.testing.assert_close(xu.grad, xa.grad, rtol=ELEMENT_RTOL[dtype], atol=torch.finfo(dtype).tiny)


@cuda_kernels
@pytest.mark.parametrize("weight_kind", ["row", "full", "class"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weights_on_cuda(weight_kind, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 50, 80, generator=g) * 3).to(dtype)
    ids = torch.randint(-1, 80, (4, 50), generator=g)
    shape = {"row": (4, 50, 1), "full": (4, 50, 80), "class": (80,)}[weight_kind]
    weight = torch.rand(shape, generator=g).to(dtype)
    exact_loss, exact_grad = _exact(x, ids, reduction="sum", weight=weight)
    xd = x.cuda().requires_grad_()
    loss = focal.sigmoid_focal_loss(xd, ids.cuda(), reduction="sum", weight=weight.cuda())
    loss.backward()
    _assert_within_contract(loss, exact_loss, dtype, reduced=True)
    _assert_within_contract(xd.grad, exact_grad, dtype, reduced=False, normwise=True)


@cuda_kernels
def test_cuda_graph_capture_of_forward_and_backward():
    """A training step's loss, with a device normaliser, captured once and replayed: no host sync,
    no allocation outside the graph's pool, the same numbers as eager."""
    x = torch.randn(512, 80, device="cuda", requires_grad=True)
    ids = torch.randint(-1, 80, (512,), device="cuda")

    def step():
        num_pos = (ids >= 0).sum().clamp(min=1)
        loss = focal.sigmoid_focal_loss(x, ids, reduction="sum", normalizer=num_pos)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside the capture
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step()
    for seed in range(3):
        torch.manual_seed(seed)
        x.data.copy_(torch.randn_like(x))
        ids.copy_(torch.randint(-1, 80, ids.shape, device="cuda"))
        graph.replay()
        x_eager = x.detach().clone().requires_grad_()
        eager = focal.sigmoid_focal_loss(x_eager, ids, reduction="sum", normalizer=(ids >= 0).sum().clamp(min=1))
        eager.backward()
        torch.testing.assert_close(captured_loss, eager, rtol=0, atol=0)
        torch.testing.assert_close(x.grad, x_eager.grad, rtol=0, atol=0)


@cuda_kernels
def test_more_than_two_to_the_31_elements():
    """Indices past 2^31 (64-bit offsets into the logits, 32-bit columns)."""
    rows, cols = 2**31 // 80 + 1000, 80
    need = rows * cols * (2 + 2) + rows * 8 + (1 << 30)  # bfloat16 logits and gradient, int64 ids, slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.full((rows, cols), -2.0, device="cuda", dtype=torch.bfloat16)
    x[-1, -1] = 3.0
    ids = torch.full((rows,), -1, device="cuda")
    ids[-1] = 79
    x.requires_grad_()
    loss = focal.sigmoid_focal_loss(x, ids, reduction="sum")
    loss.backward()
    one = focal.sigmoid_focal_loss(x.detach()[:1].float().cpu(), ids[:1].cpu(), reduction="sum").item()
    last = focal.sigmoid_focal_loss(x.detach()[-1:].float().cpu(), ids[-1:].cpu(), reduction="sum").item()
    assert loss.item() == pytest.approx((rows - 1) * one + last, rel=1e-4)
    assert x.grad[-1, -1].item() < 0 and x.grad[-1, 0].item() == x.grad[0, 0].item()


@cuda_kernels
def test_backward_with_grad_output_one_leaves_the_forward_gradient_untouched():
    """loss.backward() on CUDA: the forward's gradient buffer becomes x.grad without a pass over it."""
    x = torch.randn(300, 80, device="cuda", requires_grad=True)
    ids = torch.randint(-1, 80, (300,), device="cuda")
    pointers = []

    def pack(t):
        pointers.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = focal.sigmoid_focal_loss(x, ids, reduction="sum")
    loss.backward()
    assert x.grad.data_ptr() in pointers
    x2 = x.detach().clone().requires_grad_()
    (focal.sigmoid_focal_loss(x2, ids, reduction="sum") * 3.0).backward()
    torch.testing.assert_close(x2.grad, 3.0 * x.grad, rtol=1e-6, atol=0)


@cuda_kernels
@pytest.mark.parametrize("normalizer_device", ["cuda", "cpu"])
def test_tensor_normalizer_on_either_device(normalizer_device):
    x = torch.randn(64, 10, device="cuda")
    ids = torch.randint(-1, 10, (64,), device="cuda")
    num_pos = (ids >= 0).sum().clamp(min=1).to(normalizer_device)
    loss = focal.sigmoid_focal_loss(x, ids, reduction="sum", normalizer=num_pos)
    expected = focal.sigmoid_focal_loss(x, ids, reduction="sum") / num_pos.item()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


@cuda_kernels
def test_no_host_sync_with_tensor_normalizer():
    x = torch.randn(64, 10, device="cuda", requires_grad=True)
    ids = torch.randint(-1, 10, (64,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        num_pos = (ids >= 0).sum().clamp(min=1)
        loss = focal.sigmoid_focal_loss(x, ids, reduction="sum", normalizer=num_pos)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all()


@cuda_kernels
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["ids", "soft"])
def test_cuda_reduction_is_bitwise_reproducible(reduction, kind):
    x = torch.randn(40960, 80, device="cuda", requires_grad=True)
    t = torch.randint(-1, 80, (40960,), device="cuda") if kind == "ids" else torch.rand(40960, 80, device="cuda")
    first = focal.sigmoid_focal_loss(x, t, reduction=reduction)
    (first_grad,) = torch.autograd.grad(first, x)
    for _ in range(3):
        again = focal.sigmoid_focal_loss(x, t, reduction=reduction)
        assert torch.equal(again, first)
        assert torch.equal(torch.autograd.grad(again, x)[0], first_grad)


def _variant_names(family: str) -> list[str]:
    import benchmark_scripts

    return benchmark_scripts.load("gpu_tune").variant_names(family)


@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["ids", "row_weight", "soft"])
def test_every_launch_shape_gives_the_same_bits_on_this_gpu(dtype, kind, monkeypatch):
    """FOCAL_CUDA_VARIANT picks each launch shape of the roofline kernels (focal_kernels.cuh),
    among them the class-id kernel's ring of cp.async copies, which only a GPU runs as written:
    every shape gives the default shape's loss and gradient bit for bit, on rows that end inside
    packs, a last partial tile, positives, background and ignored rows, with and without a weight
    per row; and the default is within the precision contract of the float64 reference."""
    g = torch.Generator().manual_seed(7)
    x = make_logits((20011, 91), dtype, g)
    t = make_targets("soft" if kind == "soft" else "ids", x, g)
    weight = (torch.rand(20011, 1, generator=g) + 0.5).to(dtype) if kind == "row_weight" else None

    def run():
        xd = x.cuda().requires_grad_()
        loss = focal.sigmoid_focal_loss(xd, t.cuda(), reduction="sum",
                                        weight=None if weight is None else weight.cuda())
        (grad,) = torch.autograd.grad(loss, xd)
        return loss.detach(), grad

    monkeypatch.delenv("FOCAL_CUDA_VARIANT", raising=False)
    loss, grad = run()
    for name in _variant_names("shape"):
        monkeypatch.setenv("FOCAL_CUDA_VARIANT", name)
        other_loss, other_grad = run()
        assert_bitwise_equal(other_loss, loss, f"loss, {name}")
        assert_bitwise_equal(other_grad, grad, f"gradient, {name}")
    exact_loss, exact_grad = _exact(x, t, reduction="sum", weight=weight)
    _assert_within_contract(loss, exact_loss, dtype, reduced=True)
    _assert_within_contract(grad, exact_grad, dtype, reduced=False, normwise=True)


@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["rows", "long-rows", "wide-rows", "longer-rows", "pixels", "pixels-32"])
def test_every_softmax_variant_and_grid_gives_the_same_bits_on_this_gpu(dtype, layout, monkeypatch):
    """FOCAL_CUDA_SOFTMAX_VARIANT picks the softmax's thread-per-element kernel's variant (classes
    per load, or its ring), FOCAL_CUDA_SOFTMAX_ROWS_VARIANT registers or ring for the row kernels,
    FOCAL_CUDA_GRID the grid: every pair of variants on one block, 7 or a wave of them gives the
    default's loss and gradient bit for bit, for rows of 21 classes and 21-class pixels (a thread
    per element, also through its ring: images of 64 x 64, a multiple of 32 positions, in 16-byte
    pieces; of 61 x 66, whose warps' 32 pixels may straddle two images, word by word), rows of 80
    and of 200 classes (16 and 32 lanes per row) and of 1000 (a block per row); and where a ring
    would be taken, logits 4 or 2 bytes past a 16-byte boundary (which the rings leave to the
    others, but for the words of float32 pixels) give the same bits."""
    g = torch.Generator().manual_seed(8)
    shape = {"rows": (30011, 21), "long-rows": (9001, 80), "wide-rows": (4001, 200), "longer-rows": (701, 1000),
             "pixels": (5, 21, 61, 66), "pixels-32": (3, 21, 64, 64)}[layout]
    x = make_logits(shape, dtype, g)
    ids = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=g)
    ids.view(-1)[::13] = -100

    def run(shift=0):
        # shift: the logits that many elements into their storage on the GPU
        storage = torch.empty(x.numel() + shift, dtype=dtype, device="cuda")
        xd = storage[shift:].view(x.shape).copy_(x).detach().requires_grad_()
        loss = focal.softmax_focal_loss(xd, ids.cuda(), gamma=2.0, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xd)
        return loss.detach(), grad

    for name in ("FOCAL_CUDA_SOFTMAX_VARIANT", "FOCAL_CUDA_SOFTMAX_ROWS_VARIANT", "FOCAL_CUDA_GRID"):
        monkeypatch.delenv(name, raising=False)
    loss, grad = run()
    for name, rows, grid in itertools.product(_variant_names("softmax"), _variant_names("softmax_rows"),
                                              [None, "1", "7"]):
        monkeypatch.setenv("FOCAL_CUDA_SOFTMAX_VARIANT", name)
        monkeypatch.setenv("FOCAL_CUDA_SOFTMAX_ROWS_VARIANT", rows)
        if grid is None:
            monkeypatch.delenv("FOCAL_CUDA_GRID", raising=False)
        else:
            monkeypatch.setenv("FOCAL_CUDA_GRID", grid)
        other_loss, other_grad = run()
        assert_bitwise_equal(other_loss, loss, f"loss, {name} + {rows} on {grid or 'a wave of'} blocks")
        assert_bitwise_equal(other_grad, grad, f"gradient, {name} + {rows} on {grid or 'a wave of'} blocks")
    if layout in ("long-rows", "wide-rows", "longer-rows", "pixels", "pixels-32"):
        other_loss, other_grad = run(shift=1)  # 4 or 2 bytes into a 16-byte block
        assert_bitwise_equal(other_loss, loss, "loss, logits not 16-byte aligned")
        assert_bitwise_equal(other_grad, grad, "gradient, logits not 16-byte aligned")


@cuda_kernels
def test_cuda_device_mismatch():
    x = torch.randn(4, 3, device="cuda")
    with pytest.raises(ValueError, match="targets is on cpu but inputs are on cuda"):
        focal.sigmoid_focal_loss(x, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="weight is on cpu but inputs are on cuda"):
        focal.sigmoid_focal_loss(x, torch.zeros_like(x), weight=torch.ones(3))


@cuda_kernels
def test_cuda_empty_and_single_element():
    for shape in [(0, 5), (5, 0), (1, 1), (1,)]:
        x = torch.randn(shape, device="cuda", requires_grad=True)
        t = torch.rand(shape, device="cuda")
        loss = focal.sigmoid_focal_loss(x, t)
        loss.sum().backward()
        torch.testing.assert_close(loss.detach(), reference.sigmoid_focal_loss(x.detach(), t), rtol=1e-5, atol=1e-7)
        assert focal.sigmoid_focal_loss(x, t, reduction="sum").item() == pytest.approx(loss.sum().item(), rel=1e-5)


@cuda_kernels
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_gpu():
    x = torch.randn(8, 4, device="cuda:1", requires_grad=True)
    ids = torch.randint(-1, 4, (8,), device="cuda:1")
    loss = focal.sigmoid_focal_loss(x, ids, reduction="sum")
    loss.backward()
    assert loss.device == x.grad.device == torch.device("cuda:1")
    expected = focal.sigmoid_focal_loss(x.detach().cpu(), ids.cpu(), reduction="sum")
    torch.testing.assert_close(loss.detach().cpu(), expected, rtol=1e-5, atol=0)


@cuda_kernels
@pytest.mark.parametrize("numel", [37 * 1000 + 3, 3 * 1000 * 1000 + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_reduced_sum_is_cubs_order_bitwise(dtype, numel):
    """The model of the kernels' summation order in tests/cuda_cases.py, which the CPU emulation
    follows (tests/cuda_emulation), holds on the GPU bit for bit."""
    g = torch.Generator().manual_seed(7)
    x_cpu = make_logits((numel, 1), dtype, g)
    t = make_targets("soft", x_cpu, g).cuda()
    x = x_cpu.cuda()
    op = torch.ops.focal.sigmoid_focal_loss.default
    common = (None, None, None, 0.25, 2.0, 0.0, -100)
    unscaled, _ = op(x, t, *common, "none", 1.0, False)  # scale 1: the kernel's own per-element losses
    total, _ = op(x, t, *common, "sum", 1.0, False)
    multiprocessors = torch.cuda.get_device_properties(x.device).multi_processor_count
    model = cuda_reduced_sum(unscaled.cpu(), dtype, grid_blocks(numel, dtype, multiprocessors))
    assert_bitwise_equal(total.cpu(), model, "GPU sum vs model of its order")


@cuda_kernels
def test_cuda_scale_grad_by_one_device_value_never_syncs():
    """scale_grad_ reads a one-value grad_output on the device: no host sync, 1 leaves grad as is."""
    grad = torch.randn(1000, 10, device="cuda")
    before = grad.clone()
    one, two = torch.ones((), device="cuda"), torch.full((1,), 2.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.focal.scale_grad_(grad, one)
        torch.ops.focal.scale_grad_(grad, two)
        torch.ops.focal.scale_grad_(grad, one.expand(1000, 10))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(grad, before * 2)


@cuda_kernels
@pytest.mark.parametrize("norm_dtype", [torch.int64, torch.float16, torch.float64], ids=str)
def test_cuda_device_normalizer_of_any_real_dtype(norm_dtype):
    """A normaliser on the device is read by the kernels in its own dtype: bitwise scale = 1 / n."""
    g = torch.Generator().manual_seed(6)
    x = make_logits((400, 9), torch.float32, g)
    ids = make_targets("ids", x, g)
    x, ids = x.cuda(), ids.cuda()
    op = torch.ops.focal.sigmoid_focal_loss.default
    for reduction in ("none", "sum", "mean"):
        common = (None, None)
        want = op(x, ids, *common, None, 0.25, 2.0, 0.0, -100, reduction, 1 / 7, True)
        got = op(x, ids, *common, torch.tensor(7, dtype=norm_dtype, device="cuda"), 0.25, 2.0, 0.0, -100,
                 reduction, 1.0, True)
        assert_bitwise_equal(got[0].cpu(), want[0].cpu(), f"{reduction} loss")
        assert_bitwise_equal(got[1].cpu(), want[1].cpu(), f"{reduction} grad")


@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fcos_box_losses_on_cuda_agree_with_the_cpu(dtype):
    """The fused FCOS box terms: gradients as the CPU's (the same float64 math, which nvcc may contract
    into multiply-adds), sums to float64 rounding, a normaliser read on the device; an out-of-range
    match gives NaN, not an error."""
    from fcos_box_cases import problem

    codes, ctrness, anchors, gt_boxes, matched = problem(n=4, locations=3000, boxes=6, dtype=dtype)
    args = (codes, ctrness, anchors, gt_boxes, matched)
    want = torch.ops.focal.fcos_box_losses(*args, torch.tensor(17), True)
    got = torch.ops.focal.fcos_box_losses(*(t.cuda() for t in args), torch.tensor(17, device="cuda"), True)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6  # every output is in the math dtype
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), w, rtol=tolerance, atol=tolerance * w.abs().max())
    matched[0, 0] = 6
    giou, centerness, _, _ = torch.ops.focal.fcos_box_losses(*(t.cuda() for t in args), None, True)
    assert giou.isnan() and centerness.isnan()
