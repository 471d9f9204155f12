"""Side-by-side benchmark of the softmax focal loss (``focal.softmax_focal_loss``).

Times forward+backward (or forward only) of the fused op against its peers on the same logits and
class ids: ``F.cross_entropy`` forward+backward (the loss it generalises, ATen's fused kernels: the
bar the issue sets), the project's pure-PyTorch reference, and kornia's ``focal_loss`` when installed.
The floor is ``torch.softmax(x, 1)``: one pass that reads the logits and writes one fresh tensor of
their size, the least any implementation that returns a gradient must do. Every row reports its
ratio to the floor and to cross_entropy, measured in the same run, rounds interleaved (so that a
change in the machine's load hits every row alike), and every loss row is checked against a
float64 evaluation of the reference before it is timed.

    python benchmarks/bench_softmax.py --threads 2                       # both shapes, fp32 + bf16
    python benchmarks/bench_softmax.py --quick --json q.json             # one small shape, seconds
    python benchmarks/bench_softmax.py --device cuda --json gpu.json      # on a GPU: bench.py's timer

Shapes: ``detection`` (200000 x 80: the RetinaNet headline shape, one row of C classes per anchor)
and ``segmentation`` (8 x 21 x 128 x 128: Pascal VOC's 21 classes, classes 128 * 128 apart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the timer: wall clock on the CPU, CUDA events after an L2 flush on a GPU)

GAMMA = 2.0
IGNORE_INDEX = -100
IGNORED_FRACTION = 0.05
SHAPES = {"detection": (200_000, 80), "segmentation": (8, 21, 128, 128), "small": (4_000, 21)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# max |error| / max |exact|, losses and gradients. Peers computing in bfloat16 round every
# intermediate; the fused op computes in float32 and rounds only its gradient.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
FUSED_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
FLOOR = "softmax"


def make_problem(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0).to(dtype)
    target_shape = (shape[0],) + tuple(shape[2:])
    t = torch.randint(0, shape[1], target_shape, generator=g)
    t[torch.rand(target_shape, generator=g) < IGNORED_FRACTION] = IGNORE_INDEX
    return x.to(device), t.to(device)


def loss_rows(t: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> loss_fn(logits): every row the same mean loss over the elements that are not ignored
    (cross_entropy computes gamma 0: it is the bar, not the same loss)."""
    import focal
    from focal import reference

    rows = {
        "focal": lambda x: focal.softmax_focal_loss(x, t, gamma=GAMMA, ignore_index=IGNORE_INDEX),
        "cross_entropy": lambda x: F.cross_entropy(x, t, ignore_index=IGNORE_INDEX),
        "reference": lambda x: reference.softmax_focal_loss(x, t, gamma=GAMMA, ignore_index=IGNORE_INDEX),
    }
    try:
        from kornia.losses import focal_loss as kornia_focal_loss

        # alpha=None: no class balance. kornia has no ignore_index for this form, so ignored elements
        # get a valid class and weight 0; its "none" keeps one term per class, summed here.
        kept = t != IGNORE_INDEX
        safe = torch.where(kept, t, torch.zeros_like(t))
        count = kept.sum().clamp(min=1)
        def kornia_row(x):
            per_class = kornia_focal_loss(x, safe, alpha=None, gamma=GAMMA, reduction="none")
            return (per_class.sum(1) * kept).sum() / count

        rows["kornia"] = kornia_row
    except ImportError:
        pass
    return rows


def exact(x, t):
    """The loss and its gradient in float64, through ``F.log_softmax``: an evaluation independent of
    both the op and focal.reference (16-bit logits have tied maxima, where a gradient through the
    row maximum must be taken with care)."""
    xd = x.double().requires_grad_()
    kept = t != IGNORE_INDEX
    safe = torch.where(kept, t, torch.zeros_like(t))
    log_p = F.log_softmax(xd, 1).gather(1, safe.unsqueeze(1)).squeeze(1)
    one_minus_p = -torch.expm1(log_p)
    terms = -one_minus_p.pow(GAMMA) * log_p
    loss = torch.where(kept, terms, torch.zeros_like(terms)).sum() / kept.sum().clamp(min=1)
    (grad,) = torch.autograd.grad(loss, xd)
    return loss.item(), grad


def agreement(loss_fn, x, t, want, tolerance) -> dict:
    xo = x.detach().clone().requires_grad_()
    loss = loss_fn(xo)
    loss.backward()
    want_loss, want_grad = want
    value = abs(loss.item() - want_loss) / max(abs(want_loss), 1e-30)
    grad = (xo.grad.double() - want_grad).abs().max().item() / (want_grad.abs().max().item() or 1.0)
    return {"value_error": value, "grad_error": grad, "ok": value <= tolerance and grad <= tolerance}


def make_step(name, loss_fn, x, fwdbwd):
    if name == FLOOR:
        return lambda: torch.softmax(x, 1)
    xo = x.detach().clone().requires_grad_(fwdbwd)

    def step():
        xo.grad = None
        with torch.set_grad_enabled(fwdbwd):
            loss = loss_fn(xo)
        if fwdbwd:
            loss.backward()

    return step


def run_case(shape_name, dtype, fwdbwd, rounds, check=True, timer=None, device="cpu"):
    timer = timer or bench.Timer(torch.device(device))
    x, t = make_problem(SHAPES[shape_name], dtype, device=device)
    rows = loss_rows(t)
    checks = {}
    if check:
        want = exact(x, t)
        for name, fn in rows.items():
            if name != "cross_entropy":
                tolerance = (FUSED_TOLERANCE if name == "focal" else TOLERANCE)[dtype]
                checks[name] = agreement(fn, x, t, want, tolerance)
    steps = {FLOOR: make_step(FLOOR, None, x, fwdbwd)}
    steps.update({name: make_step(name, fn, x, fwdbwd) for name, fn in rows.items()})
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        timer(step)
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timer(step))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "shape": shape_name,
        "dims": list(SHAPES[shape_name]),
        "dtype": str(dtype).removeprefix("torch."),
        "mode": "fwdbwd" if fwdbwd else "fwd",
        "median_s": median,
        "x_floor": {name: s / median[FLOOR] for name, s in median.items()},
        "x_cross_entropy": {name: s / median["cross_entropy"] for name, s in median.items()},
        "agreement": checks,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=["detection", "segmentation"])
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=("fwd", "fwdbwd"), default=["fwdbwd"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="the small shape, float32, 3 rounds")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.dtype, args.rounds = ["small"], ["float32"], 3
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    timer = bench.Timer(torch.device(args.device))
    cases = []
    for shape in args.shapes:
        for dtype in args.dtype:
            for mode in args.modes:
                case = run_case(shape, DTYPES[dtype], mode == "fwdbwd", args.rounds, timer=timer, device=args.device)
                cases.append(case)
                where = "cuda" if args.device == "cuda" else f"{args.threads} threads"
                print(f"{shape} {tuple(SHAPES[shape])} {dtype} {mode}, {where}:")
                for name, s in case["median_s"].items():
                    check = case["agreement"].get(name)
                    note = "" if check is None else ("  ok" if check["ok"] else f"  DISAGREES {check}")
                    print(f"  {name:14s} {s * 1e3:9.2f} ms   x softmax {case['x_floor'][name]:6.2f}"
                          f"   x cross_entropy {case['x_cross_entropy'][name]:6.2f}{note}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": args.device, "threads": args.threads, "torch": torch.__version__,
                                               "cases": cases}, indent=1))
    return 0 if all(c["ok"] for case in cases for c in case["agreement"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
