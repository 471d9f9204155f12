"""``python -m focal.info``: what this focal was built with, what it runs on, and a short self-test.

Its output is what a bug report should contain: focal's and torch's versions, the build's record
(the torch it was compiled against, the CUDA architectures and CPU instruction sets compiled), the
NVIDIA driver, each visible GPU against the compiled architectures, the CPU kernel picked at run
time, the transparent-huge-page mode, and the op checked against :mod:`focal.reference` on the CPU
and on each visible GPU. Exits with status 1 when a self-test fails or a GPU is not covered.
"""

from __future__ import annotations

import itertools
import platform
import re
import sys
import time
from pathlib import Path

import torch

import focal
from focal import _extension, reference

THP_PATH = Path("/sys/kernel/mm/transparent_hugepage/enabled")
NVIDIA_DRIVER_PATH = Path("/proc/driver/nvidia/version")
# Largest error relative to the reference's largest magnitude that the self-test accepts, per dtype
# (float32: a reduced loss may be summed in float32 on the GPU).
SELF_TEST_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-11}


def thp_mode(path: Path = THP_PATH) -> str | None:
    """The selected transparent-huge-page mode ('always', 'madvise' or 'never'), or None where the
    kernel has no such setting."""
    try:
        selected = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return None
    return selected.group(1) if selected else None


def nvidia_driver(path: Path = NVIDIA_DRIVER_PATH) -> str | None:
    """The NVIDIA kernel module's version ('550.54.15'), or None where no NVIDIA driver is loaded."""
    try:
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", path.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what the platform module knows."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or platform.machine())


def cpu_kernel() -> str:
    """The instruction set of the CPU kernel copy in use, next to ATen's own capability."""
    capability = torch.backends.cpu.get_cpu_capability()
    if _extension.BUILD_ERROR is not None:
        return f"none (extension not loaded); ATen capability {capability}"
    if _extension.CPU_KERNEL_ERROR is not None:
        return f"none: {_extension.CPU_KERNEL_ERROR}"
    return f"{torch.ops.focal.cpu_kernel_isa()} (ATen capability {capability})"


def gpu_coverage(name: str, capability: tuple[int, int], info: dict | None) -> tuple[str, bool]:
    """One GPU against the build: its line, and whether focal's CUDA kernels can run on it."""
    line = f"{name}, compute capability {capability[0]}.{capability[1]}"
    if "cuda" not in _extension.KERNEL_DEVICE_TYPES:
        return f"{line}: WARNING: this build has no CUDA kernels", False
    if info is None:
        return f"{line}: architectures compiled unknown (no build record)", True
    runs = _extension.arch_coverage(capability, info["cuda_sass"], info["cuda_ptx"])
    if runs is None:
        return (f"{line}: WARNING: neither compiled for nor reachable through PTX "
                f"(build: {_extension.describe_cuda_build(info)})"), False
    return f"{line}: runs {runs}", True


def self_test(device: torch.device) -> tuple[bool, str]:
    """focal.sigmoid_focal_loss and its gradient against focal.reference (in float64, from the same
    rounded inputs) on ``device``, over dtypes, target kinds, gammas, reductions and row lengths
    with and without a vector tail. Returns (passed, a one-line summary)."""
    generator = torch.Generator().manual_seed(0)
    worst, cases, start = 0.0, 0, time.perf_counter()
    grid = itertools.product(SELF_TEST_TOLERANCE, (7, 80), ("class ids", "soft"), (2.0, 1.5), ("none", "sum"))
    try:
        for dtype, cols, kind, gamma, reduction in grid:
            x = (torch.randn(256, cols, generator=generator, dtype=torch.float64) * 4).to(dtype).double()
            if kind == "class ids":
                targets = torch.randint(-1, cols, (256,), generator=generator)
            else:
                targets = torch.rand(256, cols, generator=generator, dtype=torch.float64).to(dtype).double()
            want = reference.sigmoid_focal_loss(x, targets, gamma=gamma, reduction=reduction)
            want_grad = reference.sigmoid_focal_loss_grad(x, targets, gamma=gamma, reduction=reduction)
            logits = x.to(device, dtype).requires_grad_()
            device_targets = targets.to(device, dtype if targets.is_floating_point() else None)
            loss = focal.sigmoid_focal_loss(logits, device_targets, gamma=gamma, reduction=reduction)
            (grad,) = torch.autograd.grad(loss.sum(), logits)
            for got, expected in ((loss, want), (grad, want_grad)):
                error = (got.double().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
                if not error <= SELF_TEST_TOLERANCE[dtype]:  # also catches NaN
                    return False, (f"FAILED: {dtype} C={cols} {kind} gamma={gamma} reduction={reduction}: "
                                   f"relative error {error.item():.3g} > {SELF_TEST_TOLERANCE[dtype]:.0e}")
                worst = max(worst, error.item())
            cases += 1
    except Exception as error:  # a report, not a traceback: the message is what the user needs
        return False, f"FAILED: {type(error).__name__}: {error}"
    return True, f"ok, {cases} cases, largest relative error {worst:.1e} ({time.perf_counter() - start:.2f} s)"


def report() -> tuple[list[tuple[str, str]], bool]:
    """The report as (label, value) rows, and whether every check passed."""
    info = _extension.BUILD_INFO
    rows = [
        ("focal", f"{focal.__version__} ({_extension.PACKAGE_DIR})"),
        ("built against", _extension.describe_torch(info) if info else "unknown (no build record)"),
    ]
    if info:
        rows += [("CUDA code", _extension.describe_cuda_build(info) if info["cuda_sass"] or info["cuda_ptx"]
                  else "none (CPU-only build)"),
                 ("CPU kernels", ", ".join(info["cpu_isas"]))]
    if _extension.BUILD_ERROR is not None:
        rows.append(("extension", f"NOT LOADED: {_extension.BUILD_ERROR}"))
    rows += [
        ("torch", _extension.describe_torch(_extension.running_torch()).removeprefix("torch ")),
        ("python", f"{platform.python_version()} on {platform.platform()}"),
        ("CPU", f"{cpu_model()}, {torch.get_num_threads()} threads"),
        ("CPU kernel", cpu_kernel()),
        ("huge pages", thp_mode() or "not available"),
        ("NVIDIA driver", nvidia_driver() or "none loaded"),
    ]
    passed = True
    devices = [torch.device("cpu")]
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu_count == 0:
        rows.append(("GPUs", "none visible"))
    for index in range(gpu_count):
        line, covered = gpu_coverage(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index), info)
        rows.append((f"cuda:{index}", line))
        passed &= covered
        devices.append(torch.device("cuda", index))
    for device in devices:
        ok, summary = self_test(device)
        rows.append((f"self-test {device}", summary))
        passed &= ok
    return rows, passed


def main() -> int:
    rows, passed = report()
    width = max(len(label) for label, _ in rows) + 2
    for label, value in rows:
        print(f"{label + ':':<{width}}{value}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
