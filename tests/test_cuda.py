"""CUDA-only behaviour. Everything shared with the CPU runs through the `device` fixture elsewhere;
this file holds what only a GPU can show: no host syncs, CPU/GPU agreement, and the build error."""

from __future__ import annotations

import math

import pytest
import torch

import focal
import focal.ops
from bitwise import assert_bitwise_equal
from cuda_cases import cuda_reduced_sum, grid_blocks, make_logits, make_targets
from focal import reference

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA tests need a visible GPU (torch.cuda.is_available() is False)"
)
CUDA_KERNEL_BUILT = "cuda" in focal.ops.KERNEL_DEVICE_TYPES


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


@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["hard", "soft", "ids"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 1.5])
def test_cuda_matches_cpu(dtype, kind, gamma):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 37, generator=g) * 4).to(dtype)
    if kind == "ids":
        t = torch.randint(-1, 37, (300,), generator=g)
        t[::7] = -100
    else:
        t = torch.rand(300, 37, generator=g).to(dtype)
        t = t.round() if kind == "hard" else t
    weight = torch.rand(37, generator=g).to(dtype)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for reduction in ("none", "sum", "mean"):
        results = []
        for device in ("cpu", "cuda"):
            xd = x.to(device).requires_grad_()
            loss = focal.sigmoid_focal_loss(xd, t.to(device), 0.25, gamma, reduction, weight=weight.to(device),
                                            label_smoothing=0.1)
            loss.sum().backward()
            assert loss.device.type == device and xd.grad.device.type == device
            results.append((loss.detach().cpu(), xd.grad.cpu()))
        (cpu_loss, cpu_grad), (cuda_loss, cuda_grad) = results
        assert cuda_loss.dtype == cpu_loss.dtype
        torch.testing.assert_close(cuda_loss, cpu_loss, rtol=tol, atol=tol * 1e-3)
        torch.testing.assert_close(cuda_grad, cpu_grad, rtol=tol, atol=tol * 1e-3)


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
def test_cuda_reduction_is_bitwise_reproducible(reduction):
    x = torch.randn(4096, 80, device="cuda")
    ids = torch.randint(-1, 80, (4096,), device="cuda")
    first = focal.sigmoid_focal_loss(x, ids, reduction=reduction)
    for _ in range(3):
        assert torch.equal(focal.sigmoid_focal_loss(x, ids, reduction=reduction), first)


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
