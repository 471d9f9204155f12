"""tests/background.py: a job's output, exit status and folder, its timeout, and its cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import background


def test_a_job_reports_its_output_status_and_folder_and_stops_at_its_timeout():
    job = background.Job(lambda folder: [sys.executable, "-c", "import sys; print('out'); "
                                         f"open({str(folder / 'made')!r}, 'w').close(); sys.exit('err')"])
    done = job.result(timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (1, "out\n", "err\n") and (done.folder / "made").exists()
    with pytest.raises(subprocess.TimeoutExpired):
        background.Job(lambda folder: [sys.executable, "-c", "import time; time.sleep(60)"]).result(timeout=0.5)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="core affinity needs Linux and at least two cores")
def test_a_job_waited_on_may_take_every_core(tmp_path):
    """A job that keeps to one core beside the suite (as the emulated CUDA checks do) may use every
    core, in every thread, once a test waits on it."""
    code = ("import os, sys, threading, time\n"
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "second = threading.Thread(target=time.sleep, args=(60,), daemon=True)\n"
            "second.start()\n"
            "open(sys.argv[1], 'w').close()\n"
            "deadline = time.monotonic() + 30\n"  # until the test waits on the job, or 30 s
            "while 1 in (len(os.sched_getaffinity(0)), len(os.sched_getaffinity(second.native_id))) \\\n"
            "        and time.monotonic() < deadline:\n"
            "    time.sleep(0.01)\n"
            "print(len(os.sched_getaffinity(0)), len(os.sched_getaffinity(second.native_id)))")
    ready = tmp_path / "pinned"
    job = background.Job(lambda folder: [sys.executable, "-c", code, ready])
    job.start()
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    done = job.result(timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(os.sched_getaffinity(0)))] * 2
