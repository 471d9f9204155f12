"""The CPU op's output buffers: reused for a repeated shape, bounded over many shapes, released on demand.

Outputs of 4 MB and more live in huge-page buffers of the extension's own, of which at most two freed
ones are kept (see csrc/cpu/hugepage_alloc.cpp). Memory is read as the process's resident set size.
"""

from __future__ import annotations

import sys

import pytest
import torch

from focal.memory import empty_cache

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="the huge-page buffers and /proc/self/status (resident memory) exist on Linux only",
)

OP = torch.ops.focal.sigmoid_focal_loss.default
MB = 1 << 20
COLS = 80
ROWS_25MB = 80000  # 80000 x 80 float32 = 25.6 MB: a large gradient, as RetinaNet's


def _rss() -> int:
    """Resident memory of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def _call(logits, ids, reduction="sum"):
    return OP(logits, ids, None, None, None, 0.25, 2.0, 0.0, -100, reduction, 1.0, True)


def _inputs(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, COLS, generator=g) * 4
    ids = torch.randint(-1, COLS, (rows,), generator=g)
    ids[::7] = -100  # ignored rows: the kernel must overwrite a reused buffer there too
    return logits, ids


def test_repeated_shape_reuses_the_freed_gradient_buffer():
    empty_cache()
    logits, ids = _inputs(20000)  # 6.4 MB gradient
    grad = _call(logits, ids)[1]
    address = grad.data_ptr()
    del grad
    again = _call(logits, ids)[1]
    assert again.data_ptr() == address
    # A buffer in use is never handed out a second time.
    other = _call(logits, ids)[1]
    assert other.data_ptr() != again.data_ptr()


def test_reused_buffer_holds_only_the_new_result():
    empty_cache()
    logits, ids = _inputs(20000, seed=1)
    new_logits, new_ids = _inputs(20000, seed=2)
    stale = _call(logits, ids)[1]
    address = stale.data_ptr()
    del stale
    reused = _call(new_logits, new_ids)[1]
    assert reused.data_ptr() == address
    empty_cache()
    fresh = _call(new_logits, new_ids)[1]
    assert torch.equal(reused, fresh)


def test_reduction_none_reuses_both_loss_and_gradient():
    empty_cache()
    logits, ids = _inputs(20000)
    loss, grad = _call(logits, ids, "none")
    addresses = {loss.data_ptr(), grad.data_ptr()}
    del loss, grad
    loss, grad = _call(logits, ids, "none")
    assert {loss.data_ptr(), grad.data_ptr()} == addresses


def test_memory_stays_bounded_over_many_shapes():
    # 12 gradients of distinct sizes (30 MB down to 8 MB, one huge page apart, 228 MB in all), each
    # freed at once, as in training with varying image sizes.
    sizes = [(30 - 2 * k) * MB for k in range(12)]
    rows = [size // (COLS * 4) for size in sizes]
    logits, ids = _inputs(max(rows))
    empty_cache()
    before = _rss()
    for r in rows:
        # Contiguous views of one input: the only large allocations are the op's gradients.
        _call(logits[:r], ids[:r])
    grown = _rss() - before
    # The last two freed buffers at most (plus a few MB of unrelated noise), not one per shape.
    assert grown < sizes[-1] + sizes[-2] + 8 * MB, f"grew by {grown / MB:.0f} MB over {len(rows)} shapes"
    empty_cache()
    assert _rss() - before < 8 * MB, f"{(_rss() - before) / MB:.0f} MB still held after empty_cache()"


def test_empty_cache_returns_a_cached_buffer():
    logits, ids = _inputs(ROWS_25MB)
    empty_cache()
    _call(logits, ids)  # its gradient, freed at once, stays cached
    cached = _rss()
    empty_cache()
    released = cached - _rss()
    assert released > 0.9 * ROWS_25MB * COLS * 4, f"released only {released / MB:.1f} MB"


def test_shape_change_releases_the_cached_buffers():
    logits, ids = _inputs(ROWS_25MB + 6400)
    empty_cache()
    _call(logits[:ROWS_25MB], ids[:ROWS_25MB])
    one_cached = _rss()
    _call(logits, ids)  # 2 MB larger: the cached buffer does not fit and is released
    grown = _rss() - one_cached
    assert grown < 8 * MB, f"the old buffer was kept next to the new one ({grown / MB:.0f} MB more)"
    empty_cache()
