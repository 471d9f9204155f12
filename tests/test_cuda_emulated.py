"""The CUDA kernels, executed without a GPU: csrc/cuda compiled as host C++ against a CUDA emulation,
with AddressSanitizer and UBSan (csrc/cuda/README.md says what this can and cannot show).

The emulated backend is built once per source state (tests/cuda_emulation/build_emulation.py) and
its checks (tests/cuda_emulation/emulated_checks.py, oracle_checks.py) run in a separate interpreter
with the ASan runtime preloaded (tests/cuda_emulation/run_checks.py); any failed check or sanitizer
report fails this test. That process starts when the test session does (tests/conftest.py), at a
lower priority, so that it takes the core the rest of the suite leaves idle, and these tests run
last. A second test builds the loss kernel with deliberate faults and asserts that the sanitizers
report them, so that a clean run of the first means something.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from cuda_emulation import build_emulation, run_checks

AVAILABLE = sys.platform == "linux" and shutil.which(build_emulation.CXX) is not None
pytestmark = pytest.mark.skipif(
    not AVAILABLE, reason=f"the CUDA emulation needs Linux and {build_emulation.CXX} with AddressSanitizer"
)

_checks: tuple[subprocess.Popen, object] | None = None  # the running run_checks.py and its output file


def start_checks() -> None:
    """Starts run_checks.py (build, then checks) in the background, at nice 10, once per session."""
    global _checks
    if _checks is not None or not AVAILABLE:
        return
    output = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(["nice", "-n", "10", sys.executable, run_checks.__file__], stdout=output,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _checks = (process, output)
    atexit.register(_stop, process)


def _stop(process: subprocess.Popen) -> None:
    """Ends the build or the checks with their compilers, if the session ends before it used them."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _build(fn, *args):
    try:
        return fn(*args)
    except build_emulation.BuildError as error:
        pytest.fail(f"building the emulated CUDA backend failed:\n{str(error)[-6000:]}", pytrace=False)


def test_cuda_kernels_under_emulation_and_sanitizers():
    start_checks()  # no-op when the session started it
    process, output = _checks
    try:
        returncode = process.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise
    output.seek(0)
    text = output.read()
    if returncode == run_checks.BUILD_FAILED:
        pytest.fail(text, pytrace=False)
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    assert returncode == 0, f"emulated CUDA checks failed (exit {returncode}):\n{text[-12000:]}"
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
