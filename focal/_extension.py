"""The compiled extension ``focal._C``: loading it, and the errors for devices it has no kernel for.

Loading the library registers the operators (``torch.ops.focal.*``) and their CPU and CUDA kernels.
Before loading it, the build's record (``focal/_build_info.json``, written by setup.py next to the
module) is compared with the running torch: an extension built against another torch would fail with
undefined symbols, or crash, so ``import focal`` raises :class:`TorchMismatchError` instead, naming
both and the command that fixes it. The package stays importable without the extension, so that
:mod:`focal.reference` works on any machine; the public functions then raise
:func:`require_kernels`'s error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["require_kernels", "BUILD_ERROR", "BUILD_INFO", "KERNEL_DEVICE_TYPES", "TorchMismatchError"]

PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_INFO_PATH = PACKAGE_DIR / "_build_info.json"
# What must be equal between the build and the running torch for the library to load and behave.
TORCH_KEYS = ("torch", "torch_cuda", "cxx11_abi")


class TorchMismatchError(ImportError):
    """focal's extension was compiled against another torch than the one importing it."""


def rebuild_command() -> str:
    """The command that (re)builds focal against the installed torch: an editable install for a
    source checkout (the package sits next to setup.py), a regular one for an installed copy."""
    root = PACKAGE_DIR.parent
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():
        return f"pip install --no-build-isolation -e {root}"
    return "pip install --no-build-isolation --no-deps --force-reinstall .  (in the focal source folder)"


