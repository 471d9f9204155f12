"""`python -m focal.info` and the pieces it is made of, each checked on its own (GPUs and the files of
/proc and /sys are made up where this machine has none)."""

from __future__ import annotations

import pytest
import torch

import focal
from focal import _extension, info

RECORD = {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "cxx11_abi": True, "cuda_sass": ["8.0", "9.0"],
          "cuda_ptx": ["9.0"], "cpu_isas": ["DEFAULT", "AVX2", "AVX512"]}


@pytest.mark.parametrize("capability, sass, ptx, runs", [
    ((8, 0), ["8.0", "9.0"], ["9.0"], "sm_80"),
    ((8, 9), ["8.0", "8.6", "9.0"], [], "sm_86"),  # the newest machine code of the same major
    ((9, 0), ["8.0", "9.0"], ["9.0"], "sm_90"),
    ((10, 0), ["8.0", "9.0"], ["9.0"], "compute_90 (PTX)"),  # newer major: only PTX reaches it
    ((12, 0), ["10.0"], ["8.0", "10.0"], "compute_100 (PTX)"),
    ((7, 5), ["8.0", "9.0"], ["9.0"], None),  # older than everything compiled
    ((10, 0), ["8.0", "9.0"], [], None),  # newer, without PTX
    ((9, 0), ["9.0a"], [], "sm_90a"),
    ((10, 0), ["9.0a"], ["9.0a"], None),  # architecture-specific code runs on that capability only
])
def test_arch_coverage(capability, sass, ptx, runs):
    assert _extension.arch_coverage(capability, sass, ptx) == runs


def test_gpu_coverage_warns_for_an_uncovered_gpu(monkeypatch):
    monkeypatch.setattr(_extension, "KERNEL_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    line, covered = info.gpu_coverage("Tesla T4", (7, 5), RECORD)
    assert not covered and line == ("Tesla T4, compute capability 7.5: WARNING: neither compiled for nor reachable "
                                    "through PTX (build: sm_80, sm_90, compute_90 (PTX))")
    assert info.gpu_coverage("NVIDIA H200", (9, 0), RECORD) == ("NVIDIA H200, compute capability 9.0: runs sm_90", True)
    monkeypatch.setattr(_extension, "KERNEL_DEVICE_TYPES", frozenset({"cpu"}))
    assert info.gpu_coverage("NVIDIA H200", (9, 0), RECORD)[1] is False


def test_thp_mode(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert info.thp_mode(setting) == "madvise"
    assert info.thp_mode(tmp_path / "absent") is None


@pytest.mark.parametrize("text", [
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n",
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  (dvs-builder)\n",
])
def test_nvidia_driver(tmp_path, text):
    version_file = tmp_path / "version"
    version_file.write_text(text + "GCC version:  gcc version 12.3.0\n")
    assert info.nvidia_driver(version_file) == "550.54.15"
    assert info.nvidia_driver(tmp_path / "absent") is None


def _expected_kernel(capability: str, compiled: list[str]) -> str:
    """focal_cpu.cpp's rule: ATen's capability, capped at the best copy compiled."""
    rank = ["DEFAULT", "AVX2", "AVX512"]
    allowed = rank[: rank.index(capability) + 1] if capability in rank else ["DEFAULT"]
    return max((isa for isa in compiled if isa in allowed), key=rank.index)


def test_cpu_kernel_follows_aten_capability():
    """(With ATEN_CPU_CAPABILITY=default both fall back: test_install's round trip checks that.)"""
    capability = torch.backends.cpu.get_cpu_capability()
    picked = torch.ops.focal.cpu_kernel_isa()
    assert picked == _expected_kernel(capability, _extension.BUILD_INFO["cpu_isas"])
    assert info.cpu_kernel() == f"{picked} (ATen capability {capability})"


def test_self_test_passes_on_the_cpu_and_catches_a_wrong_op(monkeypatch):
    ok, summary = info.self_test(torch.device("cpu"))
    assert ok and summary.startswith("ok, 32 cases, largest relative error"), summary
    correct = focal.sigmoid_focal_loss
    monkeypatch.setattr(focal, "sigmoid_focal_loss", lambda *args, **kwargs: correct(*args, **kwargs) * (1 + 1e-4))
    ok, summary = info.self_test(torch.device("cpu"))
    assert not ok and summary.startswith("FAILED: torch.float32 C=7 class ids gamma=2.0 reduction=none: relative error")


def test_self_test_reports_a_device_without_kernels():
    ok, summary = info.self_test(torch.device("meta"))
    assert not ok and summary.startswith("FAILED: RuntimeError: focal has no kernel for meta tensors")


def test_main_prints_the_report(capsys, monkeypatch):
    produced = []
    real_report = info.report
    monkeypatch.setattr(info, "report", lambda: produced.append(real_report()) or produced[0])
    assert info.main() == 0  # every check passed
    (rows, passed), lines = produced[0], capsys.readouterr().out.splitlines()
    assert passed and len(lines) == len(rows)
    for line, (label, value) in zip(lines, rows):
        assert line.startswith(label + ":") and line.endswith(" " + value)
    values = dict(rows)
    assert values["focal"] == f"{focal.__version__} ({_extension.PACKAGE_DIR})"
    assert values["built against"] == _extension.describe_torch(_extension.BUILD_INFO)
    assert values["torch"].startswith(f"{torch.__version__} (")
    assert _extension.describe_torch(_extension.running_torch()) == f"torch {values['torch']}"
    assert values["CPU kernel"] == info.cpu_kernel() and values["huge pages"] == (info.thp_mode() or "not available")
    assert values["self-test cpu"].startswith("ok, 32 cases")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert [f"self-test cuda:{i}" in values for i in range(gpus)] == [True] * gpus
    assert ("GPUs" in values) == (gpus == 0)


def test_report_checks_each_visible_gpu(monkeypatch):
    """A made-up T4 next to an H200, for a build without sm_75: the T4's row warns, the report fails,
    and each GPU gets its self-test."""
    gpus = [("NVIDIA H200", (9, 0)), ("Tesla T4", (7, 5))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: gpus[index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: gpus[index][1])
    monkeypatch.setattr(_extension, "KERNEL_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(_extension, "BUILD_INFO", RECORD)
    tested = []
    monkeypatch.setattr(info, "self_test", lambda device: tested.append(str(device)) or (True, "ok"))
    rows, passed = info.report()
    values = dict(rows)
    assert not passed and tested == ["cpu", "cuda:0", "cuda:1"]
    assert values["cuda:0"] == "NVIDIA H200, compute capability 9.0: runs sm_90"
    assert values["cuda:1"].startswith("Tesla T4, compute capability 7.5: WARNING: neither compiled for nor reachable")
    assert values["CUDA code"] == "sm_80, sm_90, compute_90 (PTX)" and "GPUs" not in values
