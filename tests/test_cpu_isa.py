"""Every instruction-set copy of the CPU kernels passes the tests shaped like the kernels.

The extension compiles its kernels once per ISA and picks the copy that matches ATen's CPU capability,
which ATEN_CPU_CAPABILITY overrides at start-up. The rest of the suite runs the copy this CPU picks;
each copy below it runs here, in a fresh interpreter, through the tests shaped like the kernels:
every instantiation of every loss against the float64 reference (test_instantiations.py, on rows
with full vectors, pairs of them and tails; test_cpu_id_runs.py, on runs of class-id rows), and the
16-bit results bit for bit against the float32 kernel (every loss of the sigmoid family, and every
16-bit logit in test_reduced_precision.py).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import background

CAPABILITIES = ["default", "avx2", "avx512"]
RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_TESTS = [
    "test_instantiations.py",
    "test_family.py::test_half_precision_is_the_float32_result_rounded_once",
    "test_reduced_precision.py",
    "test_cpu_id_runs.py",
]


def _kernel_tests(capability: str) -> background.Job:
    """pytest on the kernel tests in one fresh interpreter with ATen's capability overridden: it prints
    the capability ATen took from the override, then runs the tests."""
    tests = [os.path.join(HERE, test) for test in KERNEL_TESTS]
    run = ("import sys, torch, focal, pytest\nprint('capability', torch.backends.cpu.get_cpu_capability(), flush=True)\n"
           f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *{tests!r}]))")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    return background.Job(lambda folder: [sys.executable, "-c", run], env=env)


def _copy(capability: str):
    """The copy's test, waiting on its job (tests/background.py) if this CPU runs the copy and the rest
    of the suite does not, else skipped with the reason."""
    available = torch.backends.cpu.get_cpu_capability()
    if RANK[capability.upper()] > RANK.get(available, 0):
        return pytest.param(capability, None, marks=pytest.mark.skip(
            reason=f"this CPU supports up to {available}, not {capability.upper()}"))
    if capability.upper() == available:
        return pytest.param(capability, None, marks=pytest.mark.skip(
            reason=f"{available} is the copy the rest of the suite runs"))
    job = _kernel_tests(capability)
    return pytest.param(capability, job, marks=pytest.mark.background(job))


@pytest.mark.parametrize(("capability", "job"), [_copy(capability) for capability in CAPABILITIES],
                         ids=CAPABILITIES)
def test_kernel_copy_passes_the_kernel_tests(capability, job):
    result = job.result(timeout=400)
    assert f"capability {capability.upper()}\n" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
