"""Side-by-side benchmark of sigmoid focal loss implementations.

Times forward-only and forward+backward of the fused op (``focal.sigmoid_focal_loss``, with class-id
and with float targets) against its peers: torchvision eager and under ``torch.compile``, the
project's pure-PyTorch reference, and fvcore / kornia when they are installed. Every row computes the
same loss (alpha, gamma, ``reduction="sum"`` divided by a 0-dim tensor normaliser, ignored anchors
masked out), and every row is checked against a float64 evaluation of the reference before it is timed.

The floor is ``torch.sigmoid(x)``: one transcendental pass that reads the logits and writes one fresh
tensor of the same size, the least any implementation that returns a gradient must do. Every row
reports its ratio to it.

    python benchmarks/bench.py                       # all CPU shapes, fp32 + bf16 on CPU
    python benchmarks/bench.py --quick --json q.json # one shape, fp32, well under a minute
    python benchmarks/bench.py --device cuda --shapes headline paper --json gpu.json --plot gpu.png
    python benchmarks/bench.py --family              # then FL*, QFL, VFL and the softmax focal loss

On CUDA every call is timed with CUDA events after an L2 flush, with the GPU kept busy while the call
is enqueued so that the time is the device's, not Python's (the host time is reported beside it).

Run from the repository root (or with ``focal`` installed). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# An installed ``focal`` wins; the checkout (built in place) is the fallback.
sys.path.append(str(REPO_ROOT))

SCHEMA_VERSION = 1

# The loss every row computes: RetinaNet's settings.
ALPHA = 0.25
GAMMA = 2.0
IGNORE_INDEX = -100
NUM_CLASSES = 80

# Anchor labels as a RetinaNet matcher leaves them (IoU >= 0.5 positive, < 0.4 background, the band in
# between ignored): few positives, a few ignored, the rest background.
POSITIVE_FRACTION = 0.005
IGNORED_FRACTION = 0.02

FPN_STRIDES = (8, 16, 32, 64, 128)  # P3-P7
ANCHORS_PER_CELL = 9  # 3 scales x 3 aspect ratios


def retinanet_anchor_count(height: int, width: int, images: int = 1) -> int:
    """Anchors RetinaNet places on ``images`` images of ``height`` x ``width`` pixels over P3-P7."""
    cells = sum(math.ceil(height / s) * math.ceil(width / s) for s in FPN_STRIDES)
    return images * cells * ANCHORS_PER_CELL


@dataclasses.dataclass(frozen=True)
class Shape:
    """``rows`` x NUM_CLASSES logits. A batch of images is its anchors laid end to end: the op
    (like every peer) sees the same contiguous memory whether it is (images, anchors, C) or (rows, C)."""

    name: str
    rows: int
    description: str


SHAPES = {
    s.name: s
    for s in (
        Shape("small", 1_000, "1000 anchors: latency-bound"),
        Shape("r512x1", retinanet_anchor_count(512, 512, 1), "RetinaNet, 1 image at 512x512"),
        Shape("r512x2", retinanet_anchor_count(512, 512, 2), "RetinaNet, 2 images at 512x512"),
        Shape("r800x1", retinanet_anchor_count(800, 800, 1), "RetinaNet, 1 image at 800x800"),
        Shape("r800x2", retinanet_anchor_count(800, 800, 2), "RetinaNet, 2 images at 800x800"),
        Shape("headline", 200_000, "the speed goals' shape"),
        Shape("large", 1_000_000, "1M anchors: bandwidth-bound"),
        Shape("paper", 8 * 120_000, "8 images x 120000 anchors: a training batch at the paper's scale"),
    )
}
QUICK_SHAPES = ("r512x1",)
HEADLINE_SHAPE = "headline"
# The CPU default leaves out the paper-scale batch (minutes per peer there); CUDA runs every shape.
DEFAULT_SHAPES = {"cpu": tuple(k for k in SHAPES if k != "paper"), "cuda": tuple(SHAPES)}
# The GPU goals are stated for both of these shapes, the CPU goals for the headline shape.
GOAL_SHAPES = {"cpu": (HEADLINE_SHAPE,), "cuda": (HEADLINE_SHAPE, "paper")}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = {"fwd": "forward", "fwdbwd": "forward+backward"}

# max |error| / max |exact| allowed against the float64 evaluation, per input dtype. Peers computing
# in bf16 (torchvision eager) round every intermediate, hence their loose bf16 bound; the fused op
# computes in float32 and rounds only its gradient, so it is held to about that rounding.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
FUSED_TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}

FLOOR = "floor"


# --------------------------------------------------------------------------------------------------
# The problem every implementation solves


@dataclasses.dataclass
class Problem:
    """One benchmark case: logits and labels in every form the implementations take.

    ``logits`` is (N, C). ``class_ids`` is (N,) int64: a class in [0, C), -1 background, or
    IGNORE_INDEX. Implementations that take float targets get what their users would prepare once,
    outside the loss: ``one_hot`` (N, C), all-zero rows for background and ignored anchors, and
    ``keep`` (N, 1), 0 for ignored anchors and 1 elsewhere, both in the logits' dtype; they compute
    the elementwise loss and sum it masked by ``keep`` (faster for every peer than gathering the kept
    rows, detectron2-style, whose backward is a slow index_add). ``normalizer`` is a 0-dim float32
    tensor, the number of positives (>= 1).
    """

    shape: Shape
    dtype: torch.dtype
    logits: torch.Tensor
    class_ids: torch.Tensor
    one_hot: torch.Tensor
    keep: torch.Tensor
    normalizer: torch.Tensor

    @property
    def numel(self) -> int:
        return self.logits.numel()


def make_problem(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    n, c = shape.rows, NUM_CLASSES
    logits = (torch.randn(n, c, generator=gen) * 2.0 - 4.0).to(dtype)  # mostly confident background
    kind = torch.rand(n, generator=gen)
    ids = torch.full((n,), -1, dtype=torch.int64)
    positive = kind < POSITIVE_FRACTION
    ids[positive] = torch.randint(0, c, (int(positive.sum()),), generator=gen)
    ids[(kind >= POSITIVE_FRACTION) & (kind < POSITIVE_FRACTION + IGNORED_FRACTION)] = IGNORE_INDEX
    one_hot = (ids.unsqueeze(1) == torch.arange(c)).to(dtype)  # -1 and IGNORE_INDEX match no class
    keep = (ids != IGNORE_INDEX).unsqueeze(1).to(dtype)
    normalizer = torch.tensor(float(max(1, int(positive.sum()))), dtype=torch.float32)
    return Problem(
        shape=shape,
        dtype=dtype,
        logits=logits.to(device),
        class_ids=ids.to(device),
        one_hot=one_hot.to(device),
        keep=keep.to(device),
        normalizer=normalizer.to(device),
    )


# --------------------------------------------------------------------------------------------------
# Implementations


def _load_reference():
    """``focal.reference``, even when the compiled extension (and so ``import focal``) is missing."""
    try:
        from focal import reference

        return reference
    except ImportError:
        path = REPO_ROOT / "focal" / "reference.py"
        spec = importlib.util.spec_from_file_location("focal_reference", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


@dataclasses.dataclass
class Impl:
    """A row of the table. ``build(problem)`` returns ``loss_fn(logits) -> scalar loss`` (or, for
    the floor rows, the sigmoid), or raises ``Unavailable``."""

    key: str
    name: str
    build: Callable[[Problem], Callable[[torch.Tensor], torch.Tensor]]
    floor: bool = False  # floor rows: no loss, no gradient, not checked
    fused: bool = False
    ours: bool = False  # focal's own rows: one that disagrees with the exact loss fails the run


class Unavailable(Exception):
    pass


_FUSED_READY: dict[str, str | None] = {}  # device type -> None (runs) or why it cannot


def _fused_op(device: torch.device):
    """``focal.sigmoid_focal_loss`` once it has run on ``device``; ``Unavailable`` with the reason
    when it cannot (unbuilt checkout, CPU-only build asked for CUDA): a tiny call asks the op itself,
    so its own message says how to build."""
    try:
        from focal import sigmoid_focal_loss
    except ImportError as exc:
        raise Unavailable(f"focal not importable ({exc}); build it with `pip install -e .`") from exc
    if device.type not in _FUSED_READY:
        try:
            x = torch.zeros(1, 2, device=device)
            sigmoid_focal_loss(x, torch.zeros_like(x), reduction="sum")
            _FUSED_READY[device.type] = None
        except RuntimeError as exc:
            _FUSED_READY[device.type] = f"focal cannot run on {device.type}: {str(exc).splitlines()[0]}"
    if _FUSED_READY[device.type] is not None:
        raise Unavailable(_FUSED_READY[device.type])
    return sigmoid_focal_loss


def build_fused_ids(p: Problem):
    op = _fused_op(p.logits.device)
    ids, norm = p.class_ids, p.normalizer

    def loss_fn(x):
        return op(x, ids, ALPHA, GAMMA, "sum", normalizer=norm, ignore_index=IGNORE_INDEX)

    return loss_fn


def build_fused_float(p: Problem):
    op = _fused_op(p.logits.device)
    one_hot, keep, norm = p.one_hot, p.keep, p.normalizer

    def loss_fn(x):
        return op(x, one_hot, ALPHA, GAMMA, "sum", weight=keep, normalizer=norm)

    return loss_fn


def build_reference(p: Problem):
    ref = _load_reference().sigmoid_focal_loss
    one_hot, keep, norm = p.one_hot, p.keep, p.normalizer

    def loss_fn(x):
        return ref(x, one_hot, ALPHA, GAMMA, "sum", weight=keep, normalizer=norm)

    return loss_fn


def _torchvision_loss_fn(p: Problem):
    try:
        from torchvision.ops import sigmoid_focal_loss
    except ImportError as exc:
        raise Unavailable(f"torchvision not installed ({exc})") from exc

    one_hot, keep, norm = p.one_hot, p.keep, p.normalizer

    def loss_fn(x):
        return (sigmoid_focal_loss(x, one_hot, ALPHA, GAMMA, "none") * keep).sum() / norm

    return loss_fn


def build_torchvision(p: Problem):
    return _torchvision_loss_fn(p)


def build_torchvision_compiled(p: Problem):
    # A fresh cache per case, so no case runs into dynamo's recompile limit and falls back to eager.
    torch._dynamo.reset()
    return torch.compile(_torchvision_loss_fn(p), dynamic=False, fullgraph=True)


def build_fvcore(p: Problem):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
            from fvcore.nn import sigmoid_focal_loss_jit
    except ImportError as exc:
        raise Unavailable("fvcore not installed (pip install fvcore)") from exc
    one_hot, keep, norm = p.one_hot, p.keep, p.normalizer

    def loss_fn(x):
        return (sigmoid_focal_loss_jit(x, one_hot, ALPHA, GAMMA, "none") * keep).sum() / norm

    return loss_fn


def build_kornia(p: Problem):
    try:
        from kornia.losses import binary_focal_loss_with_logits
    except ImportError as exc:
        raise Unavailable("kornia not installed (pip install kornia)") from exc
    one_hot, keep, norm = p.one_hot, p.keep, p.normalizer

    def loss_fn(x):
        # Ignored anchors are masked by ``keep``, so kornia's own (per-element) ignore scan is off.
        loss = binary_focal_loss_with_logits(x, one_hot, ALPHA, GAMMA, "none", ignore_index=None)
        return (loss * keep).sum() / norm

    return loss_fn


def build_floor(p: Problem):
    return torch.sigmoid


def build_floor_out(p: Problem):
    out = torch.empty_like(p.logits)
    return lambda x: torch.sigmoid(x, out=out)


IMPLS = {
    i.key: i
    for i in (
        Impl(FLOOR, "torch.sigmoid(x)  [floor]", build_floor, floor=True),
        Impl("floor_out", "torch.sigmoid(x, out=y)", build_floor_out, floor=True),
        Impl("fused_ids", "focal (class-id targets)", build_fused_ids, fused=True, ours=True),
        Impl("fused_float", "focal (float targets)", build_fused_float, fused=True, ours=True),
        Impl("tv", "torchvision eager", build_torchvision),
        Impl("tv_compile", "torch.compile(torchvision)", build_torchvision_compiled),
        Impl("reference", "focal.reference (PyTorch)", build_reference, ours=True),
        Impl("fvcore", "fvcore sigmoid_focal_loss_jit", build_fvcore),
        Impl("kornia", "kornia binary_focal_loss", build_kornia),
    )
}


# --------------------------------------------------------------------------------------------------
# Agreement with the exact loss


def exact_loss_and_grad(p: Problem, chunk_rows: int = 32768) -> tuple[float, torch.Tensor]:
    """The reference, in float64 on the (already rounded) logits, with class-id targets and
    ``ignore_index``, so it also checks that masking ignored rows is the same loss. Chunked over
    rows to bound memory: the loss is a sum and each gradient row depends on its own row only."""
    ref = _load_reference().sigmoid_focal_loss
    total = 0.0
    grad = torch.empty(p.logits.shape, dtype=torch.float64, device=p.logits.device)
    norm = p.normalizer.double()
    for start in range(0, p.shape.rows, chunk_rows):
        x = p.logits[start : start + chunk_rows].double().requires_grad_(True)
        ids = p.class_ids[start : start + chunk_rows]
        loss = ref(x, ids, ALPHA, GAMMA, "sum", normalizer=norm, ignore_index=IGNORE_INDEX)
        (g,) = torch.autograd.grad(loss, x)
        total += loss.item()
        grad[start : start + chunk_rows] = g
    return total, grad


def relative_max_error(got: torch.Tensor, exact: torch.Tensor, chunk_rows: int = 32768) -> float:
    scale = exact.abs().max().item() or 1.0
    worst = 0.0
    for start in range(0, exact.shape[0], chunk_rows):
        diff = got[start : start + chunk_rows].double() - exact[start : start + chunk_rows]
        worst = max(worst, diff.abs().max().item())
    return worst / scale


def check_agreement(loss_fn, p: Problem, mode: str, exact, fused: bool) -> dict:
    """Runs ``loss_fn`` once (which also compiles what needs compiling) and compares."""
    tol = (FUSED_TOLERANCES if fused else TOLERANCES)[p.dtype]
    x = p.logits.detach().clone().requires_grad_(mode == "fwdbwd")
    with torch.set_grad_enabled(mode == "fwdbwd"):
        loss = loss_fn(x)
    result = {"tolerance": tol, "loss": loss.item(), "loss_dtype": str(loss.dtype).removeprefix("torch.")}
    exact_loss, exact_grad = exact
    result["value_error"] = abs(loss.item() - exact_loss) / max(abs(exact_loss), 1e-30)
    ok = loss.dim() == 0 and result["value_error"] <= tol
    if mode == "fwdbwd":
        loss.backward()
        result["grad_error"] = relative_max_error(x.grad, exact_grad)
        ok = ok and x.grad.dtype == p.dtype and result["grad_error"] <= tol
    result["ok"] = bool(ok)
    return result


# --------------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Times one call of ``step``: wall clock on CPU; CUDA events after an L2 flush on CUDA.

    On CUDA a call that takes Python longer to enqueue than the GPU to run would otherwise be timed
    by its launch gaps (a fused fwd+bwd over 16M elements runs in tens of microseconds, about what
    an autograd call costs the host). So before the first event the GPU spins (``torch.cuda._sleep``)
    for twice the host time this step took last call, and the events see the work already queued:
    device time, as in a training step where the host runs ahead. ``last_host_s`` is the host's
    enqueue time of the last call and ``last_hidden`` whether it fitted in the spin."""

    MAX_FILL_S = 0.02

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.last_host_s: float | None = None
        self.last_hidden: bool | None = None
        if self.cuda:
            l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
            self.flush_buffer = torch.empty(max(2 * l2_bytes, 64 << 20), dtype=torch.uint8, device=device)
            self.spin = getattr(torch.cuda, "_sleep", None)
            self.cycles_per_s = self._spin_rate() if self.spin else None
            self.fill_s: dict[int, float] = {}  # per step: how long to keep the GPU busy

    def _spin_rate(self) -> float:
        """Cycles per second of ``torch.cuda._sleep``, measured (clocks vary by card and boost)."""
        cycles = 2_000_000
        self.spin(cycles)  # first call loads the kernel
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        self.spin(cycles)
        end.record()
        end.synchronize()
        return cycles / (begin.elapsed_time(end) / 1e3)

    def __call__(self, step: Callable[[], None]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            step()
            return time.perf_counter() - start
        self.flush_buffer.zero_()
        fill = self.fill_s.get(id(step), 1e-3)
        if self.spin:
            self.spin(int(fill * self.cycles_per_s))
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        start = time.perf_counter()
        step()
        host = time.perf_counter() - start
        end.record()
        end.synchronize()
        self.last_host_s, self.last_hidden = host, bool(self.spin) and host < fill
        self.fill_s[id(step)] = min(max(2 * host, 2e-4), self.MAX_FILL_S)
        return begin.elapsed_time(end) / 1e3


def make_step(impl: Impl, loss_fn, p: Problem, mode: str) -> Callable[[], None]:
    """One timed call. ``step.logits`` is the leaf it differentiates with respect to."""
    x = p.logits.detach().clone()
    if impl.floor or mode == "fwd":

        def step():
            with torch.no_grad():
                loss_fn(x)

    else:
        x.requires_grad_(True)

        def step():
            x.grad = None  # no accumulation: every run writes a fresh gradient, as a training step does
            loss_fn(x).backward()

    step.logits = x
    return step


def peak_memory(step, device: torch.device) -> int | None:
    """Bytes allocated by one call on top of the inputs (CUDA only); the gradient counts."""
    if device.type != "cuda":
        return None
    step.logits.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bytes_moved(impl: Impl, p: Problem, mode: str) -> int:
    """The bytes a row must at least read and write: its logits and targets, plus the gradient
    for forward+backward. The floor reads the logits and writes the sigmoid. The fused op with class
    ids reads the logits and one int64 per row; every row fed float targets (the fused op's float
    form, torchvision eager and compiled, the other peers) reads the logits, the one-hot targets and
    the (N, 1) keep mask, all in the logits' dtype. A lower bound: what a row's own intermediates
    (torchvision eager writes several) cost comes on top."""
    item = p.logits.element_size()
    logits = p.numel * item
    if impl.floor:
        return 2 * logits
    if impl.key == "fused_ids":
        targets = p.class_ids.numel() * p.class_ids.element_size()
    else:
        targets = (p.one_hot.numel() + p.keep.numel()) * item
    return logits + targets + (logits if mode == "fwdbwd" else 0)


# --------------------------------------------------------------------------------------------------
# One case: shape x dtype x mode


def run_case(shape, dtype, mode, impl_keys, device, timer, budget_s, min_rounds, max_rounds, warmup):
    p = make_problem(shape, dtype, device)
    exact = exact_loss_and_grad(p)
    if mode == "fwd":
        exact = (exact[0], None)
    rows, steps = [], {}
    for key in impl_keys:
        impl = IMPLS[key]
        row = {"key": key, "name": impl.name, "ours": impl.ours, "available": True, "note": None, "agreement": None}
        rows.append(row)
        try:
            loss_fn = impl.build(p)
        except Unavailable as exc:
            row.update(available=False, note=str(exc))
            continue
        if not impl.floor:
            try:
                row["agreement"] = check_agreement(loss_fn, p, mode, exact, impl.fused)
            except Exception as exc:
                message = f"failed: {type(exc).__name__}: {exc}".splitlines()[0]
                if impl.fused:  # the subject of the benchmark must run: a failure fails the run
                    row.update(note=message, agreement={"ok": False, "error": message})
                else:  # a peer that cannot run this case (dtype, device) is reported and skipped
                    row.update(available=False, note=message)
                continue
            if not row["agreement"]["ok"]:
                # A peer's disagreement (torchvision's float16 sum overflows to inf, say) is a
                # finding about that peer, reported; focal's own fails the run.
                row["note"] = "results disagree with the exact loss: not timed"
                continue
        steps[key] = make_step(impl, loss_fn, p, mode)

    for step in steps.values():
        for _ in range(warmup):
            timer(step)
    # Rounds go on until the time budget is spent (within [min_rounds, max_rounds]); round-robin,
    # so that load from elsewhere on the machine (preemptions of 10 ms and more on a busy host) hits
    # every row alike, and the median sees past it.
    times = {key: [] for key in steps}
    host_times = {key: [] for key in steps}  # CUDA: the host's enqueue time of each call
    hidden = {key: [] for key in steps}  # CUDA: whether the enqueue fitted in the spin before it
    rounds, start = 0, time.perf_counter()
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for key, step in steps.items():
            times[key].append(timer(step))
            if timer.last_host_s is not None:
                host_times[key].append(timer.last_host_s)
                hidden[key].append(timer.last_hidden)
        rounds += 1

    floor_s = statistics.median(times[FLOOR]) if FLOOR in times else None
    for row in rows:
        key = row["key"]
        if key not in times:
            row["median_s"] = None
            continue
        med = statistics.median(times[key])
        nbytes = bytes_moved(IMPLS[key], p, mode)
        row.update(
            median_s=med,
            min_s=min(times[key]),
            times_s=times[key],
            elements_per_s=p.numel / med,
            bytes=nbytes,
            gb_per_s=nbytes / med / 1e9,
            floor_ratio=med / floor_s if floor_s else None,
            peak_memory_bytes=peak_memory(steps[key], device),
        )
        if host_times[key]:
            row.update(
                host_median_s=statistics.median(host_times[key]),
                launch_hidden_fraction=sum(hidden[key]) / len(hidden[key]),
            )
    timed = [r for r in rows if r.get("median_s")]
    ratios = {a["key"]: {b["key"]: a["median_s"] / b["median_s"] for b in timed} for a in timed}
    return {
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {"name": shape.name, "rows": shape.rows, "classes": NUM_CLASSES, "description": shape.description},
        "elements": p.numel,
        "positives": int(p.normalizer.item()),
        "ignored": int((p.keep == 0).sum()),
        "rounds": rounds,
        "rows": rows,
        "ratios": ratios,
    }


# --------------------------------------------------------------------------------------------------
# Goals


BYTES_RATIO = "bytes"  # threshold of a speedup goal: bytes(torch.compile(torchvision)) / bytes(fused)


def _goal_table(device_type: str):
    """(name, shape, dtype, fused row, metric, comparison, threshold); metric 'speedup' is
    time(torch.compile(torchvision)) / time(fused), 'floor_ratio' is time(fused) / time(floor).

    On CUDA the op is bandwidth-bound: its goals are to stay within 1.25x of the floor (one read and
    one write of the logits' size) and to beat torch.compile(torchvision) by at least the ratio of the
    bytes each must move (``BYTES_RATIO``: see ``bytes_moved``), i.e. to be no slower per byte."""
    if device_type == "cuda":
        goals = []
        for shape in GOAL_SHAPES["cuda"]:
            for dt in ("float32", "bfloat16"):
                goals.append((f"{dt} {shape} fwd+bwd <= 1.25x floor", shape, dt, "fused_ids", "floor_ratio", "<=", 1.25))
                goals.append((f"{dt} {shape} fwd+bwd faster than torch.compile by its bytes ratio", shape, dt,
                              "fused_ids", "speedup", ">=", BYTES_RATIO))
        return goals
    h = HEADLINE_SHAPE
    return [
        ("fp32 fwd+bwd >= 8x torch.compile(torchvision)", h, "float32", "fused_ids", "speedup", ">=", 8.0),
        ("fp32 fwd+bwd <= 2x floor", h, "float32", "fused_ids", "floor_ratio", "<=", 2.0),
        ("bf16 fwd+bwd >= 8x torch.compile(torchvision)", h, "bfloat16", "fused_ids", "speedup", ">=", 8.0),
        ("bf16 fwd+bwd <= 2x floor", h, "bfloat16", "fused_ids", "floor_ratio", "<=", 2.0),
        ("fp32 float targets fwd+bwd >= 5x torch.compile", h, "float32", "fused_float", "speedup", ">=", 5.0),
    ]


def evaluate_goals(cases, device_type: str, threads: int) -> list[dict]:
    goals = []
    for name, shape, dtype, fused_key, metric, op, threshold in _goal_table(device_type):
        goal = {
            "name": name,
            "shape": shape,
            "dtype": dtype,
            "mode": "fwdbwd",
            "row": fused_key,
            "metric": metric,
            "threshold": None if threshold == BYTES_RATIO else threshold,
            "measured": None,
            "status": "NOT RUN",
        }
        if threshold == BYTES_RATIO:
            goal["threshold_rule"] = "bytes moved by torch.compile(torchvision) / bytes moved by the fused op"
        goals.append(goal)
        case = next(
            (c for c in cases if c["shape"]["name"] == shape and c["dtype"] == dtype and c["mode"] == "fwdbwd"),
            None,
        )
        if case is None:
            goal["note"] = "case not in this run"
            continue
        ratios = case["ratios"].get(fused_key)
        peer = "tv_compile" if metric == "speedup" else FLOOR
        if not ratios or peer not in ratios:
            goal["note"] = f"{fused_key} or {peer} not timed"
            continue
        if threshold == BYTES_RATIO:
            nbytes = {r["key"]: r["bytes"] for r in case["rows"] if r.get("bytes")}
            threshold = goal["threshold"] = nbytes[peer] / nbytes[fused_key]
        measured = 1.0 / ratios[peer] if metric == "speedup" else ratios[peer]
        goal["measured"] = measured
        passed = measured >= threshold if op == ">=" else measured <= threshold
        goal["status"] = "PASS" if passed else "FAIL"
    if device_type == "cpu" and threads != 2:
        for goal in goals:
            goal["note"] = (goal.get("note", "") + f" (the CPU goals are stated for 2 threads; run used {threads})").strip()
    return goals


# --------------------------------------------------------------------------------------------------
# Machine description


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _thp_mode() -> dict:
    """PyTorch's CPU allocator asks the kernel for transparent huge pages on large allocations only
    when THP_MEM_ALLOC_ENABLE=1 (read once, at its first allocation) and the kernel's THP mode
    allows madvise."""
    try:
        kernel = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        kernel = kernel.split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        kernel = "unknown"
    env = os.environ.get("THP_MEM_ALLOC_ENABLE")
    enabled = kernel == "always" or (env == "1" and kernel == "madvise")
    return {"THP_MEM_ALLOC_ENABLE": env, "kernel": kernel, "huge_pages_for_large_tensors": enabled}


def _torchvision_version() -> str | None:
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision.__version__


def describe_machine(device: torch.device, threads: int) -> dict:
    info = {
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torchvision": _torchvision_version(),
        "python": platform.python_version(),
        # GIT_COMMIT names the commit where the tree was copied without its history (a GPU host).
        "git_commit": os.environ.get("GIT_COMMIT") or _git("rev-parse", "HEAD"),
        "git_describe": os.environ.get("GIT_COMMIT") or _git("describe", "--always", "--dirty"),
        "thp": _thp_mode(),
        # Other work on the machine shows up in every timing: record how busy it was.
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_bytes"] = props.total_memory
        info["l2_cache_bytes"] = getattr(props, "L2_cache_size", None)
    return info


def measure_cpu_facts(repeats: int = 7) -> dict:
    """Three costs that explain the CPU numbers, measured on 64 MB (16M float32) tensors:
    the page faults of writing a fresh tensor, ``torch.sigmoid`` into a fresh vs a reused tensor,
    and Sleef's ``log1p`` against ``log`` (a kernel built on log1p pays for it)."""
    n = 16 * 2**20
    x = torch.randn(n).abs_()
    reused = torch.empty_like(x)

    def median_ms(fn):
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3

    fill_fresh = median_ms(lambda: torch.empty(n).fill_(1.0))
    fill_reused = median_ms(lambda: reused.fill_(1.0))
    return {
        "tensor_mib": n * 4 / 2**20,
        "fresh_tensor_first_write_ms": fill_fresh - fill_reused,
        "sigmoid_fresh_ms": median_ms(lambda: torch.sigmoid(x)),
        "sigmoid_out_ms": median_ms(lambda: torch.sigmoid(x, out=reused)),
        "log_ms": median_ms(lambda: torch.log(x, out=reused)),
        "log1p_ms": median_ms(lambda: torch.log1p(x, out=reused)),
    }


def print_cpu_facts(facts: dict) -> None:
    print(
        f"note: on this machine, writing a fresh {facts['tensor_mib']:.0f} MiB tensor costs "
        f"{facts['fresh_tensor_first_write_ms']:.1f} ms of page faults over a reused one; torch.sigmoid(x) "
        f"takes {facts['sigmoid_fresh_ms']:.1f} ms into a fresh tensor, {facts['sigmoid_out_ms']:.1f} ms with out=; "
        f"log1p {facts['log1p_ms']:.1f} ms vs log {facts['log_ms']:.1f} ms "
        f"({facts['log1p_ms'] / facts['log_ms']:.1f}x)"
    )


# --------------------------------------------------------------------------------------------------
# Output


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:8.1f} us"
    return f"{s * 1e3:8.2f} ms"


def _check_text(agreement: dict | None) -> str:
    if not agreement or "value_error" not in agreement:
        return ""
    errors = f"loss {agreement['value_error']:.1e}"
    if "grad_error" in agreement:
        errors += f", grad {agreement['grad_error']:.1e}"
    return f"  {'ok' if agreement['ok'] else 'MISMATCH'} ({errors}, tolerance {agreement['tolerance']:.0e})"


def print_case(case: dict, matrix: bool) -> None:
    shape = case["shape"]
    print(
        f"\n== {MODES[case['mode']]} | {case['dtype']} | {shape['name']}: {shape['rows']} x {shape['classes']}"
        f" ({shape['description']}) | {case['rounds']} rounds =="
    )
    header = f"{'implementation':31s} {'median':>11s} {'Gelem/s':>8s} {'GB/s':>7s} {'x floor':>8s} {'x focal':>8s}"
    if any(r.get("peak_memory_bytes") is not None for r in case["rows"]):
        header += f" {'peak MiB':>9s}"
    if any(r.get("host_median_s") is not None for r in case["rows"]):
        header += f" {'host':>11s}"
    print(header + "  check")
    for row in case["rows"]:
        line = f"{row['name']:31s} "
        if row.get("median_s") is None:
            print(line + (row["note"] or "not timed") + _check_text(row["agreement"]))
            continue
        floor = row["floor_ratio"]
        vs_fused = case["ratios"][row["key"]].get("fused_ids")
        line += f"{_fmt_time(row['median_s'])} {row['elements_per_s'] / 1e9:8.3f} {row['gb_per_s']:7.1f}"
        line += f" {floor:8.2f}" if floor else f" {'-':>8s}"
        line += f" {vs_fused:8.2f}" if vs_fused else f" {'-':>8s}"
        if row.get("peak_memory_bytes") is not None:
            line += f" {row['peak_memory_bytes'] / 2**20:9.1f}"
        if row.get("host_median_s") is not None:
            line += f" {_fmt_time(row['host_median_s'])}"
            if row["launch_hidden_fraction"] < 1.0:
                line += f" (enqueue outlasted the spin in {1 - row['launch_hidden_fraction']:.0%} of calls)"
        print(line + _check_text(row["agreement"]))
    if matrix and len(case["ratios"]) > 1:
        keys = list(case["ratios"])
        width = max(9, max(len(k) for k in keys) + 1)
        print(f"  time(row) / time(column):\n  {'':13s}" + "".join(f"{k:>{width}s}" for k in keys))
        for a in keys:
            print(f"  {a:13s}" + "".join(f"{case['ratios'][a][b]:{width}.2f}" for b in keys))


def print_goals(goals: list[dict]) -> None:
    shapes = ", ".join(dict.fromkeys(g["shape"] for g in goals))
    print(f"\n== goals ({shapes}; forward+backward, reduction sum / normaliser) ==")
    for g in goals:
        measured = f"{g['measured']:.2f}x" if g["measured"] is not None else "-"
        target = f" (needs {'>=' if g['metric'] == 'speedup' else '<='} {g['threshold']:.2f}x)" if g["threshold"] else ""
        note = f"  [{g['note']}]" if g.get("note") else ""
        print(f"  {g['status']:7s} {g['name']:62s} measured {measured}{target}{note}")


def plot_cases(cases: list[dict], path: str, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {key: i for i, key in enumerate([*MODES, *DTYPES])}
    panels = sorted({(c["mode"], c["dtype"]) for c in cases}, key=lambda md: (order[md[0]], order[md[1]]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    keys = [k for k in IMPLS if any(k in c["ratios"] for c in cases)]
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(IMPLS)}
    for ax, (mode, dtype) in zip(axes[:, 0], panels):
        group = [c for c in cases if c["mode"] == mode and c["dtype"] == dtype]
        width = 0.8 / max(1, len(keys))
        for j, key in enumerate(keys):
            xs, ys = [], []
            for i, case in enumerate(group):
                row = next((r for r in case["rows"] if r["key"] == key and r.get("floor_ratio")), None)
                if row:
                    xs.append(i + (j - (len(keys) - 1) / 2) * width)
                    ys.append(row["floor_ratio"])
            ax.bar(xs, ys, width, label=IMPLS[key].name, color=colors[key])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("time / floor (log)")
        ax.set_xticks(range(len(group)), [f"{c['shape']['name']}\n{c['shape']['rows']}x{NUM_CLASSES}" for c in group])
        ax.set_title(f"{MODES[mode]}, {dtype}")
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['threads']} threads"
    fig.suptitle(f"sigmoid focal loss: time relative to torch.sigmoid(x) - {where}, torch {machine['torch']}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 if len(panels) < 3 else 0.03, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# CLI


def run_family(args) -> int:
    """The family's own benchmarks after this one's cases, with the same device, threads and
    quickness: their tables follow this one's; their exit statuses are combined."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_family

    common = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    import bench_softmax

    print("\n== the family: FL*, QFL, VFL (benchmarks/bench_family.py)")
    status = bench_family.main(["--device", args.device] + common)
    print("\n== the softmax focal loss (benchmarks/bench_softmax.py)")
    return status or bench_softmax.main(["--device", args.device] + common)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), help="default: float32 bfloat16 (+ float16 on cuda)")
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), help="default: all (on cpu: all but paper)")
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    parser.add_argument("--impls", nargs="+", choices=tuple(IMPLS), help="default: all (the floor is always run)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="one RetinaNet shape, float32, few rounds (CI smoke test)")
    parser.add_argument("--budget", type=float, help="seconds of timed rounds per case (default 3, quick 0.3)")
    parser.add_argument("--json", metavar="PATH", help="write every measurement here")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (PNG) here")
    parser.add_argument("--matrix", action="store_true", help="print each case's full time-ratio matrix")
    parser.add_argument("--family", action="store_true",
                        help="then the rest of the family: bench_family.py (FL*, QFL, VFL) and bench_softmax.py "
                             "(the softmax focal loss against F.cross_entropy)")
    parser.add_argument("--require-fused", action="store_true",
                        help="exit 1 when the fused op cannot run on the device (default: skip its rows with a note)")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = ["float32"] if args.quick else ["float32", "bfloat16"] + (["float16"] if args.device == "cuda" else [])
    if args.device == "cpu" and "float16" in args.dtype:
        parser.error("float16 is benchmarked on cuda only")
    if args.shapes is None:
        args.shapes = list(QUICK_SHAPES) if args.quick else list(DEFAULT_SHAPES[args.device])
    if args.impls is None:
        args.impls = list(IMPLS)
    args.impls = [FLOOR] + [k for k in IMPLS if k in args.impls and k != FLOOR]
    if args.budget is None:
        args.budget = 0.3 if args.quick else 3.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    machine = describe_machine(device, torch.get_num_threads())
    timer = Timer(device)

    print(f"machine: {machine.get('gpu', machine['cpu'])}, {machine['threads']} threads, torch {machine['torch']}, "
          f"commit {machine['git_describe']}, load average {machine['load_average_at_start']:.1f}")
    notes = []
    if device.type == "cpu":
        thp = machine["thp"]
        if thp["huge_pages_for_large_tensors"]:
            notes.append(f"huge pages: ON (THP_MEM_ALLOC_ENABLE={thp['THP_MEM_ALLOC_ENABLE']}, kernel THP '{thp['kernel']}')")
        else:
            notes.append(
                f"huge pages: OFF (THP_MEM_ALLOC_ENABLE={thp['THP_MEM_ALLOC_ENABLE']}, kernel THP '{thp['kernel']}'): every "
                "fresh large tensor pays 4 KiB page faults on first write; THP_MEM_ALLOC_ENABLE=1 makes all rows, "
                "the floor included, faster (see benchmarks/README.md)"
            )
    probe = make_problem(Shape("probe", 8, ""), torch.float32, device)
    availability = {}
    for key in args.impls:
        try:
            if key != "tv_compile":  # compiling just to probe would cost seconds
                IMPLS[key].build(probe)
            availability[key] = {"name": IMPLS[key].name, "available": True, "note": None}
        except Unavailable as exc:
            availability[key] = {"name": IMPLS[key].name, "available": False, "note": str(exc)}
            notes.append(f"skipped {IMPLS[key].name}: {exc}")
    for note in notes:
        print("note: " + note)
    facts = None
    if device.type == "cpu":
        facts = measure_cpu_facts(3 if args.quick else 7)
        print_cpu_facts(facts)

    for path in (args.json, args.plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def make_result(cases: list[dict], complete: bool) -> dict:
        """Everything measured so far; the JSON is rewritten after every case, so that a run cut
        short (a time limit) still leaves its finished cases behind, marked ``complete: false``."""
        return {
            "schema": SCHEMA_VERSION,
            "complete": complete,
            "machine": machine,
            "loss": {
                "alpha": ALPHA, "gamma": GAMMA, "reduction": "sum", "normalizer": "0-dim float32 tensor: number of positives",
                "ignore_index": IGNORE_INDEX, "num_classes": NUM_CLASSES,
                "positive_fraction": POSITIVE_FRACTION, "ignored_fraction": IGNORED_FRACTION,
            },
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
            "implementations": availability,
            "notes": notes,
            "cpu_facts": facts,
            "cases": cases,
            "goals": evaluate_goals(cases, device.type, machine["threads"]),
            "agreement_ok": all(r["agreement"]["ok"] for c in cases for r in c["rows"] if r["agreement"] and r["ours"]),
        }

    cases = []
    for shape_name in args.shapes:
        for dtype_name in args.dtype:
            for mode in args.modes:
                keys = [k for k in args.impls if availability[k]["available"]]
                case = run_case(
                    SHAPES[shape_name], DTYPES[dtype_name], mode, keys, device, timer,
                    budget_s=args.budget, min_rounds=3 if args.quick else 5, max_rounds=20 if args.quick else 200,
                    warmup=1 if args.quick else 3,
                )
                cases.append(case)
                print_case(case, args.matrix)
                sys.stdout.flush()
                if args.json:
                    Path(args.json).write_text(json.dumps(make_result(cases, complete=False), indent=1))

    machine["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = make_result(cases, complete=True)
    goals, agreement_ok = result["goals"], result["agreement_ok"]
    print_goals(goals)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            print(f"note: no plot written to {args.plot}: matplotlib is not installed")
        else:
            plot_cases(cases, args.plot, machine)
            print(f"wrote {args.plot}")
    family_status = run_family(args) if args.family else 0
    if not agreement_ok:
        print("error: focal disagrees with the exact loss (see 'check' above)", file=sys.stderr)
        return 1
    if family_status:
        return family_status
    fused_missing = [k for k in args.impls if IMPLS[k].fused and not availability[k]["available"]]
    if args.require_fused and fused_missing:
        print(f"error: --require-fused, but {', '.join(fused_missing)} could not run: "
              f"{availability[fused_missing[0]]['note']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
