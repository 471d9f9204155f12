"""Shared pytest configuration: the device fixture, the hypothesis profile, the instantiation
recorder and the order of the CUDA emulation's tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

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


def _module_name(item) -> str | None:
    return getattr(getattr(item, "module", None), "__name__", None)


def _emulated(item) -> bool:
    return _module_name(item) == "test_cuda_emulated"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The CUDA emulation's tests (tests/test_cuda_emulated.py) run last, and when its long test is
    selected, its build and checks start now in a background process: the rest of the suite leaves
    one of the two cores of a small machine mostly idle, and they take it. So does the SASS listing
    of the built extension that tests/test_sass_count.py reads. Runs after -k / -m deselection, so
    that a deselected test starts nothing."""
    if not config.option.collectonly:
        listing = next((item for item in items if _module_name(item) == "test_sass_count"
                        and item.module.uses_built_listing(item)), None)
        if listing is not None:
            listing.module.start_built_listing()
    emulated = [item for item in items if _emulated(item)]
    if not emulated:
        return
    items[:] = [item for item in items if not _emulated(item)] + emulated
    if not config.option.collectonly and any(
            item.originalname == "test_cuda_kernels_under_emulation_and_sanitizers" for item in emulated):
        emulated[0].module.start_checks()
