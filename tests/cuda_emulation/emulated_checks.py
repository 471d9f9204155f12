"""The CUDA backend's kernels and host code, run on the CPU emulation (csrc/cuda/README.md).

Run by tests/test_cuda_emulated.py in a separate interpreter with the AddressSanitizer runtime
preloaded; FOCAL_EMU_LIBRARY names the library it built. The main test session does not collect
this file (its name does not match test_*.py): loading the library needs that runtime.

The emulated op ``torch.ops.focal_emu.sigmoid_focal_loss`` is compared with the CPU op
``torch.ops.focal.sigmoid_focal_loss`` (the same math over another libm: a few ulps apart) and with
``focal.reference`` in float64. Kernel launches and the elements they touch are read from the
emulation's counters.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os

import pytest
import torch

import focal  # noqa: F401  (loads focal._C, whose CPU op is the comparison)
from bitwise import assert_bitwise_equal
from cuda_cases import (
    DTYPES,
    GAMMAS,
    REDUCTIONS,
    WARP,
    accumulation_dtype,
    assert_close_ulps,
    cuda_reduced_sum,
    grid_blocks,
    make_logits,
    make_targets,
    softmax_reduced_sum,
    softmax_tiles,
    summation_error_bound,
    vector_width,
)
from cuda_family_cases import FAMILY, IGNORE, FamilyCall, family_targets
from focal import reference

torch.ops.load_library(os.environ["FOCAL_EMU_LIBRARY"])
EMU = torch.ops.focal_emu
CPU = torch.ops.focal
MULTIPROCESSORS = EMU.emulated_multiprocessors()

# Agreement with the CPU op (the same math over another libm's exp and log), in ulps of the logits'
# dtype: losses elementwise (float32: pow's exp(gamma log q) turns one rounding of its argument into
# up to |gamma log q| ulps), gradients also relative to their largest value (see assert_close_ulps).
# 16-bit outputs are rounded from float32 math: one ulp apart at most.
LOSS_ULPS = {torch.float32: 32, torch.float64: 8, torch.float16: 1, torch.bfloat16: 1}
GRAD_ULPS = {torch.float32: 8, torch.float64: 8, torch.float16: 1, torch.bfloat16: 1}
# Against focal.reference in float64, in ulps of REFERENCE_DTYPE: the reference forms 1 - p_t by
# cancellation, so at saturated logits it is itself only float32-accurate.
REFERENCE_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float32, torch.float16: torch.float16,
                   torch.bfloat16: torch.bfloat16}
KINDS = ["hard", "soft", "ids", "ids_smoothed"]
WEIGHTS = ["none", "class", "full", "row"]
NORMALIZERS = ["none", "number", "cpu_tensor", "device_tensor"]


@contextlib.contextmanager
def scalars_on_device():
    """One-value tensors (normaliser, grad_output) count as device memory in this block."""
    old = EMU.set_scalars_on_device(True)
    try:
        yield
    finally:
        EMU.set_scalars_on_device(old)


def counted(fn):
    """fn()'s result, the kernel launches it made and the elements its kernels touched."""
    EMU.reset_emulation_counters()
    out = fn()
    launches, elements = EMU.emulation_counters()
    return out, launches, elements


def loss_op(op, x, t, *, weight=None, row_weight=None, normalizer=None, alpha=0.25, gamma=2.0, smoothing=0.0,
            ignore_index=-100, reduction="none", scale=1.0, compute_grad=True):
    return op.sigmoid_focal_loss(x, t, weight, row_weight, normalizer, alpha, gamma, smoothing, ignore_index,
                                 reduction, scale, compute_grad)


def expected(x, t, *, weight=None, row_weight=None, normalizer=None, alpha=0.25, gamma=2.0, smoothing=0.0,
             ignore_index=-100, reduction="none", scale=1.0):
    """Loss and d(loss)/d(logits) (of loss.sum() for "none") by focal.reference in float64."""
    xd = x.double().requires_grad_()
    td = t.double() if t.is_floating_point() else t
    w = None if weight is None else weight.double()
    if row_weight is not None:
        rw = row_weight.double().unsqueeze(-1)
        w = rw if w is None else w * rw
    norm = None if normalizer is None else float(normalizer)
    loss = reference.sigmoid_focal_loss(xd, td, alpha, gamma, reduction, weight=w, normalizer=norm,
                                        ignore_index=ignore_index, label_smoothing=smoothing) * scale
    (grad,) = torch.autograd.grad(loss.sum(), xd)
    return loss.detach(), grad


def assert_reduced_close(got, want, dtype, numel, what, terms_dtype=None):
    """A reduced loss within the error bound of the GPU's summation order, plus LOSS_ULPS of
    `terms_dtype` (default: the accumulation dtype) for the error of the terms themselves."""
    blocks = grid_blocks(numel, dtype, MULTIPROCESSORS)
    terms_dtype = terms_dtype or accumulation_dtype(dtype)
    rtol = summation_error_bound(numel, dtype, blocks) + LOSS_ULPS[terms_dtype] * torch.finfo(terms_dtype).eps
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=0, equal_nan=True, msg=what)


# ---- The matrix -----------------------------------------------------------------------------------

MATRIX = list(itertools.product(DTYPES, KINDS, GAMMAS, REDUCTIONS))


