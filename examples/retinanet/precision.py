"""Mixed precision for training: which autocast dtype runs where, and the gradient scaler of float16.

``--amp bf16`` runs the forward pass under ``torch.autocast`` in bfloat16 on the CPU or CUDA;
``--amp fp16`` in float16, on CUDA only (the CPU's autocast is for bfloat16), with a ``GradScaler``
because float16 gradients underflow where bfloat16's (float32's exponent range) do not. The
classification head then produces bfloat16/float16 logits, which ``focal.sigmoid_focal_loss`` takes as
they are (its math runs in float32 internally, its summed loss is float32): no upcast copy of the
largest tensor of the step.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import InputError

AMP_CHOICES = ("none", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str, device: torch.device) -> None:
    """An :class:`InputError` for a precision the device cannot train in."""
    if amp not in AMP_CHOICES:
        raise InputError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise InputError("--amp fp16 needs a CUDA device (the CPU's autocast runs bfloat16: use --amp bf16)")


def autocast(amp: str, device: torch.device):
    """The context to run the forward pass (model and losses) in; a no-op for ``"none"``."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[amp])


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for float16 training, else None (bfloat16 and float32 need none)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None
