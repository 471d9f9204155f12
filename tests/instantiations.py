"""Which kernel instantiations the test suite reaches.

``pytest --instantiations=FILE`` records, for every call of a ``torch.ops.focal`` loss op that runs
a kernel, the instantiation its arguments select, and writes the sorted set to FILE, one per line:

    loss device dtype targets gamma weight reduction grad

- ``targets``: ``float``, ``ids``, ``ids_smoothed`` (class ids with label smoothing) or
  ``ids_scores`` (the class ids and scores of QFL and VFL); the softmax loss adds its layout
  (``ids/rows``: logits (N, C); ``ids/spatial``: dimensions after the class dimension).
- ``gamma``: the compiled fast path of the exponent (``gamma0``, ``gamma1``, ``gamma2``,
  ``gamma_other``; csrc/focal_ops.cpp ``gamma_kind_of``); ``gamma_any`` for FL*, whose gamma is a
  plain factor compiled once (csrc/cpu/family_kernel.cpp).
- ``weight``: ``none`` or a ``+``-joined subset of ``class`` ((C,) weight), ``full`` (the logits'
  shape) and ``row`` (row_weight); for the softmax loss ``weight`` and ``alpha`` tensors.
- ``reduction`` and ``grad`` / ``nograd`` (compute_grad): runtime branches of one instantiation on
  the CPU, recorded because the CUDA backend picks its kernel by them (csrc/cuda/README.md); a CUDA
  call also records that kernel (``ids_kernel``, ``float_kernel``, ``general_kernel``).

The hook is a Python kernel on the ``BackendSelect`` dispatch key: it sits below every mode,
transform and fake-tensor layer, so it sees only calls with real tensors on their way to a
backend kernel (eager, inference mode, torch.compile's compiled code, torch.func, vmap, opcheck),
and it changes nothing the library can observe. Calls that raise, and empty inputs (which run no
kernel), are not recorded.

``python tests/instantiations.py BEFORE AFTER`` compares two such files and exits non-zero when
AFTER misses an instantiation of BEFORE.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

LOSS_OPS = ("sigmoid_focal_loss", "sigmoid_focal_loss_star", "quality_focal_loss", "varifocal_loss",
            "softmax_focal_loss")

# The exponent argument of each op (QFL calls its exponent beta); None: compiled once for every value.
_EXPONENT = {"sigmoid_focal_loss": "gamma", "sigmoid_focal_loss_star": None, "quality_focal_loss": "beta",
             "varifocal_loss": "gamma", "softmax_focal_loss": "gamma"}


def gamma_kind(value: float) -> str:
    return {0.0: "gamma0", 1.0: "gamma1", 2.0: "gamma2"}.get(float(value), "gamma_other")


def _cuda_kernel(name: str, a: dict) -> str:
    """The CUDA loss kernel these arguments select (csrc/cuda/focal_cuda.cu; csrc/cuda/README.md, "The
    three loss kernels"): the outputs are fresh allocations, aligned."""
    targets = a["targets"]
    focal = name == "sigmoid_focal_loss"
    aligned = a["logits"].data_ptr() % 16 == 0 and (not targets.is_floating_point() or targets.data_ptr() % 16 == 0)
    unweighted = a["weight"] is None and a["row_weight"] is None
    ids = a.get("scores") is not None or (focal and not targets.is_floating_point() and a["label_smoothing"] == 0)
    if ids and a["reduction"] != "none" and aligned and unweighted:
        return "ids_kernel"
    if focal and targets.is_floating_point() and aligned and unweighted:
        return "float_kernel"
    return "general_kernel"


def instantiation(name: str, a: dict) -> str:
    """The instantiation key of one call of ``torch.ops.focal.<name>`` with arguments ``a`` (by name)."""
    logits = a["logits"]
    dtype = str(logits.dtype).removeprefix("torch.")
    exponent = _EXPONENT[name]
    gamma = "gamma_any" if exponent is None else gamma_kind(a[exponent])
    if name == "softmax_focal_loss":
        targets = "ids_smoothed" if a["label_smoothing"] > 0 else "ids"
        targets += "/rows" if logits.dim() <= 2 else "/spatial"
        weights = [w for w in ("weight", "alpha") if a[w] is not None]
    else:
        t = a["targets"]
        targets = ("float" if t.is_floating_point() else "ids_scores" if a.get("scores") is not None
                   else "ids_smoothed" if a["label_smoothing"] > 0 else "ids")
        weights = []
        if a["weight"] is not None:
            per_class = a["weight"].dim() == 1 and a["weight"].numel() == (logits.shape[-1] if logits.dim() else 1)
            weights.append("class" if per_class else "full")
        if a["row_weight"] is not None:
            weights.append("row")
    fields = [name, logits.device.type, dtype, targets, gamma, "+".join(weights) or "none", a["reduction"],
              "grad" if a["compute_grad"] else "nograd"]
    if logits.device.type == "cuda" and name != "softmax_focal_loss":
        fields.append(_cuda_kernel(name, a))
    return " ".join(fields)


class Recorder:
    """Records the instantiation of every kernel call of the focal loss ops while installed."""

    def __init__(self):
        self.seen: set[str] = set()
        self._library = None

    def install(self):
        import focal  # noqa: F401  (loads the extension, which defines the ops)

        self._library = torch.library.Library("focal", "IMPL")
        for name in LOSS_OPS:
            op = getattr(torch.ops.focal, name).default
            self._library.impl(name, self._kernel(name, op), "BackendSelect", with_keyset=True)

    def _kernel(self, name, op):
        names = [arg.name for arg in op._schema.arguments]

        def record_and_run(keyset, *args):
            out = op.redispatch(keyset.remove(torch._C.DispatchKey.BackendSelect), *args)
            logits = args[0]
            if logits.device.type != "meta" and logits.numel() > 0:
                self.seen.add(instantiation(name, dict(zip(names, args))))
            return out

        return record_and_run

    def write(self, path: str):
        Path(path).write_text("".join(f"{key}\n" for key in sorted(self.seen)))


def compiled(key: str) -> str:
    """The part of a key that selects compiled code on the CPU (loss, device, dtype, targets, gamma):
    weights, reduction and compute_grad are branches inside one instantiation there."""
    return " ".join(key.split()[:5])


def compare(before: set[str], after: set[str]) -> int:
    """Prints the counts and the differences; 1 when ``after`` misses a key of ``before``."""
    for what, project in (("compiled instantiations", compiled), ("full keys", lambda key: key)):
        b, a = {project(k) for k in before}, {project(k) for k in after}
        print(f"{what}: before {len(b)}, after {len(a)}, missing {len(b - a)}, new {len(a - b)}")
    missing, new = sorted(before - after), sorted(after - before)
    for key in missing:
        print(f"- {key}")
    for key in new:
        print(f"+ {key}")
    return 1 if missing else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/instantiations.py BEFORE AFTER")
    sets = [set(Path(p).read_text().split("\n")) - {""} for p in sys.argv[1:]]
    sys.exit(compare(*sets))
