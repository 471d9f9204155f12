"""Shared pytest configuration: the device fixture, the hypothesis profile, the instantiation
recorder, and the background jobs with the order of the tests that wait on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import background

# Small, fast, reproducible property runs by default; `--hypothesis-profile=thorough` for more.
settings.register_profile(
    "default",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile("default")

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA tests need a visible GPU (torch.cuda.is_available() is False)"
)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=requires_cuda)])
def device(request) -> torch.device:
    """Every test that takes `device` runs on the CPU and, where a GPU is visible, on CUDA."""
    return torch.device(request.param)


def pytest_addoption(parser):
    parser.addoption("--instantiations", metavar="FILE", default=None,
                     help="write the kernel instantiations the run reaches to FILE (tests/instantiations.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "background(job): the test waits on a tests/background.py Job, started "
                            "at collection")
    # A build for one machine (FOCAL_CPU_ISAS=native, as `make demo` leaves it on a CPU) has one copy of
    # the CPU kernels: the tests of the other copies, and of the wheel, cannot run on it.
    record = Path(__file__).resolve().parents[1] / "focal" / "_build_info.json"
    if record.is_file() and "DEFAULT" not in json.loads(record.read_text())["cpu_isas"]:
        pytest.exit("focal is built for this machine only (FOCAL_CPU_ISAS=native, as `make demo` builds it): "
                    "run `make test`, which rebuilds it for the tests", returncode=4)
    path = config.getoption("--instantiations", default=None)
    if path:
        from instantiations import Recorder

        recorder = Recorder()
        recorder.install()
        config._focal_instantiations = (recorder, path)


def pytest_unconfigure(config):
    recorded = getattr(config, "_focal_instantiations", None)
    if recorded:
        recorder, path = recorded
        recorder.write(path)


def _emulated(item) -> bool:
    return getattr(getattr(item, "module", None), "__name__", None) == "test_cuda_emulated"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The tests that wait on a background job (tests/background.py) run last, the CUDA emulation's
    (tests/test_cuda_emulated.py, the longest job) at the very end, and their jobs start now: the rest
    of the suite leaves one of the two cores of a small machine mostly idle, and they take it. Runs
    after -k / -m deselection, so that a deselected test starts nothing."""
    items.sort(key=lambda item: (bool(background.jobs_of(item)) or _emulated(item), _emulated(item)))  # stable
    if not config.option.collectonly:
        for item in items:
            if not _skipped(item):
                for job in background.jobs_of(item):
                    job.start()  # once per job


def _skipped(item) -> bool:
    """The test is marked skip, or skipif with a condition that holds."""
    return any(mark.name == "skip" or (mark.name == "skipif" and any(
        not isinstance(condition, str) and bool(condition) for condition in mark.args)) for mark in item.iter_markers())
