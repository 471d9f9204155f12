"""Side-by-side benchmark of the focal loss's family: FL*, the quality focal loss and the varifocal loss.

For each loss, forward+backward of the fused op (with class-id targets, the pair ``(ids, scores)``
for QFL / VFL, and with dense float targets) against its natural pure-PyTorch equivalent, the
project's reference (``focal.reference``), optionally also under ``torch.compile``. Every row is
checked against a float64 evaluation of the reference before it is timed, and reported as a ratio
to the floor of bench.py: ``torch.sigmoid(x)``, one transcendental pass that reads the logits and
writes a fresh tensor of their size. The goal (issue: "the family as fused ops") is that each
fused op's forward+backward costs at most about one ``torch.sigmoid`` on the CPU: at most 1.25x
the floor at the headline shape, with 2 threads.

    python benchmarks/bench_family.py                         # headline shape, fp32 + bf16
    python benchmarks/bench_family.py --quick                 # small shape, fp32 (a smoke test)
    python benchmarks/bench_family.py --device cuda --json family-gpu.json --plot family-gpu.png

Timing, machine description and THP notes are bench.py's; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared timer, shapes and machine description)

LOSSES = {
    "star": "FL* (gamma 2, beta 1)",
    "quality": "quality focal loss (beta 2)",
    "varifocal": "varifocal loss (alpha 0.75, gamma 2)",
}
GOAL_FLOOR_RATIO = 1.25  # "at most about one torch.sigmoid"
# max |error| / max |exact| against float64: the fused ops compute in float32 and round once.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
PEER_TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclasses.dataclass
class Problem:
    """Logits (N, C) and the targets in each form: class ids (-1 background, IGNORE_INDEX ignored),
    a quality score per row (for QFL / VFL), and the dense targets they stand for."""

    logits: torch.Tensor
    ids: torch.Tensor
    scores: torch.Tensor
    dense: dict  # loss -> dense float targets (FL*: one-hot; QFL / VFL: the scores at the positives)
    keep: torch.Tensor  # (N, 1): 0 for ignored rows, for the dense forms
    normalizer: torch.Tensor


def make_problem(rows: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    classes = bench.NUM_CLASSES
    logits = torch.randn(rows, classes, generator=g) * 3
    draw = torch.rand(rows, generator=g)
    ids = torch.full((rows,), -1, dtype=torch.long)
    positive = draw < bench.POSITIVE_FRACTION
    ids[positive] = torch.randint(0, classes, (int(positive.sum()),), generator=g)
    ids[(draw >= bench.POSITIVE_FRACTION) & (draw < bench.POSITIVE_FRACTION + bench.IGNORED_FRACTION)] = bench.IGNORE_INDEX
    scores = torch.rand(rows, generator=g)
    one_hot = torch.zeros(rows, classes)
    rows_pos = positive.nonzero().squeeze(1)
    one_hot[rows_pos, ids[rows_pos]] = 1.0
    quality = one_hot * scores.unsqueeze(1)
    keep = (ids != bench.IGNORE_INDEX).float().unsqueeze(1)
    to = dict(device=device, dtype=dtype)
    return Problem(
        logits=logits.to(**to),
        ids=ids.to(device),
        scores=scores.to(**to),
        dense={"star": one_hot.to(**to), "quality": quality.to(**to), "varifocal": quality.to(**to)},
        keep=keep.to(**to),
        normalizer=positive.sum().clamp(min=1).to(device, torch.float32),
    )


def _call(loss: str, fn, x, targets, p: Problem, weight=None):
    kw = dict(reduction="sum", normalizer=p.normalizer, weight=weight)
    if loss == "star":
        return fn(x, targets, 2.0, 1.0, None, **kw)
    if loss == "quality":
        return fn(x, targets, 2.0, **kw)
    return fn(x, targets, 0.75, 2.0, **kw)


def rows_for(loss: str, compile_reference: bool) -> dict[str, tuple[str, Callable]]:
    """key -> (name, build(problem) -> loss_fn(x)); the floor first."""
    import focal
    from focal import reference

    fused = {"star": focal.sigmoid_focal_loss_star, "quality": focal.quality_focal_loss,
             "varifocal": focal.varifocal_loss}[loss]
    ref = {"star": reference.sigmoid_focal_loss_star, "quality": reference.quality_focal_loss,
           "varifocal": reference.varifocal_loss}[loss]
    ids_name = "class ids" if loss == "star" else "(ids, scores)"
    rows = {
        "floor": ("torch.sigmoid(x)  [floor]", lambda p: torch.sigmoid),
        "fused_ids": (f"focal ({ids_name})", lambda p: lambda x: _call(
            loss, fused, x, p.ids if loss == "star" else (p.ids, p.scores), p)),
        "fused_dense": ("focal (dense targets)", lambda p: lambda x: _call(loss, fused, x, p.dense[loss], p, p.keep)),
        "reference": ("focal.reference (PyTorch)", lambda p: lambda x: _call(loss, ref, x, p.dense[loss], p, p.keep)),
    }
    if compile_reference:
        compiled = torch.compile(ref)
        rows["reference_compiled"] = ("torch.compile(focal.reference)",
                                      lambda p: lambda x: _call(loss, compiled, x, p.dense[loss], p, p.keep))
    return rows


def exact(loss: str, p: Problem) -> tuple[float, torch.Tensor]:
    from focal import reference

    ref = {"star": reference.sigmoid_focal_loss_star, "quality": reference.quality_focal_loss,
           "varifocal": reference.varifocal_loss}[loss]
    x = p.logits.double().requires_grad_()
    norm = p.normalizer.double()
    value = _call(loss, ref, x, p.dense[loss].double(), dataclasses.replace(p, normalizer=norm), p.keep.double())
    value.backward()
    return value.item(), x.grad


def agreement(loss_fn, p: Problem, want: tuple[float, torch.Tensor], tolerance: float) -> dict:
    x = p.logits.detach().clone().requires_grad_()
    value = loss_fn(x)
    value.backward()
    loss_error = abs(value.item() - want[0]) / max(abs(want[0]), 1e-30)
    grad_error = ((x.grad.double() - want[1]).abs().max() / want[1].abs().max().clamp(min=1e-30)).item()
    return {"loss_rel_error": loss_error, "grad_rel_error": grad_error,
            "ok": loss_error <= tolerance and grad_error <= tolerance}


def run_case(loss, shape, dtype, device, timer, budget_s, min_rounds, max_rounds, compile_reference):
    p = make_problem(shape.rows, dtype, device)
    want = exact(loss, p)
    rows, steps = [], {}
    for key, (name, build) in rows_for(loss, compile_reference).items():
        row = {"key": key, "name": name, "agreement": None, "note": None}
        rows.append(row)
        fn = build(p)
        if key != "floor":
            ours = key.startswith("fused")
            try:
                row["agreement"] = agreement(fn, p, want, (TOLERANCES if ours else PEER_TOLERANCES)[dtype])
            except Exception as exc:  # a peer that cannot run this case is reported; ours fails the run
                row["agreement"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            if not row["agreement"]["ok"]:
                row["note"] = "disagrees with the exact loss: not timed"
                continue
        x = p.logits.detach().clone()
        if key == "floor":
            steps[key] = lambda fn=fn, x=x: fn(x)
        else:
            x.requires_grad_(True)

            def step(fn=fn, x=x):
                x.grad = None
                fn(x).backward()

            steps[key] = step
    for step in steps.values():  # warm-up (and compilation)
        timer(step)
    times = {key: [] for key in steps}
    rounds, start = 0, time.perf_counter()
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for key, step in steps.items():  # round-robin: load from elsewhere hits every row alike
            times[key].append(timer(step))
        rounds += 1
    floor = statistics.median(times["floor"])
    for row in rows:
        if row["key"] in times:
            median = statistics.median(times[row["key"]])
            row.update(median_s=median, floor_ratio=median / floor)
    return {"loss": loss, "shape": {"name": shape.name, "rows": shape.rows, "classes": bench.NUM_CLASSES},
            "dtype": str(dtype).removeprefix("torch."), "mode": "fwdbwd", "rounds": rounds, "rows": rows}


def evaluate_goals(cases: list[dict], device_type: str, threads: int) -> list[dict]:
    """Each loss's fused class-id row at the headline shape: forward+backward within GOAL_FLOOR_RATIO
    of the floor (CPU goals, stated for 2 threads)."""
    goals = []
    if device_type != "cpu":
        return goals
    for case in cases:
        if case["shape"]["name"] != bench.HEADLINE_SHAPE:
            continue
        row = next(r for r in case["rows"] if r["key"] == "fused_ids")
        measured = row.get("floor_ratio")
        goal = {"name": f"{case['loss']} {case['dtype']} fwd+bwd <= {GOAL_FLOOR_RATIO}x floor", "measured": measured,
                "threshold": GOAL_FLOOR_RATIO,
                "status": "NOT RUN" if measured is None else "PASS" if measured <= GOAL_FLOOR_RATIO else "FAIL"}
        if threads != 2:
            goal["note"] = f"the CPU goals are stated for 2 threads; run used {threads}"
        goals.append(goal)
    return goals


def plot(cases: list[dict], path: str, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {"fused_ids": "focal, class ids (QFL / VFL: with scores)", "fused_dense": "focal, dense targets",
            "reference": "focal.reference (PyTorch)", "reference_compiled": "torch.compile(focal.reference)"}
    fig, ax = plt.subplots(figsize=(11, 4.2))
    labels = [f"{c['loss']}\n{c['dtype']}" for c in cases]
    width = 0.8 / len(keys)
    for j, (key, name) in enumerate(keys.items()):
        xs, ys = [], []
        for i, case in enumerate(cases):
            row = next((r for r in case["rows"] if r["key"] == key and r.get("floor_ratio")), None)
            if row:
                xs.append(i + (j - (len(keys) - 1) / 2) * width)
                ys.append(row["floor_ratio"])
        if xs:
            ax.bar(xs, ys, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8, label="torch.sigmoid(x) [floor]")
    ax.axhline(GOAL_FLOOR_RATIO, color="gray", linestyle="--", linewidth=0.8, label=f"goal: {GOAL_FLOOR_RATIO}x floor")
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward time / floor (log)")
    ax.set_xticks(range(len(cases)), labels)
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['threads']} threads"
    shape = cases[0]["shape"]
    ax.set_title(f"focal's family at {shape['rows']}x{shape['classes']} - {where}, torch {machine['torch']}", fontsize=9)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--losses", nargs="+", choices=tuple(LOSSES), default=list(LOSSES))
    parser.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--shape", choices=tuple(bench.SHAPES), help="default: headline (quick: small)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="small shape, float32, few rounds")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(focal.reference)")
    parser.add_argument("--budget", type=float, help="seconds of timed rounds per case (default 3, quick 0.2)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or (["float32"] if args.quick else ["float32", "bfloat16"])
    args.shape = args.shape or ("small" if args.quick else bench.HEADLINE_SHAPE)
    args.budget = args.budget if args.budget is not None else (0.2 if args.quick else 3.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    machine = bench.describe_machine(device, torch.get_num_threads())
    timer = bench.Timer(device)
    shape = bench.SHAPES[args.shape]
    print(f"machine: {machine.get('gpu', machine['cpu'])}, {machine['threads']} threads, torch {machine['torch']}, "
          f"commit {machine['git_describe']}; shape {shape.rows} x {bench.NUM_CLASSES}, forward+backward")
    cases = []
    for loss in args.losses:
        for dt in args.dtype:
            case = run_case(loss, shape, bench.DTYPES[dt], device, timer, args.budget, 3 if args.quick else 5,
                            20 if args.quick else 50, args.compile)
            cases.append(case)
            print(f"\n{LOSSES[loss]}, {dt} ({case['rounds']} rounds)")
            for row in case["rows"]:
                agree = row["agreement"]
                check = "" if agree is None else (
                    f"  rel. error loss {agree['loss_rel_error']:.1e} grad {agree['grad_rel_error']:.1e}"
                    if "loss_rel_error" in agree else f"  {agree['error']}")
                timing = (f"{row['median_s'] * 1e3:9.2f} ms  {row['floor_ratio']:6.2f}x floor"
                          if row.get("median_s") else f"{'':9s}    {'':6s}  " + (row["note"] or ""))
                print(f"  {row['name']:34s} {timing}{check}")
    goals = evaluate_goals(cases, device.type, torch.get_num_threads())
    if goals:
        print("\ngoals:")
        for goal in goals:
            measured = "-" if goal["measured"] is None else f"{goal['measured']:.2f}"
            print(f"  {goal['status']:7s} {goal['name']}: measured {measured}" + (f" ({goal['note']})" if goal.get("note") else ""))
    failed = [r["name"] for c in cases for r in c["rows"] if r["key"].startswith("fused") and not r["agreement"]["ok"]]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "cases": cases, "goals": goals}, indent=1))
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(cases, args.plot, machine)
    if failed:
        print(f"error: focal's own rows disagree with the exact loss: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
