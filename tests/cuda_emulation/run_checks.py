"""Builds the emulated CUDA backend (build_emulation.py) and the fault programs, and runs the
backend's checks (emulated_checks.py and oracle_checks.py) with the sanitizer runtime preloaded, in
one process of its own.

tests/test_cuda_emulated.py starts it when the test session starts, so that it runs beside the rest
of the suite (the suite's tests are mostly single-threaded; this keeps the other core busy).
Usable by hand: ``python tests/cuda_emulation/run_checks.py [pytest options]``. The exit status is
pytest's, or BUILD_FAILED with the compiler's output when the build fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

from cuda_emulation import build_emulation  # noqa: E402

CHECKS = [HERE / "emulated_checks.py", HERE / "oracle_checks.py"]
BUILD_FAILED = 90


def main(argv: list[str]) -> int:
    try:
        library = build_emulation.build_library()
    except build_emulation.BuildError as error:
        print(f"building the emulated CUDA backend failed:\n{str(error)[-6000:]}", flush=True)
        return BUILD_FAILED
    # The fault programs of test_sanitizers_catch_a_broken_kernel as well, while the suite still
    # runs; a failure to build one is left for that test to report.
    for fault in build_emulation.FAULTS:
        with contextlib.suppress(build_emulation.BuildError):
            build_emulation.build_fault_program(fault)
    env = build_emulation.sanitizer_env()
    env["FOCAL_EMU_LIBRARY"] = str(library)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # --capture=sys: a sanitizer writes its report to file descriptor 2, which must stay the caller's.
    cmd = [sys.executable, "-m", "pytest", *map(str, CHECKS), "-q", "-p", "no:cacheprovider", "-rfE",
           "--capture=sys", "--rootdir", str(ROOT), *argv]
    os.chdir(ROOT)
    # On one core: the emulated threads of a block wake each other at every barrier, which on one
    # core is a context switch and across cores an inter-processor wake-up (the checks took 45
    # core-seconds on one core of the 2-core machine, 55 on both); and the suite beside them keeps
    # the other cores to itself, rather than sharing them with hundreds of briefly runnable threads
    # (once the suite waits on the checks, tests/background.py lets them take every core).
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    sys.stdout.flush()
    os.execve(sys.executable, cmd, env)  # the checks replace this process: its exit status is theirs


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
