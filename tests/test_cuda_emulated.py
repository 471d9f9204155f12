"""The CUDA kernels, executed without a GPU: csrc/cuda compiled as host C++ against a CUDA emulation,
with AddressSanitizer and UBSan (csrc/cuda/README.md says what this can and cannot show).

The emulated backend is built once per source state (tests/cuda_emulation/build_emulation.py) and
its checks (tests/cuda_emulation/emulated_checks.py, oracle_checks.py) run in a separate interpreter
with the ASan runtime preloaded (tests/cuda_emulation/run_checks.py); any failed check or sanitizer
report fails this test. That process starts when the test session does (tests/background.py), at a
lower priority, so that it takes the core the rest of the suite leaves idle, and these tests run
last. A second test builds the loss kernel with deliberate faults and asserts that the sanitizers
report them, so that a clean run of the first means something.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

import background
from cuda_emulation import build_emulation, run_checks

AVAILABLE = sys.platform == "linux" and shutil.which(build_emulation.CXX) is not None
pytestmark = pytest.mark.skipif(
    not AVAILABLE, reason=f"the CUDA emulation needs Linux and {build_emulation.CXX} with AddressSanitizer"
)

# Build, then checks, beside the rest of the suite (tests/background.py).
CHECKS = background.Job(lambda folder: [sys.executable, run_checks.__file__])


def _build(fn, *args):
    try:
        return fn(*args)
    except build_emulation.BuildError as error:
        pytest.fail(f"building the emulated CUDA backend failed:\n{str(error)[-6000:]}", pytrace=False)


@pytest.mark.background(CHECKS)
def test_cuda_kernels_under_emulation_and_sanitizers():
    done = CHECKS.result(timeout=1800)
    if done.returncode == run_checks.BUILD_FAILED:
        pytest.fail(done.output, pytrace=False)
    text = done.stdout
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    assert done.returncode == 0, f"emulated CUDA checks failed (exit {done.returncode}):\n{done.output[-12000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 200, f"too few checks ran: {summary}"
    assert "failed" not in summary and "error" not in summary, summary


@pytest.mark.parametrize(
    ("fault", "report"),
    [
        ("tail", r"AddressSanitizer: heap-buffer-overflow.*\n(READ|WRITE) of size 16"),
        ("align", r"runtime error: .*misaligned address .* which requires 16 byte alignment"),
    ],
)
def test_sanitizers_catch_a_broken_kernel(fault, report):
    """The loss kernel with 128-bit accesses on its last, partial pack (tail) or on pointers that
    are not 16-byte aligned (align) fails with the sanitizer's report; built without the fault, the
    same program over the same buffers runs clean."""
    clean = subprocess.run([_build(build_emulation.build_fault_program, None)], capture_output=True, text=True,
                           timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    broken = subprocess.run([_build(build_emulation.build_fault_program, fault)], capture_output=True, text=True,
                            timeout=120)
    assert broken.returncode != 0
    assert re.search(report, broken.stderr), broken.stderr[-4000:]
    assert "focal_kernel" in broken.stderr  # the report points into the kernel
