"""What the benchmark measures: the problem every row solves, the losses, their rows, the exact check.

A *loss* is a row of ``LOSSES`` (which function of ``focal`` and ``focal.reference``, its
hyper-parameters, how its targets look); a *row* of ``ROWS`` is one way of computing it (the fused op
with class ids or with dense targets, a peer, the floor). Adding a loss is an entry in ``LOSSES``;
adding a peer is an entry in ``ROWS`` and its key in the losses it computes.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
NUM_CLASSES = 80
# Anchor labels as a RetinaNet matcher leaves them (IoU >= 0.5 positive, < 0.4 background, the band in
# between ignored): few positives, a few ignored, the rest background.
POSITIVE_FRACTION = 0.005
IGNORED_FRACTION = 0.02
FPN_STRIDES = (8, 16, 32, 64, 128)  # P3-P7
ANCHORS_PER_CELL = 9  # 3 scales x 3 aspect ratios

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# max |error| / max |exact| against float64, loss and gradient. The fused ops compute in float32 and
# round once; peers computing in 16 bits (torchvision eager) round every intermediate.
FUSED_TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
PEER_TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def retinanet_anchor_count(height: int, width: int, images: int = 1) -> int:
    """Anchors RetinaNet places on ``images`` images of ``height`` x ``width`` pixels over P3-P7."""
    cells = sum(math.ceil(height / s) * math.ceil(width / s) for s in FPN_STRIDES)
    return images * cells * ANCHORS_PER_CELL


@dataclasses.dataclass(frozen=True)
class Shape:
    """``rows`` x ``classes`` logits. A batch of images is its anchors (or pixels) laid end to end: every
    row sees the same contiguous memory whether it is (images, anchors, C) or (rows, C)."""

    name: str
    rows: int
    description: str
    classes: int = NUM_CLASSES


SHAPES = {
    s.name: s
    for s in (
        Shape("small", 1_000, "1000 anchors: latency-bound"),
        Shape("r512x1", retinanet_anchor_count(512, 512, 1), "RetinaNet, 1 image at 512x512"),
        Shape("r512x2", retinanet_anchor_count(512, 512, 2), "RetinaNet, 2 images at 512x512"),
        Shape("r800x1", retinanet_anchor_count(800, 800, 1), "RetinaNet, 1 image at 800x800"),
        Shape("r800x2", retinanet_anchor_count(800, 800, 2), "RetinaNet, 2 images at 800x800"),
        Shape("headline", 200_000, "the goals' shape"),
        Shape("large", 1_000_000, "1M anchors: bandwidth-bound"),
        Shape("paper", 8 * 120_000, "8 images x 120000 anchors, the paper's training batch"),
        Shape("voc", 8 * 128 * 128, "8 images of 128x128 pixels, Pascal VOC's 21 classes", classes=21),
    )
}


@dataclasses.dataclass
class Problem:
    """Logits ``(N, C)`` and their targets in every form a row takes.

    ``ids`` (N,): a class in [0, C), -1 background or IGNORE_INDEX. ``labels`` (N,): the same with a
    class for every background row (the softmax loss has no background). ``scores`` (N,): a quality in
    [0, 1] per row (QFL / VFL). Dense forms, what users of float targets prepare once outside the loss:
    ``one_hot`` and ``quality`` (N, C), all zero on background and ignored rows, and ``keep`` (N, 1),
    0 on ignored rows (masking is every peer's fastest way to leave rows out). ``normalizer``: the
    number of positives (>= 1), a 0-dim float32 tensor; every row computes sum / normalizer.
    """

    logits: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    one_hot: torch.Tensor
    quality: torch.Tensor
    keep: torch.Tensor
    normalizer: torch.Tensor

    def rows(self, sl: slice) -> "Problem":
        """The rows ``sl`` of every per-row tensor, the normaliser unchanged."""
        return Problem(**{f.name: getattr(self, f.name) if f.name == "normalizer" else getattr(self, f.name)[sl]
                          for f in dataclasses.fields(self)})


def make_problem(shape: Shape, dtype: torch.dtype, device, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    n, c = shape.rows, shape.classes
    logits = torch.randn(n, c, generator=gen) * 2.0 - 4.0  # mostly confident background
    kind = torch.rand(n, generator=gen)
    ids = torch.full((n,), -1, dtype=torch.int64)
    positive = kind < POSITIVE_FRACTION
    ids[positive] = torch.randint(0, c, (int(positive.sum()),), generator=gen)
    ids[(kind >= POSITIVE_FRACTION) & (kind < POSITIVE_FRACTION + IGNORED_FRACTION)] = IGNORE_INDEX
    labels = torch.where(ids == -1, torch.randint(0, c, (n,), generator=gen), ids)
    scores = torch.rand(n, generator=gen)
    one_hot = (ids.unsqueeze(1) == torch.arange(c)).float()  # -1 and IGNORE_INDEX match no class
    as_logits = dict(device=device, dtype=dtype)
    return Problem(
        logits=logits.to(**as_logits),
        ids=ids.to(device),
        labels=labels.to(device),
        scores=scores.to(**as_logits),
        one_hot=one_hot.to(**as_logits),
        quality=(one_hot * scores.unsqueeze(1)).to(**as_logits),
        keep=(ids != IGNORE_INDEX).unsqueeze(1).to(**as_logits),
        normalizer=positive.sum().clamp(min=1).to(device, torch.float32),
    )


# --------------------------------------------------------------------------------------------------
# The losses


@dataclasses.dataclass(frozen=True)
class Loss:
    """One loss of the family: ``function`` names it in ``focal`` and ``focal.reference``, called as
    ``function(x, targets, *params, reduction="sum", normalizer=n, ...)``."""

    key: str
    title: str
    function: str
    params: tuple
    ids: Callable[[Problem], object]  # the class-id form of the targets
    dense: Callable[[Problem], torch.Tensor] | None  # dense float targets; None: class ids only
    rows: tuple[str, ...]
    softmax: bool = False


_FAMILY_ROWS = ("floor", "floor_out", "fused_ids", "fused_float", "reference", "reference_compile")
LOSSES = {
    loss.key: loss
    for loss in (
        Loss("focal", "sigmoid focal loss (alpha 0.25, gamma 2)", "sigmoid_focal_loss", (0.25, 2.0),
             lambda p: p.ids, lambda p: p.one_hot,
             ("floor", "floor_out", "fused_ids", "fused_float", "tv", "tv_compile", "reference", "fvcore", "kornia")),
        Loss("star", "FL* (gamma 2, beta 1)", "sigmoid_focal_loss_star", (2.0, 1.0),
             lambda p: p.ids, lambda p: p.one_hot, _FAMILY_ROWS),
        Loss("quality", "quality focal loss (beta 2)", "quality_focal_loss", (2.0,),
             lambda p: (p.ids, p.scores), lambda p: p.quality, _FAMILY_ROWS),
        Loss("varifocal", "varifocal loss (alpha 0.75, gamma 2)", "varifocal_loss", (0.75, 2.0),
             lambda p: (p.ids, p.scores), lambda p: p.quality, _FAMILY_ROWS),
        Loss("softmax", "softmax focal loss (gamma 2)", "softmax_focal_loss", (None, 2.0),
             lambda p: p.labels, None, ("floor", "fused_ids", "cross_entropy", "reference", "kornia"), softmax=True),
    )
}


# --------------------------------------------------------------------------------------------------
# The rows


class Unavailable(Exception):
    """A row that cannot run here (package not installed, no kernels for the device)."""


_KERNELS: dict[str, str | None] = {}  # device type -> None (the fused ops run) or why they cannot


def _fused(loss: Loss, device: torch.device):
    """``focal.<function>`` once a tiny call has run on ``device``; otherwise ``Unavailable`` with the
    op's own message (an unbuilt checkout, a CPU-only build asked for CUDA)."""
    import focal

    if device.type not in _KERNELS:
        try:
            x = torch.zeros(1, 2, device=device)
            focal.sigmoid_focal_loss(x, torch.zeros_like(x), reduction="sum")
            _KERNELS[device.type] = None
        except RuntimeError as exc:
            _KERNELS[device.type] = f"focal cannot run on {device.type}: {str(exc).splitlines()[0]}"
    if _KERNELS[device.type] is not None:
        raise Unavailable(_KERNELS[device.type])
    return getattr(focal, loss.function)


def _import(module: str, name: str, install: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore's torch.jit.script deprecation notice
            return getattr(__import__(module, fromlist=[name]), name)
    except ImportError as exc:
        raise Unavailable(f"{module} not installed ({install})") from exc


def _masked_mean(elementwise, p: Problem):
    """How users of an elementwise peer leave ignored rows out and normalise: ``(loss * keep).sum() / n``."""
    return lambda x: (elementwise(x) * p.keep).sum() / p.normalizer


def build_floor(loss: Loss, p: Problem):
    return (lambda x: torch.softmax(x, 1)) if loss.softmax else torch.sigmoid


def build_floor_out(loss: Loss, p: Problem):
    out = torch.empty_like(p.logits)
    return lambda x: torch.sigmoid(x, out=out)


def build_fused_ids(loss: Loss, p: Problem):
    op, t = _fused(loss, p.logits.device), loss.ids(p)
    return lambda x: op(x, t, *loss.params, reduction="sum", normalizer=p.normalizer, ignore_index=IGNORE_INDEX)


def build_fused_float(loss: Loss, p: Problem):
    op, t = _fused(loss, p.logits.device), loss.dense(p)
    return lambda x: op(x, t, *loss.params, reduction="sum", normalizer=p.normalizer, weight=p.keep)


def build_reference(loss: Loss, p: Problem):
    from focal import reference

    ref = getattr(reference, loss.function)
    if loss.softmax:
        t = loss.ids(p)
        return lambda x: ref(x, t, *loss.params, reduction="sum", normalizer=p.normalizer, ignore_index=IGNORE_INDEX)
    t = loss.dense(p)
    return lambda x: ref(x, t, *loss.params, reduction="sum", normalizer=p.normalizer, weight=p.keep)


def _compiled(fn):
    torch._dynamo.reset()  # a fresh cache per case: no case runs into the recompile limit and falls back
    return torch.compile(fn, dynamic=False)


def build_reference_compile(loss: Loss, p: Problem):
    return _compiled(build_reference(loss, p))


def build_tv(loss: Loss, p: Problem):
    tv = _import("torchvision.ops", "sigmoid_focal_loss", "pip install torchvision")
    return _masked_mean(lambda x: tv(x, p.one_hot, *loss.params, "none"), p)


def build_tv_compile(loss: Loss, p: Problem):
    return _compiled(build_tv(loss, p))


def build_fvcore(loss: Loss, p: Problem):
    fv = _import("fvcore.nn", "sigmoid_focal_loss_jit", "pip install fvcore")
    return _masked_mean(lambda x: fv(x, p.one_hot, *loss.params, "none"), p)


def build_kornia(loss: Loss, p: Problem):
    if not loss.softmax:
        kornia = _import("kornia.losses", "binary_focal_loss_with_logits", "pip install --no-deps kornia kornia-rs")
        # Ignored rows are masked by ``keep``, so kornia's own per-element ignore scan is off.
        return _masked_mean(lambda x: kornia(x, p.one_hot, *loss.params, "none", ignore_index=None), p)
    kornia = _import("kornia.losses", "focal_loss", "pip install --no-deps kornia kornia-rs")
    # No ignore_index in this form: ignored rows get class 0 and are masked; "none" keeps one term per class.
    kept = p.labels != IGNORE_INDEX
    safe = torch.where(kept, p.labels, torch.zeros_like(p.labels))
    return lambda x: (kornia(x, safe, alpha=None, gamma=loss.params[1], reduction="none").sum(1) * kept).sum() / p.normalizer


def build_cross_entropy(loss: Loss, p: Problem):
    return lambda x: F.cross_entropy(x, p.labels, ignore_index=IGNORE_INDEX, reduction="sum") / p.normalizer


@dataclasses.dataclass(frozen=True)
class Row:
    """One way of computing a loss. ``takes``: which targets it reads (for the bytes it must move);
    ``ours``: focal's own (a disagreement fails the run); ``checked``: compared with the exact loss
    (cross_entropy is the bar the softmax loss is held to, not the same loss)."""

    key: str
    name: str
    build: Callable[[Loss, Problem], Callable[[torch.Tensor], torch.Tensor]]
    takes: str | None = "dense"
    ours: bool = False
    checked: bool = True

    @property
    def floor(self) -> bool:
        return self.takes is None

    @property
    def fused(self) -> bool:
        """The fused ops compute in float32 and round once: held to FUSED_TOLERANCES."""
        return self.key.startswith("fused")


ROWS = {
    r.key: r
    for r in (
        Row("floor", "floor", build_floor, takes=None),
        Row("floor_out", "torch.sigmoid(x, out=y)", build_floor_out, takes=None),
        Row("fused_ids", "focal (class ids)", build_fused_ids, takes="ids", ours=True),
        Row("fused_float", "focal (float targets)", build_fused_float, ours=True),
        Row("tv", "torchvision eager", build_tv),
        Row("tv_compile", "torch.compile(torchvision)", build_tv_compile),
        Row("reference", "focal.reference (PyTorch)", build_reference, ours=True),
        Row("reference_compile", "torch.compile(focal.reference)", build_reference_compile),
        Row("fvcore", "fvcore sigmoid_focal_loss_jit", build_fvcore),
        Row("kornia", "kornia", build_kornia),
        Row("cross_entropy", "F.cross_entropy (gamma 0)", build_cross_entropy, takes="ids", checked=False),
    )
}


def row_name(key: str, loss: Loss) -> str:
    if key == "floor":
        return "torch.softmax(x, 1)  [floor]" if loss.softmax else "torch.sigmoid(x)  [floor]"
    return ROWS[key].name


# --------------------------------------------------------------------------------------------------
# Agreement with the exact loss


def _softmax_exact(x: torch.Tensor, p: Problem, loss: Loss) -> torch.Tensor:
    """``-(1 - p_y)^gamma log p_y`` through ``F.log_softmax``: independent of the op and of
    focal.reference (16-bit logits have tied maxima, where a gradient through the row max needs care)."""
    kept = p.labels != IGNORE_INDEX
    log_p = F.log_softmax(x, 1).gather(1, torch.where(kept, p.labels, 0).unsqueeze(1)).squeeze(1)
    terms = -(-torch.expm1(log_p)).pow(loss.params[1]) * log_p
    return torch.where(kept, terms, 0).sum() / p.normalizer.double()


def _as_float64(targets):
    if isinstance(targets, tuple):
        return tuple(_as_float64(t) for t in targets)
    return targets.double() if targets.is_floating_point() else targets


def exact_loss_and_grad(loss: Loss, p: Problem, chunk_rows: int = 32768) -> tuple[float, torch.Tensor]:
    """The loss and its gradient in float64 on the (already rounded) logits, with class-id targets and
    ``ignore_index`` (so the check also proves masked dense targets the same loss). Chunked over rows to
    bound memory: the loss is a sum and each gradient row depends on its own row only."""
    from focal import reference

    total, grad = 0.0, torch.empty(p.logits.shape, dtype=torch.float64, device=p.logits.device)
    for start in range(0, p.logits.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        part = p.rows(sl)
        x = part.logits.double().requires_grad_(True)
        if loss.softmax:
            value = _softmax_exact(x, part, loss)
        else:
            value = getattr(reference, loss.function)(
                x, _as_float64(loss.ids(part)), *loss.params, reduction="sum", normalizer=p.normalizer.double(),
                ignore_index=IGNORE_INDEX)
        (g,) = torch.autograd.grad(value, x)
        total += value.item()
        grad[sl] = g
    return total, grad


def check_agreement(loss_fn, p: Problem, mode: str, exact: tuple[float, torch.Tensor | None], tolerance: float) -> dict:
    """Runs ``loss_fn`` once (compiling what needs compiling) and compares its loss and, for
    forward+backward, its gradient with ``exact``: max |error| / max |exact| within ``tolerance``,
    a 0-dim loss and a gradient in the logits' dtype."""
    x = p.logits.detach().clone().requires_grad_(mode == "fwdbwd")
    with torch.set_grad_enabled(mode == "fwdbwd"):
        loss = loss_fn(x)
    want_loss, want_grad = exact
    result = {"tolerance": tolerance, "loss": loss.item(),
              "value_error": abs(loss.item() - want_loss) / max(abs(want_loss), 1e-30)}
    ok = loss.dim() == 0 and result["value_error"] <= tolerance
    if mode == "fwdbwd":
        loss.backward()
        scale = want_grad.abs().max().item() or 1.0
        result["grad_error"] = (x.grad.double() - want_grad).abs().max().item() / scale
        ok = ok and x.grad.dtype == p.logits.dtype and result["grad_error"] <= tolerance
    result["ok"] = bool(ok)
    return result


# --------------------------------------------------------------------------------------------------
# Steps and bytes


def make_step(row: Row, loss_fn, p: Problem, mode: str) -> Callable[[], None]:
    """One timed call. Forward+backward resets ``.grad``, so that every call writes a fresh gradient as a
    training step does; the floor rows run forward only."""
    x = p.logits.detach().clone()
    if row.floor or mode == "fwd":

        def step():
            with torch.no_grad():
                loss_fn(x)

    else:
        x.requires_grad_(True)

        def step():
            x.grad = None
            loss_fn(x).backward()

    return step


def bytes_moved(row: Row, loss: Loss, p: Problem, mode: str) -> int:
    """The least a row must read and write: the logits and its targets (class ids, plus the scores of
    QFL / VFL; or the dense targets and the (N, 1) keep mask), and the gradient for forward+backward.
    The floor reads the logits and writes its output. What a row's own intermediates cost comes on top."""
    logits = p.logits.numel() * p.logits.element_size()
    if row.floor:
        return 2 * logits
    if row.takes == "ids" or loss.dense is None:
        targets = loss.ids(p)
        targets = targets if isinstance(targets, tuple) else (targets,)
    else:
        targets = (loss.dense(p), p.keep)
    read = sum(t.numel() * t.element_size() for t in targets)
    return logits + read + (logits if mode == "fwdbwd" else 0)
