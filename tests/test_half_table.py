"""The CPU lookup-table kernel for bfloat16 / float16 logits with class ids.

Large launches of 16-bit logits with class ids and no weights serve background rows from a table of
the direct kernel's own results for all 65536 logit values (csrc/cpu/focal_table_kernel.cpp). Its
contract is to change nothing but the speed: every output, the reduced loss included, must be
bitwise what the direct kernel computes (FOCAL_CPU_TABLE=0 forces the direct kernel).
"""

from __future__ import annotations

import math

import pytest
import torch

import focal
from focal import _C
from bitwise import assert_bitwise_equal

HALF_DTYPES = [torch.bfloat16, torch.float16]
MIN_ELEMENTS = 1 << 19  # half_table.cpp's threshold, on the elements of background rows


def make_batch(dtype, cols, rows=None, seed=0, non_finite=False):
    """Logits around the background prior with some saturated values (and, if asked, NaN and
    infinities in background rows); class ids that are mostly background (-1), with some positives
    and some ignored rows (-100)."""
    rows = rows or int(MIN_ELEMENTS / cols / 0.9) + 8  # about 95 % background rows
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 3 - 4
    x.view(-1)[::997] = 30.0
    x.view(-1)[1::1009] = -30.0
    kind = torch.rand(rows, generator=g)
    ids = torch.full((rows,), -1)
    positive = kind < 0.02
    ids[positive] = torch.randint(0, cols, (int(positive.sum()),), generator=g)
    ids[(kind >= 0.02) & (kind < 0.05)] = -100
    if non_finite:
        x[5, 0], x[6, min(1, cols - 1)], x[7, cols - 1] = math.nan, math.inf, -math.inf
        ids[5:8] = -1  # served by the table
    return x.to(dtype), ids


def run(x, ids, monkeypatch, table: bool, requires_grad=True, **kwargs):
    """Loss and gradient through the public API; whether the table kernel served the launch."""
    if table:
        monkeypatch.delenv("FOCAL_CPU_TABLE", raising=False)
    else:
        monkeypatch.setenv("FOCAL_CPU_TABLE", "0")
    x = x.clone().requires_grad_(requires_grad)
    before = _C._half_table_launches()
    loss = focal.sigmoid_focal_loss(x, ids, **kwargs)
    used = _C._half_table_launches() > before
    grad = None
    if requires_grad:
        (loss if loss.dim() == 0 else loss.sum()).backward()
        grad = x.grad
    return loss.detach(), grad, used


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 2.5])
@pytest.mark.parametrize("cols", [80, 37, 4, 1])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_table_kernel_is_bitwise_the_direct_kernel(monkeypatch, dtype, cols, gamma, reduction):
    x, ids = make_batch(dtype, cols, seed=cols)
    kwargs = dict(alpha=0.25, gamma=gamma, reduction=reduction)
    if reduction != "mean":
        kwargs["normalizer"] = torch.tensor(37.0)
    loss_t, grad_t, used_t = run(x, ids, monkeypatch, table=True, **kwargs)
    loss_d, grad_d, used_d = run(x, ids, monkeypatch, table=False, **kwargs)
    assert used_t and not used_d
    if reduction == "none":
        assert_bitwise_equal(loss_t, loss_d, "loss")
    else:
        assert loss_t.dtype == torch.float32 and torch.isfinite(loss_t)
        assert torch.equal(loss_t, loss_d)
    assert_bitwise_equal(grad_t, grad_d, "grad")


@pytest.mark.parametrize("gamma", [0.0, 2.0, 2.5])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_table_kernel_keeps_nan_and_infinities(monkeypatch, dtype, gamma):
    x, ids = make_batch(dtype, 80, seed=4, non_finite=True)
    loss_t, grad_t, used = run(x, ids, monkeypatch, table=True, gamma=gamma, reduction="none")
    loss_d, grad_d, _ = run(x, ids, monkeypatch, table=False, gamma=gamma, reduction="none")
    assert used
    assert torch.isnan(loss_t[5, 0]) and torch.isnan(grad_t[5, 0])
    assert_bitwise_equal(loss_t, loss_d, "loss")
    assert_bitwise_equal(grad_t, grad_d, "grad")
    summed, _, _ = run(x, ids, monkeypatch, table=True, gamma=gamma, reduction="sum")
    assert torch.isnan(summed)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_table_kernel_without_gradient_and_without_alpha(monkeypatch, dtype, reduction):
    x, ids = make_batch(dtype, 80, seed=1)
    for alpha in (None, 0.9):
        kwargs = dict(requires_grad=False, alpha=alpha, reduction=reduction)
        loss_t, _, used = run(x, ids, monkeypatch, table=True, **kwargs)
        loss_d, _, _ = run(x, ids, monkeypatch, table=False, **kwargs)
        assert used
        if reduction == "sum":
            assert torch.isfinite(loss_t) and torch.equal(loss_t, loss_d)
        else:
            assert_bitwise_equal(loss_t, loss_d, "loss")


def test_table_kernel_from_several_python_threads(monkeypatch):
    """Each calling thread fills its own table: concurrent launches with different scales (their
    tables differ) give what they give one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    x, ids = make_batch(torch.bfloat16, 80, seed=5)
    normalizers = [torch.tensor(float(n)) for n in (3, 5, 7, 11, 13, 17)]

    def launch(norm):
        loss, grad, used = run(x, ids, monkeypatch, table=True, reduction="sum", normalizer=norm)
        return loss, grad, used

    alone = [launch(n) for n in normalizers]
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(launch, normalizers * 2))
    for i, (loss, grad, used) in enumerate(together):
        want = alone[i % len(normalizers)]
        assert used and torch.equal(loss, want[0]) and torch.equal(grad, want[1])


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_table_kernel_gives_the_same_sum_for_any_thread_count(monkeypatch, dtype):
    x, ids = make_batch(dtype, 80, seed=2)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(x, ids, monkeypatch, table=True, reduction="sum")[:2])
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize(
    "case",
    ["float32", "float targets", "label smoothing", "class weight", "anchor weight", "small", "no background"],
)
def test_table_kernel_serves_only_what_it_can(monkeypatch, case):
    """Weights, smoothing, float targets and other dtypes change what a background element's
    output depends on; launches with few background elements do not pay for the table. All of these
    take the direct kernel."""
    x, ids = make_batch(torch.bfloat16, 80, seed=3)
    kwargs = {}
    if case == "float32":
        x = x.float()
    elif case == "float targets":
        ids = (ids.unsqueeze(1) == torch.arange(80)).to(x.dtype)
    elif case == "label smoothing":
        kwargs["label_smoothing"] = 0.1
    elif case == "class weight":
        kwargs["weight"] = torch.linspace(0.5, 1.5, 80).to(x.dtype)
    elif case == "anchor weight":
        kwargs["weight"] = torch.rand(x.shape[0], 1).to(x.dtype)
    elif case == "no background":  # every row a positive: nothing for the table to serve
        ids = torch.arange(x.shape[0]) % 80
    elif case == "small":
        x, ids = x[:100], ids[:100]
    _, _, used = run(x, ids, monkeypatch, table=True, reduction="sum", **kwargs)
    assert not used