@pytest.mark.parametrize(("dtype", "kind", "gamma", "reduction"), MATRIX, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_cpu_op_and_reference(dtype, kind, gamma, reduction):
    """Every dtype, target kind, gamma path and reduction. The weight's form (none, (C,), full, per
    row) rotates so that each meets every dtype and target kind, the normaliser's (none, a number,
    a CPU tensor, a device tensor) so that each meets every dtype and reduction; alpha is 0.25 or
    off (-1)."""
    i = MATRIX.index((dtype, kind, gamma, reduction))
    g = torch.Generator().manual_seed(i)
    cols = (37, 5, 80, 13)[i % 4]
    x = make_logits((61, cols), dtype, g)
    t = make_targets("ids" if kind.startswith("ids") else kind, x, g)
    smoothing = 0.1 if kind in ("soft", "ids_smoothed") else 0.0
    weight_mode = WEIGHTS[(i // 3) % 4]
    norm_mode = NORMALIZERS[(i // 16 + i) % 4]
    kwargs = dict(alpha=-1.0 if i % 3 == 0 else 0.25, gamma=gamma, smoothing=smoothing, reduction=reduction)
    if weight_mode == "class":
        kwargs["weight"] = torch.rand(cols, generator=g, dtype=torch.float64).add(0.5).to(dtype)
    elif weight_mode == "full":
        kwargs["weight"] = torch.rand(x.shape, generator=g, dtype=torch.float64).add(0.5).to(dtype)
    elif weight_mode == "row":
        kwargs["row_weight"] = torch.rand(x.shape[:-1], generator=g, dtype=torch.float64).add(0.5).to(dtype)
    norm_value = 3.0
    op_kwargs = dict(kwargs)
    if norm_mode == "number":
        op_kwargs["scale"] = 1.0 / norm_value
    elif norm_mode != "none":
        op_kwargs["normalizer"] = torch.tensor(norm_value)

    with scalars_on_device() if norm_mode == "device_tensor" else contextlib.nullcontext():
        emu_loss, emu_grad = loss_op(EMU, x, t, **op_kwargs)
    cpu_loss, cpu_grad = loss_op(CPU, x, t, **op_kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "smoothing"}
    ref_loss, ref_grad = expected(x, t, smoothing=smoothing, normalizer=None if norm_mode == "none" else norm_value,
                                  **ref_kwargs)

    assert emu_loss.dtype == cpu_loss.dtype and emu_grad.dtype == dtype
    ref_dtype = REFERENCE_DTYPE[dtype]
    assert_close_ulps(emu_grad, cpu_grad, dtype, GRAD_ULPS[dtype], "grad vs CPU op", normwise=True)
    assert_close_ulps(emu_grad, ref_grad, ref_dtype, GRAD_ULPS[ref_dtype], "grad vs reference", normwise=True)
    if reduction == "none":
        assert_close_ulps(emu_loss, cpu_loss, dtype, LOSS_ULPS[dtype], "loss vs CPU op")
        assert_close_ulps(emu_loss, ref_loss, ref_dtype, LOSS_ULPS[ref_dtype], "loss vs reference")
    else:
        assert emu_loss.shape == ()
        assert_reduced_close(emu_loss, cpu_loss, dtype, x.numel(), "loss vs CPU op")
        # float32 terms for every dtype: the op's 16-bit math and the reference's own accuracy
        assert_reduced_close(emu_loss, ref_loss, dtype, x.numel(), "loss vs reference", torch.float32)


def test_logits_of_any_rank():
    g = torch.Generator().manual_seed(1)
    x = make_logits((2, 3, 7), torch.float32, g)
    ids = make_targets("ids", x, g)
    for reduction in REDUCTIONS:
        emu = loss_op(EMU, x, ids, reduction=reduction)
        cpu = loss_op(CPU, x, ids, reduction=reduction)
        assert emu[0].shape == cpu[0].shape and emu[1].shape == x.shape
        assert_close_ulps(emu[1], cpu[1], torch.float32, GRAD_ULPS[torch.float32], f"{reduction} grad", normwise=True)


def test_argument_checks_are_the_shared_ones():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="logits must be contiguous"):
        loss_op(EMU, x.t(), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="reduction must be"):
        loss_op(EMU, x, torch.zeros_like(x), reduction="avg")


# ---- Memory access: alignment, tails, grid-stride loops, empty inputs -------------------------------

@pytest.mark.parametrize("kind", ["soft", "ids"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_inputs_take_element_accesses_with_the_same_results(dtype, kind):
    """Logits (and float targets) one element past a 16-byte boundary: the kernel must not use its
    128-bit accesses, and must compute exactly what it computes for an aligned copy."""
    g = torch.Generator().manual_seed(2)
    rows, cols = 23, 11
    x_storage = make_logits(rows * cols + 1, dtype, g)
    x = x_storage[1:].view(rows, cols)
    t = make_targets(kind, x.contiguous(), g)
    if kind == "soft":
        t_storage = torch.cat([t.new_zeros(1), t.reshape(-1)])
        t = t_storage[1:].view(rows, cols)
        assert t.data_ptr() % 16 != 0
    assert x.data_ptr() % 16 != 0 and x.is_contiguous()
    for reduction in REDUCTIONS:
        loss, grad = loss_op(EMU, x, t, reduction=reduction, gamma=1.5, smoothing=0.05)
        aligned_loss, aligned_grad = loss_op(EMU, x.clone(), t.clone(), reduction=reduction, gamma=1.5, smoothing=0.05)
        assert_bitwise_equal(loss, aligned_loss, f"{reduction} loss")
        assert_bitwise_equal(grad, aligned_grad, f"{reduction} grad")
        cpu_grad = loss_op(CPU, x, t, reduction=reduction, gamma=1.5, smoothing=0.05)[1]
        assert_close_ulps(grad, cpu_grad, dtype, GRAD_ULPS[dtype], f"{reduction} grad vs CPU op", normwise=True)


def _sizes(dtype):
    vec = vector_width(dtype)
    one_pass = MULTIPROCESSORS * (3 if dtype == torch.float64 else 4) * 256 * vec
    # Around the pack width, and grid-stride loops of two and three passes ending in a partial pack.
    return [1, vec - 1, vec, vec + 1, 3 * vec + 1, 2 * one_pass + vec + 1, 3 * one_pass - 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_element_once_at_any_size(dtype):
    g = torch.Generator().manual_seed(3)
    for numel in _sizes(dtype):
        x = make_logits((numel, 1), dtype, g)
        t = make_targets("soft", x, g)
        (loss, grad), launches, elements = counted(lambda: loss_op(EMU, x, t))
        assert (launches, elements) == (1, numel), numel
        cpu_loss, cpu_grad = loss_op(CPU, x, t)
        assert_close_ulps(loss, cpu_loss, dtype, LOSS_ULPS[dtype], f"loss, {numel} elements")
        assert_close_ulps(grad, cpu_grad, dtype, GRAD_ULPS[dtype], f"grad, {numel} elements", normwise=True)
        (total, no_grad), launches, elements = counted(lambda: loss_op(EMU, x, t, reduction="sum", compute_grad=False))
        assert (launches, elements) == (2, numel), numel
        assert no_grad.shape == (0,)
        assert_reduced_close(total, loss_op(CPU, x, t, reduction="sum")[0], dtype, numel, f"sum of {numel}")


# ---- The class-id kernel (focal_ids_kernel) ------------------------------------------------------

def test_class_id_kernel_alpha_one_ignores_negatives_even_when_their_sum_overflows():
    """alpha = 1 weighs negatives by 0: huge negative losses (whose float32 sum overflows) add 0, as
    on the CPU, not inf * 0 = NaN."""
    x = torch.full((64, 80), 3e38)
    ids = torch.full((64,), -1)
    ids[5] = 3
    total, _ = loss_op(EMU, x, ids, alpha=1.0, reduction="sum")
    cpu_total, _ = loss_op(CPU, x, ids, alpha=1.0, reduction="sum")
    assert torch.isfinite(total) and torch.isfinite(cpu_total)
    torch.testing.assert_close(total, cpu_total, rtol=1e-6, atol=0)


def _ids_with_every_case(rows, cols, g, ignore_index=-100):
    """Class ids with a positive at every column (chunk starts, ends and middles), background rows,
    ignored rows and, when asked for, invalid ids."""
    ids = torch.randint(-1, cols, (rows,), generator=g)
    ids[: min(rows, cols)] = torch.arange(min(rows, cols))
    ids[cols::5] = -1
    ids[cols + 1 :: 11] = ignore_index
    return ids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [1, 3, 8, 16, 17, 80, 203])
def test_class_id_kernel_over_row_layouts(dtype, cols):
    """Reduced class-id losses take the roofline kernel: chunks of two packs that may straddle rows,
    hold the positive anywhere, or end in a partial tail; every element counted once, results as the
    CPU op's, gradients too."""
    g = torch.Generator().manual_seed(cols)
    chunk = 2 * vector_width(dtype)
    for rows in (1, 7, 3 * chunk + 1, 1 + MULTIPROCESSORS * 4 * 256 * chunk // cols):
        x = make_logits((rows, cols), dtype, g)
        ids = _ids_with_every_case(rows, cols, g)
        for reduction, gamma in (("sum", 2.0), ("mean", 1.5), ("sum", 0.0), ("mean", 1.0)):
            (loss, grad), launches, elements = counted(lambda: loss_op(EMU, x, ids, reduction=reduction, gamma=gamma))
            assert elements == rows * cols, (rows, cols)
            assert launches == (3 if reduction == "mean" else 2)
            cpu_loss, cpu_grad = loss_op(CPU, x, ids, reduction=reduction, gamma=gamma)
            what = f"{rows}x{cols} {reduction} gamma={gamma}"
            assert_reduced_close(loss, cpu_loss, dtype, x.numel(), "loss vs CPU op, " + what,
                                 torch.float32 if dtype != torch.float64 else None)
            assert_close_ulps(grad, cpu_grad, dtype, GRAD_ULPS[dtype], "grad vs CPU op, " + what, normwise=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ignore_index", [-100, -2, 80, -(2**40)])
def test_class_id_kernel_ignored_rows_are_exact_zeros_whatever_their_logits(dtype, ignore_index):
    """The roofline kernel keeps ignored rows in its fast loop: their gradient is exactly 0 and
    their loss absent even where the logits are inf or NaN, as on the CPU, whether ignore_index is
    below -1 or at or past the class count (where an id that is not ignored is invalid), or outside
    int32 (the general kernel's case: the roofline kernel tests ids in 32 bits)."""
    g = torch.Generator().manual_seed(11)
    x = make_logits((300, 80), dtype, g)
    ids = _ids_with_every_case(300, 80, g, ignore_index=ignore_index)
    ignored = ids == ignore_index
    rows = ignored.nonzero().flatten()[:3]
    x[rows[0]] = float("nan")
    x[rows[1]] = float("inf")
    x[rows[2]] = -float("inf")
    for compute_grad in (True, False):
        kwargs = dict(reduction="sum", compute_grad=compute_grad, ignore_index=ignore_index)
        total, grad = loss_op(EMU, x, ids, **kwargs)
        cpu_total, cpu_grad = loss_op(CPU, x, ids, **kwargs)
        assert torch.isfinite(total)
        assert_reduced_close(total, cpu_total, dtype, x.numel(), "loss vs CPU op",
                             torch.float32 if dtype != torch.float64 else None)
        if compute_grad:
            assert (grad[ignored] == 0).all() and torch.isfinite(grad).all()
            assert_close_ulps(grad, cpu_grad, dtype, GRAD_ULPS[dtype], "grad vs CPU op", normwise=True)
        else:
            assert grad.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_class_id_kernel_invalid_ids_poison_their_rows(dtype):
    g = torch.Generator().manual_seed(5)
    x = make_logits((300, 80), dtype, g)
    ids = _ids_with_every_case(300, 80, g)
    ids[17], ids[250], ids[251] = 80, -7, 2**63 - 1  # out of range, the last without signed overflow
    # Out of range, whose lower 32 bits are a class, background, the ignore_index (the kernel tests
    # ids in 32 bits) or a column of their own row.
    poisoned = [17, 250, 251, 40, 41, 42, 43, 44]
    ids[poisoned[3:]] = torch.tensor([2**32 + 5, 2**32 - 1, 2**32 - 100, -(2**32) + 3, 2**33 + 44])
    total, grad = loss_op(EMU, x, ids, reduction="sum")
    assert torch.isnan(total)
    bad = torch.zeros(300, dtype=torch.bool)
    bad[poisoned] = True
    assert torch.isnan(grad[bad]).all() and not torch.isnan(grad[~bad]).any()
    ok_total, ok_grad = loss_op(CPU, x[~bad], ids[~bad], reduction="sum")
    assert_close_ulps(grad[~bad], ok_grad, dtype, GRAD_ULPS[dtype], "grad of the valid rows", normwise=True)


# Class ids need logits of at least one dimension plus the classes: not (0,).
@pytest.mark.parametrize("kind, shape", [("soft", (0, 5)), ("soft", (4, 0)), ("soft", (0,)), ("ids", (0, 5)),
                                         ("ids", (4, 0))], ids=str)
def test_empty_inputs_launch_nothing(shape, kind):
    x = torch.randn(shape)
    t = torch.full(shape[:-1], -1, dtype=torch.long) if kind == "ids" else torch.rand(shape)
    for reduction in REDUCTIONS:
        (loss, grad), launches, _ = counted(lambda: loss_op(EMU, x, t, reduction=reduction))
        cpu_loss, cpu_grad = loss_op(CPU, x, t, reduction=reduction)
        assert launches == 0
        assert loss.shape == cpu_loss.shape and grad.shape == x.shape
        torch.testing.assert_close(loss, cpu_loss, equal_nan=True)  # "mean": NaN for float targets, 0 for ids


# ---- Class ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_invalid_class_ids_give_nan_rows_not_an_error(dtype):
    """The GPU cannot raise without a host sync: an id outside [-1, C) poisons its row instead."""
    g = torch.Generator().manual_seed(4)
    x = make_logits((6, 5), dtype, g)
    ids = torch.tensor([0, 5, -1, -2, 4, -100])
    loss, grad = loss_op(EMU, x, ids)
    bad = torch.tensor([False, True, False, True, False, False])
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
    cpu_loss, cpu_grad = loss_op(CPU, x[~bad], ids[~bad])
    assert_close_ulps(loss[~bad], cpu_loss, dtype, LOSS_ULPS[dtype], "loss of the valid rows")
    assert_close_ulps(grad[~bad], cpu_grad, dtype, GRAD_ULPS[dtype], "grad of the valid rows", normwise=True)
    for reduction in ("sum", "mean"):
        assert math.isnan(loss_op(EMU, x, ids, reduction=reduction)[0].item())
    with pytest.raises(ValueError, match="out of range"):  # the CPU op checks on the host
        loss_op(CPU, x, ids)


def test_class_id_mean_counts_rows_on_the_device():
    """"mean" over class ids divides by the rows that are not ignored, counted by one extra launch."""
    g = torch.Generator().manual_seed(5)
    x = make_logits((50, 7), torch.float32, g)
    ids = make_targets("ids", x, g)
    (loss, grad), launches, _ = counted(lambda: loss_op(EMU, x, ids, reduction="mean"))
    assert launches == 3  # count, loss, sum of the tile sums
    cpu_loss, cpu_grad = loss_op(CPU, x, ids, reduction="mean")
    assert_reduced_close(loss, cpu_loss, torch.float32, x.numel(), "mean")
    assert_close_ulps(grad, cpu_grad, torch.float32, GRAD_ULPS[torch.float32], "grad", normwise=True)
    all_ignored = torch.full((50,), -100)
    loss, grad = loss_op(EMU, x, all_ignored, reduction="mean")
    assert loss.item() == 0 and not grad.any()


# ---- The scale: a number, a normaliser on the host or on the device ---------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "norm_dtype",
    [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
     torch.uint8, torch.uint16],
    ids=str,
)
def test_normalizer_on_host_or_device_equals_the_scale(norm_dtype, reduction):
    """A normaliser read on the host (CPU tensor) or by the kernels (device tensor, any real dtype)
    gives bitwise what scale = 1 / normaliser gives, and the device one costs no extra launch."""
    g = torch.Generator().manual_seed(6)
    x = make_logits((40, 9), torch.float32, g)
    ids = make_targets("ids", x, g)
    normalizer = torch.tensor(7, dtype=norm_dtype)
    want_loss, want_grad = loss_op(EMU, x, ids, reduction=reduction, scale=1 / 7)
    (host_loss, host_grad), host_launches, _ = counted(lambda: loss_op(EMU, x, ids, reduction=reduction,
                                                                       normalizer=normalizer))
    with scalars_on_device():
        (dev_loss, dev_grad), dev_launches, _ = counted(lambda: loss_op(EMU, x, ids, reduction=reduction,
                                                                        normalizer=normalizer))
    for what, got in (("host", (host_loss, host_grad)), ("device", (dev_loss, dev_grad))):
        assert_bitwise_equal(got[0], want_loss, f"{what} normaliser, loss")
        assert_bitwise_equal(got[1], want_grad, f"{what} normaliser, grad")
    assert dev_launches == host_launches == {"none": 1, "sum": 2, "mean": 3}[reduction]


@pytest.mark.parametrize("value", [0.0, -3.0, math.nan, math.inf])
def test_invalid_normalizer_on_device_poisons_the_result(value):
    """The host checks a CPU normaliser; one on the device is never read there (that would wait for
    the GPU), so an invalid value turns loss and gradient into NaN instead of raising."""
    x = torch.randn(8, 4)
    t = torch.rand(8, 4)
    normalizer = torch.tensor(value)
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        loss_op(EMU, x, t, normalizer=normalizer)
    with scalars_on_device():
        loss, grad = loss_op(EMU, x, t, normalizer=normalizer)
        total, _ = loss_op(EMU, x, t, normalizer=normalizer, reduction="sum")
    assert torch.isnan(loss).all() and torch.isnan(grad).all() and torch.isnan(total)


# ---- Reductions: CUB's order, bitwise ----------------------------------------------------------------

@pytest.mark.parametrize("numel", [1000, 37 * 1000 + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reduced_sum_is_cubs_order_bitwise(dtype, numel):
    """The sum equals, bit for bit, the model of the kernels' order in tests/cuda_cases.py (per-thread
    grid-stride sums, CUB's warp-shuffle tree, warps in order, then the same over the blocks), run
    after run. For the larger input a plain left-to-right sum differs, so the comparison can fail."""
    g = torch.Generator().manual_seed(7)
    x = make_logits((numel, 1), dtype, g)
    t = make_targets("soft", x, g)
    unscaled, _ = loss_op(EMU, x, t, compute_grad=False)  # scale 1: the kernel's own per-element losses
    total, _ = loss_op(EMU, x, t, reduction="sum", compute_grad=False)
    model = cuda_reduced_sum(unscaled, dtype, grid_blocks(numel, dtype, MULTIPROCESSORS))
    assert_bitwise_equal(total, model, "sum vs model of the CUDA order")
    for _ in range(3):
        assert_bitwise_equal(loss_op(EMU, x, t, reduction="sum", compute_grad=False)[0], total, "repeat")
    if numel > 1000:
        sequential = torch.zeros((), dtype=accumulation_dtype(dtype))
        for v in unscaled.reshape(-1):
            sequential = sequential + v
        assert not torch.equal(sequential, total)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_sum_of_16_bit_logits_is_repeatable(dtype):
    g = torch.Generator().manual_seed(8)
    x = make_logits((3000, 13), dtype, g)
    ids = make_targets("ids", x, g)
    first, _ = loss_op(EMU, x, ids, reduction="mean")
    for _ in range(3):
        assert_bitwise_equal(loss_op(EMU, x, ids, reduction="mean")[0], first, "repeat")


# ---- Launch shapes and grid sizes: the same bits ----------------------------------------------------

LAUNCH_SHAPES = {"t256_f64_b4": 256, "t128_f32_b12": 128, "t256_f64_b6": 256}  # name -> threads per block
RING_SHAPE = "t256_f64_b6"  # the launch shape whose kernels stream whole tiles through shared memory
GRIDS = [None, 1]  # FOCAL_CUDA_GRID: one wave (8, 12 or 24 blocks on the 2 emulated SMs, by shape), one block


@contextlib.contextmanager
def environment(**values):
    """The environment variables named, set for the block (None: unset), then as they were."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch_shape(name, grid):
    """The roofline kernels in launch shape `name` on a grid of `grid` blocks (None: as chosen)."""
    return environment(FOCAL_CUDA_VARIANT=name, FOCAL_CUDA_GRID=grid)


def _every_launch(dtype, call, whole_tiles=False):
    """call() in every launch shape and grid size: the loss kernel's launch as asked, and the
    results, which must be bitwise those of the first. Only RING_SHAPE copies through shared memory
    (cp.async), and with `whole_tiles` (a roofline kernel's data of a whole tile a lane or more) it
    must."""
    first = None
    shapes = list(LAUNCH_SHAPES)[:1] if dtype == torch.float64 else LAUNCH_SHAPES  # float64: one shape
    for name, grid in itertools.product(shapes, GRIDS):
        with launch_shape(name, grid):
            EMU.reset_emulation_counters()
            got = call()
            shapes = EMU.emulated_launch_shapes()
            launches = list(zip(shapes[::2], shapes[1::2]))
            # The loss kernel's: the only launch, or the one before the sum of its tiles.
            blocks, threads = launches[-2] if len(launches) > 1 else launches[0]
            copies = sum(EMU.emulated_async_copies())
        # float64 has one launch shape of its own; the grid is the one asked for, or one wave.
        assert threads == (256 if dtype == torch.float64 else LAUNCH_SHAPES[name]), (name, threads)
        assert grid is None or blocks <= grid, (name, grid, blocks)
        assert (copies > 0) == (whole_tiles and name == RING_SHAPE and dtype != torch.float64), (name, copies)
        if first is None:
            first = got
            continue
        for a, b, what in zip(got, first, ("loss", "grad")):
            assert_bitwise_equal(a, b, f"{what}, {name} on {grid or 'one wave of'} blocks")
    return first


def _tiles_past_a_block(dtype):
    """Tiles enough that on a grid of one block some warps take two (the smallest block, of the
    launch shapes dtype has, holds this many warps minus one)."""
    return 9 if dtype == torch.float64 else 1 + min(LAUNCH_SHAPES.values()) // 32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_id_sums_and_gradients_are_the_same_bits_in_every_launch_shape_and_grid(dtype):
    """focal_ids_kernel: sizes that are not a whole number of tiles, rows that end inside a pack,
    positives at every column, background and ignored rows; sum and mean, with and without the
    gradient and a row weight, gamma 2 and 1.5; all bit for bit the same in every launch shape and
    on one block or a wave of them. Rows of 80 give packs within rows, 37 packs
    across row ends."""
    g = torch.Generator().manual_seed(21)
    tile = 32 * 16 * vector_width(dtype)
    for rows, cols in ((_tiles_past_a_block(dtype) * tile // 80 + 3, 80), (tile // 37 + 5, 37), (5, 3)):
        x = make_logits((rows, cols), dtype, g)
        ids = _ids_with_every_case(rows, cols, g)
        row_weight = torch.rand(rows, generator=g, dtype=torch.float64).add(0.5).to(dtype)
        for reduction, gamma, compute_grad, rw in (("sum", 2.0, True, None), ("sum", 1.5, True, row_weight),
                                                   ("mean", 1.5, False, None)):
            loss, grad = _every_launch(dtype, lambda: loss_op(EMU, x, ids, reduction=reduction, gamma=gamma,
                                                              row_weight=rw, compute_grad=compute_grad),
                                       whole_tiles=x.numel() >= tile)
            cpu_loss, cpu_grad = loss_op(CPU, x, ids, reduction=reduction, gamma=gamma, row_weight=rw)
            what = f"{rows}x{cols} {reduction}{' row-weighted' if rw is not None else ''}"
            assert_reduced_close(loss, cpu_loss, dtype, x.numel(), what + " vs CPU op",
                                 torch.float32 if dtype != torch.float64 else None)
            if compute_grad:
                assert_close_ulps(grad, cpu_grad, dtype, GRAD_ULPS[dtype], what + " grad vs CPU op", normwise=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float_target_sums_and_gradients_are_the_same_bits_in_every_launch_shape_and_grid(dtype):
    """focal_float_kernel: soft targets over sizes that end in a partial pack and a partial tile,
    every reduction (loss elements too for "none"), all bit for bit the same in every launch shape
    and grid size, and the sum bitwise the model of its order in tests/cuda_cases.py. With label
    smoothing the general kernel takes them (256 threads whatever the shape)."""
    g = torch.Generator().manual_seed(22)
    tile = 32 * 16 * vector_width(dtype)
    for numel in (_tiles_past_a_block(dtype) * tile + 3 * vector_width(dtype) + 1, 5):
        x = make_logits((numel, 1), dtype, g)
        t = make_targets("soft", x, g)
        for reduction in REDUCTIONS:
            _every_launch(dtype, lambda: loss_op(EMU, x, t, reduction=reduction, gamma=1.5), whole_tiles=numel >= tile)
        with launch_shape("t128_f32_b12", None):
            EMU.reset_emulation_counters()
            loss_op(EMU, x, t, reduction="sum", gamma=1.5, smoothing=0.1)
            assert EMU.emulated_launch_shapes()[1] == 256
        if dtype in (torch.float32, torch.float64):
            unscaled, _ = loss_op(EMU, x, t, compute_grad=False)
            total, _ = loss_op(EMU, x, t, reduction="sum", compute_grad=False)
            assert_bitwise_equal(total, cuda_reduced_sum(unscaled, dtype), "sum vs model of its order")


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float_targets_of_negative_zero_give_the_bits_of_positive_zero(dtype, gamma):
    """focal_float_kernel passes a target as it is (no smoothing's t (1 - 0) + 0 / 2 there): -0 must
    give what +0 gives, bit for bit, at every logit (0, -0, tiny, large, infinite, NaN) and every
    alpha (none, 1, 0.25), loss elements and gradient."""
    specials = [0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 20.0, -20.0, 100.0, -100.0, 1e30, -1e30,
                float("inf"), float("-inf"), float("nan")]
    x = torch.tensor(specials * 8, dtype=torch.float64).reshape(-1, 8).to(dtype)
    t = torch.zeros_like(x)
    for alpha in (-1.0, 1.0, 0.25):
        for reduction in ("none", "sum"):
            with launch_shape("t128_f32_b12", None):  # the float kernel's own shape: 128 threads
                EMU.reset_emulation_counters()
                positive = loss_op(EMU, x, t, alpha=alpha, gamma=gamma, reduction=reduction)
                assert EMU.emulated_launch_shapes()[1] == (256 if dtype == torch.float64 else 128)
                negative = loss_op(EMU, x, -t, alpha=alpha, gamma=gamma, reduction=reduction)
            for a, b, what in zip(negative, positive, ("loss", "grad")):
                assert_bitwise_equal(a, b, f"{what} of -0 targets, alpha {alpha}, {reduction}")


def test_launch_shape_override_is_checked():
    x = make_logits((4, 80), torch.float32, torch.Generator().manual_seed(1))
    ids = torch.zeros(4, dtype=torch.long)
    with launch_shape("t999", None), pytest.raises(RuntimeError, match="FOCAL_CUDA_VARIANT=t999 is not a variant"):
        loss_op(EMU, x, ids, reduction="sum")
    with launch_shape("t256_f64_b4", 0), pytest.raises(RuntimeError, match="FOCAL_CUDA_GRID=0 is not a number"):
        loss_op(EMU, x, ids, reduction="sum")


# ---- scale_grad_ ----------------------------------------------------------------------------------

def _grad(dtype, numel=1000):
    return make_logits((numel // 10, 10), dtype, torch.Generator().manual_seed(9))


ONE_VALUE_FORMS = {
    "0-dim": lambda v: torch.tensor(v),
    "(1,)": lambda v: torch.tensor([v]),
    "expanded": lambda v: torch.tensor(v).expand(100, 10),
}


@pytest.mark.parametrize("form", list(ONE_VALUE_FORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad_by_one_on_device_makes_no_pass(dtype, form):
    """grad_output = 1 on the device (loss.backward()): one launch whose threads all return at once."""
    grad = _grad(dtype)
    before = grad.clone()
    with scalars_on_device():
        _, launches, elements = counted(lambda: EMU.scale_grad_(grad, ONE_VALUE_FORMS[form](1.0)))
    assert (launches, elements) == (1, 0)
    assert_bitwise_equal(grad, before, "grad")


@pytest.mark.parametrize("value", [2.0, 0.3, 1.0 + 2**-12])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad_by_a_device_value_is_one_pass(dtype, value):
    """Any other value: one pass over grad, rounding the value to grad's dtype and multiplying in
    the math type, as ATen's mul_ by a one-value CUDA tensor does (1 + 2^-12 rounds to 1 in
    bfloat16 and float16: the pass then leaves grad unchanged)."""
    grad = _grad(dtype)
    math_dtype = accumulation_dtype(dtype)
    want = (grad.to(math_dtype) * torch.tensor(value).to(dtype).to(math_dtype)).to(dtype)
    with scalars_on_device():
        _, launches, elements = counted(lambda: EMU.scale_grad_(grad, torch.tensor(value)))
    rounds_to_one = torch.tensor(value).to(dtype).item() == 1
    assert (launches, elements) == (1, 0 if rounds_to_one else grad.numel())
    assert_bitwise_equal(grad, want, "grad")


def test_scale_grad_with_a_cpu_scalar_reads_it_on_the_host():
    grad = _grad(torch.float32)
    before = grad.clone()
    _, launches, elements = counted(lambda: EMU.scale_grad_(grad, torch.tensor(1.0)))
    assert (launches, elements) == (0, 0)
    assert_bitwise_equal(grad, before, "grad by 1")
    EMU.scale_grad_(grad, torch.tensor(0.5))
    assert_bitwise_equal(grad, before * 0.5, "grad by 0.5")


def test_scale_grad_by_a_full_tensor_multiplies():
    grad = _grad(torch.float32)
    grad_output = torch.rand(grad.shape)
    want = grad * grad_output
    with scalars_on_device():
        _, launches, _ = counted(lambda: EMU.scale_grad_(grad, grad_output))
    assert launches == 0  # ATen's mul_
    assert_bitwise_equal(grad, want, "grad")


def test_scale_grad_of_empty_or_strided_grad():
    with scalars_on_device():
        empty = torch.empty(0, 5)
        _, launches, _ = counted(lambda: EMU.scale_grad_(empty, torch.tensor(3.0)))
        assert launches == 0
        base = _grad(torch.float32)
        strided = base.t()  # not contiguous: ATen's mul_
        want = strided * 3
        _, launches, _ = counted(lambda: EMU.scale_grad_(strided, torch.tensor(3.0)))
        assert launches == 0
        assert_bitwise_equal(strided, want, "strided grad")


# ---- The family: FL*, QFL, VFL --------------------------------------------------------------------

FAMILY_MATRIX = [
    (loss, dtype, kind, param, reduction)
    for loss, (kinds, params) in FAMILY.items()
    for dtype in DTYPES
    for kind in kinds
    for param in params
    for reduction in REDUCTIONS
]


@pytest.mark.parametrize(("loss", "dtype", "kind", "param", "reduction"), FAMILY_MATRIX,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_family_matches_cpu_op_and_reference(loss, dtype, kind, param, reduction):
    """FL*, QFL and VFL through the general kernel: every dtype, target form, hyper-parameter path and
    reduction, with the weight's and normaliser's forms rotating as in the focal loss's matrix."""
    i = FAMILY_MATRIX.index((loss, dtype, kind, param, reduction))
    g = torch.Generator().manual_seed(1000 + i)
    cols = (37, 5, 80, 13)[i % 4]
    x = make_logits((61, cols), dtype, g)
    targets, scores, smoothing = family_targets(loss, kind, x, g)
    call = FamilyCall(loss, x, targets, scores, param, alpha=(0.25 if loss == "star" else 0.75) if i % 3 else -1.0,
                      smoothing=smoothing, reduction=reduction)
    if loss == "varifocal" and call.alpha < 0:
        call.alpha = 1.0
    weight_mode = WEIGHTS[(i // 3) % 4]
    if weight_mode == "class":
        call.weight = torch.rand(cols, generator=g, dtype=torch.float64).add(0.5).to(dtype)
    elif weight_mode == "full":
        call.weight = torch.rand(x.shape, generator=g, dtype=torch.float64).add(0.5).to(dtype)
    elif weight_mode == "row":
        call.row_weight = torch.rand(x.shape[:-1], generator=g, dtype=torch.float64).add(0.5).to(dtype)
    norm_mode = NORMALIZERS[(i // 16 + i) % 4]
    norm_value = None if norm_mode == "none" else 3.0
    if norm_mode == "number":
        call.scale = 1.0 / norm_value
    elif norm_mode != "none":
        call.normalizer = torch.tensor(norm_value)

    with scalars_on_device() if norm_mode == "device_tensor" else contextlib.nullcontext():
        emu_loss, emu_grad = call.run(EMU)
    cpu_loss, cpu_grad = call.run(CPU)
    call.scale = 1.0  # the reference divides by the normaliser itself
    ref_loss, ref_grad = call.expected(norm_value)

    assert emu_loss.dtype == cpu_loss.dtype and emu_grad.dtype == dtype
    ref_dtype = REFERENCE_DTYPE[dtype]
    assert_close_ulps(emu_grad, cpu_grad, dtype, GRAD_ULPS[dtype], "grad vs CPU op", normwise=True)
    assert_close_ulps(emu_grad, ref_grad, ref_dtype, GRAD_ULPS[ref_dtype], "grad vs reference", normwise=True)
    if reduction == "none":
        # QFL's |p - t|^beta near p = t is a difference of two values of the loss's size: its
        # relative error there is that of p over |p - t|, so it is bounded normwise.
        normwise = loss == "quality"
        assert_close_ulps(emu_loss, cpu_loss, dtype, LOSS_ULPS[dtype], "loss vs CPU op", normwise=normwise)
        assert_close_ulps(emu_loss, ref_loss, ref_dtype, LOSS_ULPS[ref_dtype], "loss vs reference", normwise=normwise)
    else:
        assert emu_loss.shape == ()
        assert_reduced_close(emu_loss, cpu_loss, dtype, x.numel(), "loss vs CPU op")
        assert_reduced_close(emu_loss, ref_loss, dtype, x.numel(), "loss vs reference", torch.float32)


@pytest.mark.parametrize("loss", list(FAMILY))
def test_family_invalid_class_ids_poison_their_rows_and_ignored_rows_are_zero(loss):
    """On the device an invalid class id cannot raise without a sync: its row's loss and gradient are
    NaN; an ignored row's are exact zeros, its score never read (NaN there changes nothing)."""
    g = torch.Generator().manual_seed(7)
    x = make_logits((9, 6), torch.float32, g)
    kind = "ids" if loss == "star" else "pair"
    targets, scores, _ = family_targets(loss, kind, x, g)
    targets[:] = torch.tensor([0, 5, -1, 6, IGNORE, 2, -2, IGNORE, 1])
    if scores is not None:
        scores[4] = float("nan")  # ignored: unread
    param = FAMILY[loss][1][0]
    loss_none, grad = FamilyCall(loss, x, targets, scores, param, alpha=0.5).run(EMU)
    bad = torch.tensor([3, 6])
    assert loss_none[bad].isnan().all() and grad[bad].isnan().all()
    good = torch.tensor([0, 1, 2, 5, 8])
    assert loss_none[good].isfinite().all() and grad[good].isfinite().all()
    for row in (4, 7):
        assert (loss_none[row] == 0).all() and (grad[row] == 0).all()


@pytest.mark.parametrize("loss", ["quality", "varifocal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("cols", [1, 3, 17, 80])
def test_quality_losses_take_the_class_id_kernel_over_row_layouts(loss, dtype, cols):
    """QFL and VFL with class ids and scores, reduced: the case that focal_cuda.cu sends to the
    roofline class-id kernel (two launches: it and the sum of its tile sums; the mean's count a third), whose
    chunks may straddle rows or hold a positive anywhere: results as the CPU op's, every element
    counted once."""
    g = torch.Generator().manual_seed(cols)
    chunk = 2 * vector_width(dtype)
    sizes = (1, 7, 3 * chunk + 1) + ((1 + MULTIPROCESSORS * 4 * 256 * chunk // cols,) if cols == 80 else ())
    for rows in sizes:
        x = make_logits((rows, cols), dtype, g)
        ids = _ids_with_every_case(rows, cols, g)
        scores = torch.rand(rows, generator=g, dtype=torch.float64).to(dtype)
        for reduction, param in (("sum", 2.0), ("mean", 1.5), ("sum", 0.0), ("mean", 1.0)):
            call = FamilyCall(loss, x, ids, scores, param, alpha=0.75, reduction=reduction)
            (value, grad), launches, elements = counted(lambda: call.run(EMU))
            assert elements == rows * cols and launches == (3 if reduction == "mean" else 2), (rows, cols)
            cpu_value, cpu_grad = call.run(CPU)
            what = f"{loss} {rows}x{cols} {reduction} param={param}"
            assert_reduced_close(value, cpu_value, dtype, x.numel(), "loss vs CPU op, " + what,
                                 torch.float32 if dtype != torch.float64 else None)
            assert_close_ulps(grad, cpu_grad, dtype, GRAD_ULPS[dtype], "grad vs CPU op, " + what, normwise=True)
# ---- softmax_focal_loss ---------------------------------------------------------------------------
# The emulated op against the CPU op (the same math of csrc/softmax_math.h over another libm and
# another summation order) and against focal.reference in float64, over the three kernels: one thread
# per element (segmentation layouts, rows of up to 32 classes), 16 or 32 lanes per row (rows of up to
# 128 or 256 classes: "unbatched" too, with 16) and one block per row (longer rows).

SOFTMAX_SHAPES = {"rows-thread": (37, 20), "rows-warp": (11, 80), "rows-wide": (7, 200), "rows-block": (9, 300),
                  "segmentation": (3, 7, 5, 11), "unbatched": (45,)}
SOFTMAX_GAMMAS = [0.0, 1.0, 2.0, 2.5]
# Relative agreement of every output with the CPU op: float32 math rounded to the dtype.
SOFTMAX_RTOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _softmax_problem(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    d = 0 if len(shape) == 1 else 1
    t_shape = tuple(s for i, s in enumerate(shape) if i != d)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    idx = x.argmax(d, keepdim=True)  # a unique maximum per row: the reference's gradient needs it
    x = x.scatter(d, idx, x.gather(d, idx) + 1)
    t = torch.randint(0, shape[d], t_shape, generator=g)
    if t.dim() > 0:
        t = torch.where(torch.rand(t_shape, generator=g) < 0.2, torch.full_like(t, -100), t)
    return x, t


def _softmax_op(op, x, t, *, weight=None, alpha=None, normalizer=None, alpha_value=1.0, gamma=2.0, smoothing=0.0,
                ignore_index=-100, reduction="none", scale=1.0, compute_grad=True):
    return op.softmax_focal_loss(x, t, weight, alpha, normalizer, alpha_value, gamma, smoothing, ignore_index,
                                 reduction, scale, compute_grad)


def _assert_softmax_close(got, want, dtype, what):
    rtol = SOFTMAX_RTOL[dtype]
    scale = want.double().abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * scale + 1e-30, equal_nan=True,
                               msg=what)


SOFTMAX_MATRIX = list(itertools.product(DTYPES, SOFTMAX_SHAPES, SOFTMAX_GAMMAS, REDUCTIONS))


@pytest.mark.parametrize(("dtype", "layout", "gamma", "reduction"), SOFTMAX_MATRIX,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_softmax_matches_cpu_op_and_reference(dtype, layout, gamma, reduction):
    """Every dtype, kernel, gamma path and reduction; weight, alpha (number or tensor), smoothing and
    the normaliser's form rotate over the cases."""
    i = SOFTMAX_MATRIX.index((dtype, layout, gamma, reduction))
    shape = SOFTMAX_SHAPES[layout]
    classes = shape[0 if len(shape) == 1 else 1]
    x, t = _softmax_problem(shape, dtype, i)
    if layout == "unbatched" and i % 2:
        t = torch.tensor(3)
    g = torch.Generator().manual_seed(1000 + i)
    kwargs = dict(
        weight=[None, torch.rand(classes, generator=g) + 0.5][i % 2],
        alpha=[None, torch.rand(classes, generator=g)][(i // 2) % 2],
        alpha_value=[1.0, 0.25][(i // 4) % 2],
        smoothing=[0.0, 0.1, 0.0][i % 3],
        gamma=gamma,
        reduction=reduction,
    )
    normalizer = None if reduction == "mean" else [None, torch.tensor(3.0), torch.tensor([5], dtype=torch.int32)][i % 3]
    with scalars_on_device():
        (loss, grad), launches, elements = counted(lambda: _softmax_op(EMU, x, t, normalizer=normalizer, **kwargs))
    want_loss, want_grad = _softmax_op(CPU, x, t, normalizer=normalizer, **kwargs)
    assert loss.dtype == want_loss.dtype and loss.shape == want_loss.shape
    assert grad.dtype == dtype and grad.shape == x.shape
    _assert_softmax_close(loss, want_loss, dtype, "loss vs CPU op")
    _assert_softmax_close(grad, want_grad, dtype, "grad vs CPU op")
    assert launches == {"none": 1, "sum": 2, "mean": 3}[reduction]
    assert elements == x.numel()
    # and the float64 reference
    xd = x.double().requires_grad_()
    ref = reference.softmax_focal_loss(
        xd, t, kwargs["alpha"].double() if kwargs["alpha"] is not None else None, gamma, reduction,
        weight=None if kwargs["weight"] is None else kwargs["weight"].double(), label_smoothing=kwargs["smoothing"],
        normalizer=normalizer,
    ) * kwargs["alpha_value"]
    (ref_grad,) = torch.autograd.grad(ref.sum(), xd)
    loss_dtype = dtype if reduction == "none" else accumulation_dtype(dtype)
    _assert_softmax_close(loss, ref.detach(), loss_dtype, "loss vs reference")
    _assert_softmax_close(grad, ref_grad, dtype, "grad vs reference")


@pytest.mark.parametrize("layout", list(SOFTMAX_SHAPES))
def test_softmax_invalid_class_id_gives_nan_for_its_element(layout):
    """The CPU op raises; CUDA cannot check without a host sync, so the element's loss and gradient
    are NaN, and every other element is unaffected."""
    shape = SOFTMAX_SHAPES[layout]
    x, t = _softmax_problem(shape, torch.float32, 7)
    if t.dim() == 0:
        t = torch.tensor(shape[0] + 3)
    else:
        t = t.clone()
        t.view(-1)[1] = -5
    loss, grad = _softmax_op(EMU, x, t)
    d = 0 if len(shape) == 1 else 1
    bad = torch.zeros(t.shape, dtype=torch.bool)
    bad.view(-1)[1 if t.dim() else 0] = True
    assert torch.isnan(loss[bad]).all() and not torch.isnan(loss[~bad]).any()
    assert torch.isnan(grad.movedim(d, -1)[bad]).all() and not torch.isnan(grad.movedim(d, -1)[~bad]).any()
    assert torch.isnan(_softmax_op(EMU, x, t, reduction="mean")[0])


@pytest.mark.parametrize("layout", list(SOFTMAX_SHAPES))
def test_softmax_saturated_and_nan_logits(layout):
    shape = SOFTMAX_SHAPES[layout]
    x, t = _softmax_problem(shape, torch.float32, 11)
    x = torch.where(x > 0, torch.full_like(x, 1e4), torch.full_like(x, -1e4))
    idx = x.argmax(0 if len(shape) == 1 else 1, keepdim=True)
    x = x.scatter(0 if len(shape) == 1 else 1, idx, torch.full_like(idx, 2e4, dtype=x.dtype))
    for gamma in (0.0, 0.5, 2.0):
        for smoothing in (0.0, 0.1):
            loss, grad = _softmax_op(EMU, x, t, gamma=gamma, smoothing=smoothing)
            want_loss, want_grad = _softmax_op(CPU, x, t, gamma=gamma, smoothing=smoothing)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            _assert_softmax_close(loss, want_loss, torch.float32, "saturated loss")
            _assert_softmax_close(grad, want_grad, torch.float32, "saturated grad")
    x_nan = x.clone()
    x_nan.view(-1)[0] = math.nan
    loss, grad = _softmax_op(EMU, x_nan, t)
    want_loss, want_grad = _softmax_op(CPU, x_nan, t)
    assert torch.equal(torch.isnan(loss), torch.isnan(want_loss))
    assert torch.equal(torch.isnan(grad), torch.isnan(want_grad))


@pytest.mark.parametrize("classes", [33, 128, 129, 256, 257])
def test_softmax_rows_at_the_edges_of_each_kernel(classes):
    """Rows of 33 and 128 classes (16 lanes each), 129 and 256 (32 lanes), 257 (a block), one to
    eleven of them, against the CPU op: an ignore_index that is itself a class (0), and ids past
    either end, whose rows alone are NaN."""
    g = torch.Generator().manual_seed(classes)
    for rows, dtype, (gamma, smoothing) in itertools.product((1, 3, 11), (torch.float32, torch.bfloat16),
                                                             ((2.0, 0.0), (2.5, 0.1))):
        x = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
        t = torch.randint(0, classes, (rows,), generator=g)
        t[::4] = 0  # ignored below
        kwargs = dict(gamma=gamma, smoothing=smoothing, ignore_index=0)
        loss, grad = _softmax_op(EMU, x, t, **kwargs)
        want_loss, want_grad = _softmax_op(CPU, x, t, **kwargs)
        what = f"{rows} rows of {classes}, {dtype}, gamma {gamma}, smoothing {smoothing}"
        _assert_softmax_close(loss, want_loss, dtype, f"loss, {what}")
        _assert_softmax_close(grad, want_grad, dtype, f"grad, {what}")
        assert (loss[t == 0] == 0).all() and (grad[t == 0] == 0).all(), what
        if rows > 1:
            t[-1], t[1] = classes, -5
            bad_loss, bad_grad = _softmax_op(EMU, x, t, **kwargs)
            bad = torch.zeros(rows, dtype=torch.bool)
            bad[[1, rows - 1]] = True
            assert torch.isnan(bad_loss[bad]).all() and torch.isnan(bad_grad[bad]).all(), what
            # Every other row exactly as before: rows are independent.
            assert torch.equal(bad_loss[~bad], loss[~bad]) and torch.equal(bad_grad[~bad], grad[~bad]), what


def test_softmax_empty_and_all_ignored():
    for reduction in REDUCTIONS:
        loss, grad = _softmax_op(EMU, torch.empty(0, 5), torch.empty(0, dtype=torch.long), reduction=reduction)
        assert loss.numel() == (0 if reduction == "none" else 1) and grad.shape == (0, 5)
        if reduction != "none":
            assert loss.item() == 0
    x = torch.randn(6, 40)
    loss, grad = _softmax_op(EMU, x, torch.full((6,), -100), reduction="mean")
    assert loss.item() == 0 and torch.equal(grad, torch.zeros(6, 40))


# Variants of the softmax kernels, in pairs: the thread-per-element kernel's classes per load
# (kSoftmaxVariantNames) and the row kernels' registers or ring (kRowVariantNames).
SOFTMAX_VARIANTS = [("c1", "registers"), ("c16", "ring"), ("ring", "registers")]
# Shapes whose tiles (8 at most in the emulation) hold several warps' elements or several rows, and
# are more than a block's 4 warps, so that on a grid of one block a warp takes a second tile (and
# starts its sum afresh): 5 tiles of 2 warps' elements (300 rows of 20 classes; 297 pixels), 6 of 3
# rounds of 2 rows (16 lanes per row, 35 rows: the last tile's third round has one row), 5 of 2 rows
# (9 rows, 32 lanes per row; a block per row: the last tile has one). The "long" ones have tiles of
# more than 4 KiB of bfloat16 logits (16 KiB for a block per row), so that the row kernels' rings
# (4 KiB a warp, 16 KiB a block) wrap round in a tile, with rows of 117, 251 and 1501 classes,
# which start at every offset from a 16-byte block (the rings hold 16- and 32-bit logits: no float64, and two of the reductions, the
# emulated barriers of their many rows being what the checks spend most time on); rows of 2050
# classes are longer than the block's ring takes in float32 (8 KiB), not in bfloat16. Segmentation
# logits of 256 positions an image are those the thread-per-element kernel's ring takes in 16-byte
# pieces (whole units of 32 in an image): 21 classes are 6 steps a pass in float32, 3 in bfloat16,
# and a tile of 2 units 36 or 18 steps, round a ring of 8. Images of 99 and 180 positions have
# units that straddle two images, and a last unit in part, which its ring takes word by word
# (float32 both, bfloat16 the even one). Its ring takes rows of 20 classes too (each lane its own
# row, 6 or 4 steps a pass from the block of its first logit; the last unit has 12 rows).
SOFTMAX_TILED = {"rows-thread": (300, 20), "rows-warp": (35, 40), "rows-wide": (9, 200), "rows-block": (9, 300),
                 "segmentation": (3, 18, 9, 11), "rows-warp-long": (301, 117), "rows-wide-long": (65, 251),
                 "rows-block-long": (41, 1501), "rows-block-wide": (9, 2050), "segmentation-32": (2, 21, 8, 32),
                 "segmentation-even": (2, 18, 6, 30)}
SOFTMAX_LONG = ("rows-warp-long", "rows-wide-long", "rows-block-long")
SOFTMAX_NO_FLOAT64 = (*SOFTMAX_LONG, "segmentation-even")  # layouts whose float64 tests no ring
SOFTMAX_WARP_ROWS = {"rows-warp": 2, "rows-wide": 1, "rows-warp-long": 2, "rows-wide-long": 1}  # rows a round
SOFTMAX_BLOCK_ROWS = ("rows-block", "rows-block-long", "rows-block-wide")


def softmax_variant(name, grid):
    """The softmax kernels in variant `name` (a pair of SOFTMAX_VARIANTS, or the thread-per-element
    kernel's name alone) on a grid of `grid` blocks (None: as chosen)."""
    elements, rows = (name, None) if isinstance(name, str) else name
    return environment(FOCAL_CUDA_SOFTMAX_VARIANT=elements, FOCAL_CUDA_SOFTMAX_ROWS_VARIANT=rows,
                       FOCAL_CUDA_GRID=grid)


@pytest.mark.parametrize(("layout", "dtype"), [
    (layout, dtype) for layout in SOFTMAX_TILED for dtype in (torch.float32, torch.bfloat16, torch.float64)
    if not (layout in SOFTMAX_NO_FLOAT64 and dtype == torch.float64)], ids=str)
def test_softmax_sums_and_gradients_are_the_same_bits_in_every_variant_and_grid(layout, dtype):
    """Every kernel, every reduction, with and without smoothing and the gradient: the same bits
    in every variant (classes per load, registers or rings) and on one block, three or a wave of
    them, and the sum bitwise the model of its order in tests/cuda_cases.py (float32 and float64,
    where the unreduced losses are the unscaled ones)."""
    shape = SOFTMAX_TILED[layout]
    x, t = _softmax_problem(shape, dtype, 31)
    per_thread = layout not in (*SOFTMAX_WARP_ROWS, *SOFTMAX_BLOCK_ROWS)
    round_rows = SOFTMAX_WARP_ROWS.get(layout, 1)  # rows a warp takes at a time: 2 with 16 lanes per row
    items = t.numel() if per_thread else shape[0]
    per_tile, tiles = softmax_tiles(items, WARP if per_thread else round_rows)
    assert per_tile > 1 and tiles > 4, (per_tile, tiles)  # several units a tile, a second tile for a warp
    cases = (("sum", 0.0, True), ("sum", 0.1, False), ("mean", 0.1, True), ("none", 0.0, True))
    # The variants of the layout's kernel: the thread-per-element kernel's three, or the row kernels' two.
    variants = SOFTMAX_VARIANTS if per_thread else [("c1", "registers"), ("c1", "ring")]
    for reduction, smoothing, compute_grad in cases[::2] if layout in SOFTMAX_LONG else cases:
        first = None
        for name, grid in itertools.product(variants, [None, 1, 3]):
            with softmax_variant(name, grid):
                got = _softmax_op(EMU, x, t, reduction=reduction, smoothing=smoothing, gamma=1.5,
                                  compute_grad=compute_grad)
            if first is None:
                first = got
                continue
            for a, b, what in zip(got, first, ("loss", "grad")):
                assert_bitwise_equal(a, b, f"{layout} {reduction} {what}: {name} on {grid or 'a wave of'} blocks")
        if dtype != torch.bfloat16 and reduction == "sum":
            unscaled, _ = _softmax_op(EMU, x, t, smoothing=smoothing, gamma=1.5, compute_grad=False)
            assert_bitwise_equal(first[0], softmax_reduced_sum(unscaled, per_thread, round_rows),
                                 f"{layout} sum vs its order")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["rows-warp-long", "rows-block-long", "segmentation-32", "segmentation-even",
                                    "rows-thread"])
def test_softmax_ring_takes_logits_at_any_address(layout, dtype):
    """The rings copy whole 16-byte blocks: the row kernels' from the one that holds a tile's first
    logit, which may begin before the logits, and so the thread-per-element kernel's for each row;
    its pieces of segmentation logits, a class's 32 positions, must begin a block (its words, a
    4-byte word). Logits that start 4 or 2 bytes into a block (which the host sends to the kernels'
    other variants: a block before them may lie outside their memory; float32 segmentation logits
    to the ring's words, 2-byte aligned 16-bit ones to c1) give the same bits as aligned ones
    through the rings."""
    x, t = _softmax_problem(SOFTMAX_TILED[layout], dtype, 5)
    storage = torch.empty(x.numel() + 8, dtype=dtype)
    shifted = storage[1:1 + x.numel()].view(x.shape)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    with softmax_variant(("ring", "ring"), None):
        want = _softmax_op(EMU, x, t, reduction="sum")
        got = _softmax_op(EMU, shifted, t, reduction="sum")
    for a, b, what in zip(got, want, ("loss", "grad")):
        assert_bitwise_equal(a, b, f"{what}: logits at an odd address")


# Which logits the softmax kernels' rings take, by the size of the copies they make: 16 bytes (the
# thread-per-element kernel's pieces of a class's 32 positions and its rows' blocks; the row
# kernels' blocks of their rows), 4 (the thread-per-element kernel's words), or None (no ring: c1 or
# registers run). Logits (shape), their dtype, and how many elements into an aligned storage they start.
SOFTMAX_RING_ROUTES = [
    ((2, 21, 8, 32), torch.float32, 0, 16), ((2, 21, 8, 32), torch.float32, 1, 4),
    ((2, 21, 8, 32), torch.bfloat16, 0, 16), ((2, 21, 8, 32), torch.bfloat16, 2, 4),
    ((2, 21, 8, 32), torch.bfloat16, 1, None),  # 2 bytes off a word
    ((3, 18, 9, 11), torch.float32, 0, 4), ((3, 18, 9, 11), torch.bfloat16, 0, None),  # odd positions
    ((2, 1, 6, 30), torch.float16, 0, 4),  # one class: odd lanes copy nothing, read their neighbour's word
    ((3, 5, 4), torch.float32, 0, 4),  # a warp's 32 pixels in 8 images
    ((300, 20), torch.float32, 0, 16), ((300, 20), torch.float32, 1, None), ((3, 18, 9, 11), torch.float64, 0, None),
    ((35, 40), torch.float32, 0, 16), ((35, 40), torch.float32, 1, None), ((9, 200), torch.bfloat16, 0, 16),
    ((9, 300), torch.float16, 0, 16), ((9, 300), torch.float32, 1, None), ((9, 300), torch.float64, 0, None),
    ((3, 2050), torch.float32, 0, None), ((3, 2050), torch.bfloat16, 0, 16),  # 8200 and 4100 bytes a row
]


@pytest.mark.parametrize(("shape", "dtype", "shift", "copy_bytes"), SOFTMAX_RING_ROUTES, ids=str)
def test_softmax_rings_take_the_logits_they_name(shape, dtype, shift, copy_bytes):
    """In their ring variants the softmax kernels take the logits their hosts' conditions name (read
    from the emulated cp.async copies they make: a ring that silently never ran would pass every
    same-bits check), and give the other variants' bits."""
    x, t = _softmax_problem(shape, dtype, 3)
    storage = torch.empty(x.numel() + 8, dtype=dtype)
    assert storage.data_ptr() % 16 == 0
    x = storage[shift:shift + x.numel()].view(x.shape).copy_(x)
    with softmax_variant(("c1", "registers"), None):
        want = _softmax_op(EMU, x, t, reduction="sum")
    EMU.reset_emulation_counters()
    with softmax_variant(("ring", "ring"), None):
        got = _softmax_op(EMU, x, t, reduction="sum")
    copies = dict(zip((4, 8, 16), EMU.emulated_async_copies()))
    assert [size for size, n in copies.items() if n] == ([copy_bytes] if copy_bytes else []), copies
    for a, b, what in zip(got, want, ("loss", "grad")):
        assert_bitwise_equal(a, b, f"{what}: rings against c1 and registers")


def test_softmax_over_no_classes_reads_no_logit():
    """Logits with 0 classes: every class id not ignored is out of range, which CUDA cannot raise
    without a host sync, so its loss is NaN; an ignored one's is 0. Nothing outside memory is read
    (the sanitizers stop a read through the empty logits' null pointer)."""
    for shape, t in (((6, 0), torch.tensor([0, -100, 3, 0, -100, 1])),
                     ((2, 0, 3), torch.tensor([[0, -100, 0], [-100, 0, 0]]))):
        loss, grad = _softmax_op(EMU, torch.empty(shape), t)
        assert grad.shape == shape
        assert torch.equal(torch.isnan(loss), t != -100) and (loss[t == -100] == 0).all()


def test_softmax_variant_override_is_checked():
    x, t = _softmax_problem(SOFTMAX_SHAPES["rows-thread"], torch.float32, 1)
    with softmax_variant("c99", None), pytest.raises(
            RuntimeError, match=r"FOCAL_CUDA_SOFTMAX_VARIANT=c99 is not a variant of focal's CUDA kernels \(c1, c16, ring\)"):
        _softmax_op(EMU, x, t, reduction="sum")
    x, t = _softmax_problem(SOFTMAX_SHAPES["rows-thread"], torch.float32, 1)
    with softmax_variant(("c1", "rings"), None), pytest.raises(
            RuntimeError, match=r"FOCAL_CUDA_SOFTMAX_ROWS_VARIANT=rings is not a variant of focal's CUDA kernels "
                                r"\(registers, ring\)"):
        _softmax_op(EMU, x, t, reduction="sum")


# ---- The detection frameworks' label conventions -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_background_index_and_class_alpha_match_the_cpu_op(dtype):
    """Background marked C (mmdetection's and detectron2's labels) gives the bits of background
    marked -1, in every reduction; -1 is then an invalid id, a NaN row. A per-class alpha (the
    general kernel) gives the CPU op's results, for the focal loss and for VFL with scores."""
    g = torch.Generator().manual_seed(19)
    rows, cols = 300, 80
    x = make_logits((rows, cols), dtype, g)
    ids = _ids_with_every_case(rows, cols, g)
    marked = torch.where(ids == -1, torch.full_like(ids, cols), ids)
    alpha = torch.rand(cols, generator=g)
    scores = torch.rand(rows, generator=g).to(dtype)

    def fl(ops, targets, reduction, class_alpha=None, background_index=-1):
        return ops.sigmoid_focal_loss(x, targets, None, None, None, 0.25, 2.0, 0.0, -100, reduction, 1.0, True,
                                      class_alpha, background_index)

    def vfl(ops, reduction):
        return ops.varifocal_loss(x, marked, scores, None, None, None, -1.0, 2.0, -100, reduction, 1.0, True, alpha,
                                  cols)

    for reduction in REDUCTIONS:
        minus_one, c = fl(EMU, ids, reduction), fl(EMU, marked, reduction, background_index=cols)
        assert_bitwise_equal(c[0], minus_one[0], f"loss, {reduction}")
        assert_bitwise_equal(c[1], minus_one[1], f"grad, {reduction}")
        for call in (lambda ops: fl(ops, marked, reduction, alpha, cols), lambda ops: vfl(ops, reduction)):
            (loss, grad), (cpu_loss, cpu_grad) = call(EMU), call(CPU)
            if reduction == "none":
                assert_close_ulps(loss, cpu_loss, dtype, LOSS_ULPS[dtype], f"loss vs CPU op, {reduction}")
            else:
                assert_reduced_close(loss, cpu_loss, dtype, x.numel(), f"loss vs CPU op, {reduction}",
                                     torch.float32 if dtype != torch.float64 else None)
            assert_close_ulps(grad, cpu_grad, dtype, GRAD_ULPS[dtype], f"grad vs CPU op, {reduction}", normwise=True)
    total, grad = fl(EMU, ids, "sum", background_index=cols)  # -1 is no longer background
    assert torch.isnan(total)
    assert torch.isnan(grad[ids == -1]).all() and not torch.isnan(grad[ids != -1]).any()


# ---- FCOS box losses ------------------------------------------------------------------------------

@pytest.mark.parametrize("box_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fcos_box_losses_equal_the_cpu_op(dtype, box_dtype):
    """One launch over every location; the gradients are the CPU op's bit for bit (the same float64
    math), the sums agree to float64 rounding (ATen's sum on the device, an ordered loop on the CPU)."""
    from fcos_box_cases import problem

    codes, ctrness, anchors, gt_boxes, matched = problem(n=3, locations=700, boxes=4, dtype=dtype)
    args = (codes, ctrness, anchors.to(box_dtype), gt_boxes.to(box_dtype), matched)
    for normalize, normalizer in ((True, None), (False, torch.tensor(9)), (True, torch.tensor(2.5))):
        (*losses, grad_codes, grad_ctrness), launches, touched = counted(
            lambda: EMU.fcos_box_losses(*args, normalizer, normalize))
        *want, want_codes, want_ctrness = CPU.fcos_box_losses(*args, normalizer, normalize)
        assert launches == 1 and touched == matched.numel()
        for got, expected in zip(losses, want):
            assert got.dtype == expected.dtype and got.shape == ()
            torch.testing.assert_close(got, expected, rtol=1e-6 if dtype != torch.float64 else 1e-13, atol=0)
        assert_bitwise_equal(grad_codes, want_codes, "grad_codes")
        assert_bitwise_equal(grad_ctrness, want_ctrness, "grad_ctrness")
        if normalizer is not None:  # the same, read by the kernel from device memory
            with scalars_on_device():
                on_device = EMU.fcos_box_losses(*args, normalizer, normalize)
            for got, expected, what in zip(on_device, (*losses, grad_codes, grad_ctrness),
                                           ("giou", "centerness", "grad_codes", "grad_ctrness")):
                assert_bitwise_equal(got, expected, what)


def test_fcos_box_losses_out_of_range_match_gives_nan_not_an_error():
    """Checking the matcher's indices on the GPU would need a host sync: a bad one poisons the sums."""
    from fcos_box_cases import problem

    codes, ctrness, anchors, gt_boxes, matched = problem(n=2, locations=50, boxes=3)
    matched[0, 7] = 3
    giou, centerness, grad_codes, _ = EMU.fcos_box_losses(codes, ctrness, anchors, gt_boxes, matched, None, True)
    assert giou.isnan() and centerness.isnan() and grad_codes[0, 7].eq(0).all()


@pytest.mark.parametrize("value", [0.0, -3.0, math.nan, math.inf])
def test_fcos_box_losses_invalid_normalizer_on_device_poisons_the_result(value):
    from fcos_box_cases import problem

    codes, ctrness, anchors, gt_boxes, matched = problem(n=2, locations=50, boxes=3)
    with scalars_on_device():
        giou, centerness, grad_codes, _ = EMU.fcos_box_losses(
            codes, ctrness, anchors, gt_boxes, matched, torch.tensor(value), True)
    assert giou.isnan() and centerness.isnan() and grad_codes[matched >= 0].isnan().all()


def test_fcos_box_losses_of_no_location_launch_nothing():
    from fcos_box_cases import problem

    codes, ctrness, anchors, gt_boxes, matched = problem(n=2, locations=5, boxes=3)
    (giou, centerness, grad_codes, _), launches, _ = counted(lambda: EMU.fcos_box_losses(
        codes[:, :0], ctrness[:, :0], anchors[:, :0], gt_boxes, matched[:, :0], None, True))
    assert launches == 0 and giou.item() == 0 and centerness.item() == 0 and grad_codes.shape == (2, 0, 4)
