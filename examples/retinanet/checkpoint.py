"""Checkpoint files: atomic writes, safe loads, and the random-number state of a process.

A training checkpoint is a dict of tensors, numbers, strings and lists/dicts of them only (model,
optimizer and gradient-scaler state, the learning-rate schedule's position, the data position, every
process's RNG states, the config as a dict), so that it loads with ``torch.load(weights_only=True)``:
a file from elsewhere cannot run code. Writes go to a temporary file in the same folder that is
flushed to disk and then renamed over the target, so a run killed mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import torch

from .errors import InputError, require_file

LATEST = "model_last.pth"  # rewritten every --checkpoint-every iterations
FINAL = "model_final.pth"  # written at the end of training


def save_atomic(payload: dict, path: str) -> None:
    """``torch.save(payload, path)`` such that ``path`` is always either the old or the new file."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    # The rename itself lives in the folder's metadata: sync it too, or a power cut can undo it.
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_file(path: str, what: str = "checkpoint") -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors naming the file."""
    require_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise InputError(f"{what} {path} holds Python objects besides tensors, which are not loaded "
                             f"(they could run code): {first}") from None
        raise InputError(f"{what} {path} is corrupt or not a PyTorch file: {first}") from None
    except Exception as error:  # noqa: BLE001 -- garbage bytes fail anywhere inside the unpickler
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{what} {path} is corrupt or truncated (not a readable PyTorch file): {first}") from None


def load_training_checkpoint(path: str) -> dict:
    """A checkpoint written by ``train``; a clear error for a bare state dict or another kind of file."""
    checkpoint = load_file(path)
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise InputError(f"checkpoint {path} is a bare state dict (parameter names -> tensors) without the "
                         f"model config; load it into a model built with the same config, or pass a file "
                         f"written by examples.retinanet.train")
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        kind = f"keys {sorted(checkpoint)[:6]}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise InputError(f"checkpoint {path} is not a RetinaNet checkpoint (needs 'config' and 'model', "
                         f"has {kind})")
    return checkpoint


def find_resume(output: str, resume: str | None) -> str | None:
    """The checkpoint to resume from: ``resume`` itself, or for ``"auto"`` the latest checkpoint in
    ``output`` (``model_last.pth``, else ``model_final.pth``; None when there is none yet)."""
    if resume is None:
        return None
    if resume != "auto":
        return require_file(resume, "--resume checkpoint")
    for name in (LATEST, FINAL):
        candidate = os.path.join(output, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def rng_state() -> dict:
    """This process's random-number states (torch CPU and CUDA, numpy, Python) as tensors and lists."""
    _, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
