"""Bit-for-bit comparison of tensors, shared by the tests that promise identical outputs."""

from __future__ import annotations

import torch

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same dtype, shape and bit patterns, except that any NaN matches any NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    got_nan, want_nan = torch.isnan(got), torch.isnan(want)
    assert torch.equal(got_nan, want_nan), f"{what}: NaN at different positions"
    bits = _BITS[got.element_size()]
    bad = (got.view(bits) != want.view(bits)) & ~got_nan
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} values differ, first at {i}: {got[tuple(i)].item()!r} "
            f"!= {want[tuple(i)].item()!r}"
        )