def read_build_info(path: Path = BUILD_INFO_PATH) -> dict | None:
    """The build's record, or None where there is none (an unbuilt checkout)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def running_torch() -> dict:
    """The running torch, in the build record's terms."""
    return {
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def describe_torch(info: dict) -> str:
    """'torch 2.14.1+cu130 (CUDA 13.0, C++11 ABI)' from a build record or :func:`running_torch`."""
    cuda = f"CUDA {info['torch_cuda']}" if info.get("torch_cuda") else "no CUDA"
    abi = "C++11 ABI" if info.get("cxx11_abi") else "pre-C++11 ABI"
    return f"torch {info.get('torch')} ({cuda}, {abi})"


def torch_mismatch(built: dict, running: dict) -> str | None:
    """The error message when ``built`` (a build record) and ``running`` differ in torch's version
    (local tag included), CUDA version or C++ ABI; None when they agree."""
    if all(built.get(key) == running[key] for key in TORCH_KEYS):
        return None
    return (
        f"focal's compiled extension was built against {describe_torch(built)}, but {describe_torch(running)} "
        f"is installed; loading it would fail with undefined symbols. Rebuild focal against the installed "
        f"torch: {rebuild_command()}; or reinstall torch=={built.get('torch')}."
    )


BUILD_INFO = read_build_info()
if BUILD_INFO is not None:
    _mismatch = torch_mismatch(BUILD_INFO, running_torch())
    if _mismatch is not None:
        raise TorchMismatchError(_mismatch)

try:
    from focal import _C  # noqa: F401  (loading the library registers the ops)

    BUILD_ERROR: str | None = None
except ImportError as error:  # the package is importable for its reference even when unbuilt
    BUILD_ERROR = str(error)

# Device types with a compiled kernel, looked up once (a plain set also traces under torch.compile).
KERNEL_DEVICE_TYPES = frozenset(
    device
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if BUILD_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key("focal::sigmoid_focal_loss", key)
)


def parse_arch(arch: str) -> tuple[int, int, str]:
    """'8.6' -> (8, 6, ''), '9.0a' -> (9, 0, 'a')."""
    number = arch.rstrip("abcdefghijklmnopqrstuvwxyz")
    major, minor = number.split(".")
    return int(major), int(minor), arch[len(number):]


def arch_name(arch: str, kind: str) -> str:
    """'8.0', 'sm' -> 'sm_80'; '9.0', 'compute' -> 'compute_90'."""
    major, minor, suffix = parse_arch(arch)
    return f"{kind}_{major}{minor}{suffix}"


def arch_coverage(capability: tuple[int, int], sass: Sequence[str], ptx: Sequence[str]) -> str | None:
    """How a GPU of compute ``capability`` runs code compiled for the ``sass`` and ``ptx``
    architectures ('8.0', '9.0a', ...): the machine code it runs ('sm_80'), else the PTX its driver
    compiles on first use ('compute_90 (PTX)'), else None.

    Machine code for X.y runs on GPUs X.z with z >= y (same major); PTX for X.y on any GPU of
    capability >= X.y. Architecture-specific code ('9.0a') runs only on exactly that capability.
    """
    def runs(arch: str, same_major: bool) -> bool:
        major, minor, suffix = parse_arch(arch)
        if suffix == "a":
            return (major, minor) == tuple(capability)
        if same_major and major != capability[0]:
            return False
        return (major, minor) <= tuple(capability)

    for archs, kind, same_major, note in ((sass, "sm", True, ""), (ptx, "compute", False, " (PTX)")):
        usable = [arch for arch in archs if runs(arch, same_major)]
        if usable:
            return arch_name(max(usable, key=parse_arch), kind) + note
    return None


def describe_cuda_build(info: dict | None) -> str:
    """'sm_80, sm_90, compute_90 (PTX)' from a build record."""
    if info is None:
        return "unknown architectures (no build record)"
    names = [arch_name(a, "sm") for a in info["cuda_sass"]] + [
        arch_name(a, "compute") + " (PTX)" for a in info["cuda_ptx"]
    ]
    return ", ".join(names) or "no architecture"


def build_coverage() -> str:
    """What this build has kernels for, in words: 'cpu, and cuda for sm_80, sm_90, compute_90 (PTX)'."""
    covered = ["cpu"] if "cpu" in KERNEL_DEVICE_TYPES else []
    if "cuda" in KERNEL_DEVICE_TYPES:
        covered.append(f"cuda for {describe_cuda_build(BUILD_INFO)}")
    return ", and ".join(covered) or "no device"


# CPU kernel copies from the least to the most demanding, as ATen names its CPU capabilities.
CPU_ISA_RANK = ("DEFAULT", "AVX2", "AVX512")


def cpu_kernel_error(info: dict | None, capability: str) -> str | None:
    """The error for this CPU (ATen's ``capability``) when the build has no CPU kernel copy it runs:
    only a build for one machine (FOCAL_CPU_ISAS=native) lacks the DEFAULT copy. None otherwise."""
    runnable = CPU_ISA_RANK[: CPU_ISA_RANK.index(capability) + 1 if capability in CPU_ISA_RANK else 1]
    if info is None or any(isa in runnable for isa in info["cpu_isas"]):
        return None
    return (
        f"focal has no CPU kernel for this CPU (ATen capability {capability}): this build compiled its "
        f"CPU kernels for {', '.join(info['cpu_isas'])} only (FOCAL_CPU_ISAS=native, a build for one "
        f"machine). Rebuild it for every CPU, with FOCAL_CPU_ISAS unset: {rebuild_command()}"
    )


CPU_KERNEL_ERROR = cpu_kernel_error(BUILD_INFO, torch.backends.cpu.get_cpu_capability())


# Per CUDA device index: None when the build covers it, else the error to raise. Filled on first use.
_CUDA_DEVICE_ERRORS: dict[int, str | None] = {}


def cuda_device_error(index: int | None) -> str | None:
    """The error for CUDA device ``index`` (None: the current one) when the build has no code that
    runs on its compute capability, else None. Asked of the driver once per device, then cached."""
    if index is None:
        index = torch.cuda.current_device()
    if index not in _CUDA_DEVICE_ERRORS:
        _CUDA_DEVICE_ERRORS[index] = None
        if BUILD_INFO is not None:
            capability = torch.cuda.get_device_capability(index)
            if arch_coverage(capability, BUILD_INFO["cuda_sass"], BUILD_INFO["cuda_ptx"]) is None:
                major, minor = capability
                _CUDA_DEVICE_ERRORS[index] = (
                    f"focal has no kernel for cuda:{index} ({torch.cuda.get_device_name(index)}, compute "
                    f"capability {major}.{minor}): this build has CUDA code for {describe_cuda_build(BUILD_INFO)}, "
                    f"none of which runs there. Rebuild for it: TORCH_CUDA_ARCH_LIST={major}.{minor} "
                    f"{rebuild_command()}"
                )
    return _CUDA_DEVICE_ERRORS[index]


# Evaluated once while tracing under torch.compile, so the check adds nothing to a graph: the mark
# that torch.compiler.assume_constant_result sets, set directly because the decorator imports
# torch._dynamo, which would add 1.5 s to every `import focal` (tests/test_api.py checks that the two
# marks are the same).
cuda_device_error._dynamo_marked_constant = True


def require_kernels(device: torch.device) -> None:
    """Raise a RuntimeError that names ``device``, what the build covers and the fix, when focal has
    no kernel that runs there: the extension is not built, the device type has no kernel (MPS, XPU,
    meta, or CUDA in a CPU-only build), the CUDA GPU's architecture was not compiled for, or (a build
    for one machine) the CPU cannot run the one CPU kernel copy compiled."""
    if BUILD_ERROR is not None:
        raise RuntimeError(
            f"focal's compiled extension focal._C could not be loaded ({BUILD_ERROR}). "
            f"Build it with: {rebuild_command()}"
        )
    if device.type not in KERNEL_DEVICE_TYPES:
        if device.type == "cuda":
            hint = (
                "rebuild focal where a CUDA toolkit (nvcc, CUDA_HOME) and a CUDA build of torch are "
                f"present, with FOCAL_WITH_CUDA=1: FOCAL_WITH_CUDA=1 {rebuild_command()}"
            )
        else:
            hint = (
                f"only CPU and CUDA tensors are supported (this build: {build_coverage()}). Move the tensors "
                "to one of those, or use focal.reference, plain PyTorch that runs on any device"
            )
        raise RuntimeError(f"focal has no kernel for {device.type} tensors: {hint}")
    if device.type == "cpu" and CPU_KERNEL_ERROR is not None:
        raise RuntimeError(CPU_KERNEL_ERROR)
    if device.type == "cuda":
        error = cuda_device_error(device.index)
        if error is not None:
            raise RuntimeError(error)
