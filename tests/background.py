"""Long subprocess checks that run in the background while the rest of the suite runs.

A test whose work is one long subprocess (a build, a training run under torchrun, pytest in a fresh
interpreter) leaves the suite waiting on it. Such a test names its :class:`Job` with
``@pytest.mark.background(job)``; when the test is selected, conftest.py starts the job at
collection, at nice 19 (so it takes only what the suite leaves of the machine's cores), and runs the
test near the end of the session, where :meth:`Job.result` waits for the job's exit, and lets the
job's processes run on every core from then on. Run alone, the test starts its job itself, and waits
for it then.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Finished:
    """A job's exit status and output, and its folder (which lives until the session ends)."""

    returncode: int
    stdout: str
    stderr: str
    folder: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Job:
    """A command run once per session, in a process group of its own, with a scratch folder.

    ``command(folder)`` returns the argument list; it may first write the job's inputs into
    ``folder``. ``env`` (default: this process's environment) and ``cwd`` (default: the repository)
    are the command's.
    """

    def __init__(self, command: Callable[[Path], Sequence[str]], *, env: dict | None = None,
                 cwd: Path = REPO_ROOT):
        self._command, self._env, self._cwd = command, env, cwd
        self._running: tuple[subprocess.Popen, Path, object, object] | None = None

    def start(self) -> None:
        """Starts the command, unless it was started already."""
        if self._running is not None:
            return
        folder = Path(tempfile.mkdtemp(prefix="focal-job-"))
        argv = ["nice", "-n", "19", *map(str, self._command(folder))]
        stdout, stderr = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
        process = subprocess.Popen(argv, stdout=stdout, stderr=stderr, text=True, cwd=self._cwd,
                                   env=self._env, start_new_session=True)
        self._running = (process, folder, stdout, stderr)
        atexit.register(self._stop)

    def result(self, timeout: float) -> Finished:
        """Waits for the command (started now if it was not), at most ``timeout`` seconds more. The
        suite now waits on it, so its processes may take every core from here on (see _unpin)."""
        self.start()
        process, folder, stdout, stderr = self._running
        _unpin(process.pid)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            raise
        stdout.seek(0)
        stderr.seek(0)
        return Finished(returncode, stdout.read(), stderr.read(), folder)

    def _kill(self) -> None:
        process = self._running[0]
        if process.poll() is None:  # with its children: compilers, torchrun's workers
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def _stop(self) -> None:
        self._kill()
        shutil.rmtree(self._running[1], ignore_errors=True)


def _unpin(group: int) -> None:
    """Every thread of the processes of process group ``group`` may run on every core this process
    may. A job that keeps to one core beside the suite (the emulated CUDA checks: run_checks.py)
    would otherwise leave the others idle once the suite waits on it."""
    if not hasattr(os, "sched_setaffinity"):
        return
    cores = os.sched_getaffinity(0)
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.getpgid(int(entry.name)) != group:
                continue
            for task in (entry / "task").iterdir():
                os.sched_setaffinity(int(task.name), cores)
        except OSError:  # the process or thread ended meanwhile
            continue


def jobs_of(item) -> list[Job]:
    """The jobs a collected test names with ``@pytest.mark.background(job)``."""
    return [mark.args[0] for mark in item.iter_markers("background")]
