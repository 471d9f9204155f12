"""The CUDA kernels, executed without a GPU: csrc/cuda compiled as host C++ against a CUDA emulation,
with AddressSanitizer and UBSan (csrc/cuda/README.md says what this can and cannot show).

The emulated backend is built once per source state (tests/cuda_emulation/build_emulation.py) and
its checks (tests/cuda_emulation/emulated_checks.py) run in a separate interpreter with the ASan
runtime preloaded; any failed check or sanitizer report fails this test. A second test builds the
loss kernel with deliberate faults and asserts that the sanitizers report them, so that a clean run
of the first means something.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cuda_emulation import build_emulation

ROOT = Path(__file__).resolve().parents[1]
CHECKS = Path(__file__).resolve().parent / "cuda_emulation" / "emulated_checks.py"
# The same backend against the exact oracle of tests/test_op_vs_oracle.py, over the whole logit range.
ORACLE_CHECKS = Path(__file__).resolve().parent / "cuda_emulation" / "oracle_checks.py"

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which(build_emulation.CXX) is None,
    reason=f"the CUDA emulation needs Linux and {build_emulation.CXX} with AddressSanitizer",
)


def _build(fn, *args):
    try:
        return fn(*args)
    except build_emulation.BuildError as error:
        pytest.fail(f"building the emulated CUDA backend failed:\n{str(error)[-6000:]}", pytrace=False)


def test_cuda_kernels_under_emulation_and_sanitizers():
    library = _build(build_emulation.build_library)
    env = build_emulation.sanitizer_env()
    env["FOCAL_EMU_LIBRARY"] = str(library)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # --capture=sys: a sanitizer writes its report to file descriptor 2, which must stay this pipe.
    cmd = [sys.executable, "-m", "pytest", str(CHECKS), str(ORACLE_CHECKS), "-q", "-p", "no:cacheprovider", "-rfE", "--capture=sys",
           "--rootdir", str(ROOT)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert result.returncode == 0, f"emulated CUDA checks failed (exit {result.returncode}):\n{output[-12000:]}"
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
