"""The CUDA backend, run on the CPU emulation, against the exact oracle: tests/test_op_vs_oracle.py's
rows (every loss of the family and kernel path, logits from -1e4 to the largest finite ones) in every
dtype, with README.md's bounds for CUDA (16-bit results: float32 math within 2^-15, rounded once;
bfloat16 results below 2^-126 may flush to 0).

Run like emulated_checks.py, whose docstring says how: in a separate interpreter with the
AddressSanitizer runtime preloaded and FOCAL_EMU_LIBRARY naming the emulated library.
"""

from __future__ import annotations

import os

import pytest
import torch

import focal  # noqa: F401  (the CPU ops, which the oracle's module imports)
from test_op_vs_oracle import BFLOAT16_FLUSH, failures, params

torch.ops.load_library(os.environ["FOCAL_EMU_LIBRARY"])
EMU = torch.ops.focal_emu


@pytest.mark.parametrize(("row", "dtype"), params())
def test_emulated_cuda_within_readme_precision_of_the_oracle(row, dtype):
    flush = BFLOAT16_FLUSH if dtype == torch.bfloat16 else 0.0
    found = failures(row, dtype, EMU, cuda=True, flush_below=flush)
    if found:
        pytest.fail(f"{row} {dtype} (emulated CUDA):\n" + "\n".join(found), pytrace=False)
