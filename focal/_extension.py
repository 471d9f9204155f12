"""The compiled extension ``focal._C``: loading it, and the errors for devices it has no kernel for.

Loading the library registers the operators (``torch.ops.focal.*``) and their CPU and CUDA kernels.
The package stays importable without it, so that :mod:`focal.reference` works on any machine; the
public functions then raise :func:`require_kernels`'s error.
"""

from __future__ import annotations

import torch

__all__ = ["require_kernels", "BUILD_ERROR", "KERNEL_DEVICE_TYPES"]

BUILD_HINT = "pip install --no-build-isolation -e .  (from the focal checkout)"

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


def require_kernels(device: torch.device) -> None:
    """Raise a RuntimeError that says how to build when no kernel exists for ``device``."""
    if BUILD_ERROR is not None:
        raise RuntimeError(
            f"focal's compiled extension focal._C could not be loaded ({BUILD_ERROR}). "
            f"Build it with: {BUILD_HINT}"
        )
    if device.type not in KERNEL_DEVICE_TYPES:
        hint = (
            "rebuild focal where a CUDA toolkit (nvcc, CUDA_HOME) and a CUDA build of torch are "
            f"present, with FOCAL_WITH_CUDA=1: FOCAL_WITH_CUDA=1 {BUILD_HINT}"
            if device.type == "cuda"
            else "only CPU and CUDA tensors are supported"
        )
        raise RuntimeError(f"focal has no kernel for {device.type} tensors: {hint}")
