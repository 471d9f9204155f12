"""What the fused loss buys inside torchvision's RetinaNet and FCOS: the loss path and the training step.

Three rows, side by side in one run, on the same model weights, images and targets:

- ``stock``: torchvision as shipped;
- ``swap``: stock code with torchvision's module-level ``sigmoid_focal_loss`` replaced by
  ``focal.sigmoid_focal_loss`` (the one-line drop-in: the float one-hot target, the per-image loop,
  the boolean-mask copies and FCOS's ``.item()`` remain);
- ``fused``: ``focal.integrations.torchvision.use_fused_loss(model)``.

Two parts, each timed with the rows interleaved round by round (medians and quartiles; in the loss
part each timed call follows an untimed one of the same row, the steady state of a training loop):

- ``loss``: the loss path alone, forward + backward from given head outputs (captured from one
  forward of the model): RetinaNet's ``RetinaNetClassificationHead.compute_loss``; for FCOS the whole
  ``FCOSHead.compute_loss``, since stock FCOS computes its classification, box and centerness losses
  in one function (the box and centerness terms are the same code in every row);
- ``step``: a whole training step, forward + backward + SGD (momentum 0.9) of the model in train mode.

Peak memory is the extra memory one call needs at its peak. On CUDA: ``max_memory_allocated`` over
the call less what was allocated before. On the CPU: the process's peak resident set (``VmHWM``,
reset through ``/proc/self/clear_refs``) over the call less the resident set before it, after
returning freed memory to the system (``malloc_trim``, ``focal.empty_cache``); unlike the profiler's
memory events, this sees every allocator (PyTorch's, focal's huge-page output buffers, glibc's).

    python benchmarks/bench_detectors.py                          # both models, 512 px, batch 2, both parts
    python benchmarks/bench_detectors.py --sizes 512 800 --batches 2 8 --parts loss --threads 1
    python benchmarks/bench_detectors.py --quick                  # 128 px, batch 1, loss path: seconds
    python benchmarks/bench_detectors.py --json out.json --markdown out.md

Every case is first checked: the three rows' losses agree (relative 1e-4) and so do their gradients
with respect to the head outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torchvision.models.detection.fcos as tv_fcos
import torchvision.models.detection.retinanet as tv_retinanet
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import focal  # noqa: E402
import focal.integrations.torchvision as fused_torchvision  # noqa: E402
from bench_run import Timer, describe_machine, peak_memory, spread  # noqa: E402

ROWS = ["stock", "swap", "fused"]
BUILDERS = {"retinanet": retinanet_resnet50_fpn, "fcos": fcos_resnet50_fpn}
NUM_CLASSES = 91


# --------------------------------------------------------------------------------------------------
# Problem: a model, images and targets


def build_models(name: str, size: int) -> Dict[str, torch.nn.Module]:
    """The three rows' models, identical weights, images kept at ``size`` px by the transform."""
    torch.manual_seed(0)
    stock = BUILDERS[name](weights=None, weights_backbone=None, min_size=size, max_size=size).train()
    return {"stock": stock, "swap": copy.deepcopy(stock),
            "fused": fused_torchvision.use_fused_loss(copy.deepcopy(stock))}


def make_batch(size: int, batch: int, device: torch.device, seed: int = 1):
    """``batch`` random ``size`` x ``size`` images with 1-8 random boxes of 16 px to half the image
    each, random classes; the last image of a batch of 2 or more has no boxes."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(batch):
        count = 0 if (batch > 1 and i == batch - 1) else int(torch.randint(1, 9, (1,), generator=g))
        corner = torch.rand(count, 2, generator=g) * size * 0.5
        extent = 16 + torch.rand(count, 2, generator=g) * (size * 0.5 - 16)
        boxes = torch.cat([corner, (corner + extent).clamp(max=size - 1)], 1)
        images.append(torch.rand(3, size, size, generator=g).to(device))
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, NUM_CLASSES, (count,), generator=g).to(device)})
    return images, targets


@contextlib.contextmanager
def swapped_focal_loss(active: bool):
    """torchvision's detection modules call ``sigmoid_focal_loss`` by module-level name: the one-line swap."""
    if not active:
        yield
        return
    saved = tv_retinanet.sigmoid_focal_loss, tv_fcos.sigmoid_focal_loss
    tv_retinanet.sigmoid_focal_loss = tv_fcos.sigmoid_focal_loss = focal.sigmoid_focal_loss
    try:
        yield
    finally:
        tv_retinanet.sigmoid_focal_loss, tv_fcos.sigmoid_focal_loss = saved


def capture_head_arguments(model, images, targets):
    """The arguments ``model.head.compute_loss`` receives in a training forward, detached."""
    seen = []
    original = model.head.compute_loss
    model.head.compute_loss = lambda *args: seen.append(args) or original(*args)
    try:
        with torch.no_grad():
            model(images, targets)
    finally:
        del model.head.compute_loss
    return seen[0]


# --------------------------------------------------------------------------------------------------
# The two parts as callables, one per row


def loss_path_steps(name: str, models, images, targets) -> Dict[str, Callable[[], Dict[str, torch.Tensor]]]:
    targets_, outputs, anchors, matched = capture_head_arguments(models["stock"], images, targets)
    leaves = {k: v.detach().requires_grad_() for k, v in outputs.items()}

    def make(row):
        head = models[row].head

        def step():
            for leaf in leaves.values():
                leaf.grad = None
            with swapped_focal_loss(row == "swap"):
                if name == "retinanet":
                    loss = head.classification_head.compute_loss(targets_, leaves, matched)
                else:
                    loss = sum(head.compute_loss(targets_, leaves, anchors, matched).values())
            loss.backward()
            return {"loss": loss.detach(), **{k: v.grad for k, v in leaves.items() if v.grad is not None}}

        return step

    return {row: make(row) for row in ROWS}


def training_steps(models, images, targets) -> Dict[str, Callable[[], Dict[str, torch.Tensor]]]:
    def make(row):
        model = models[row]
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with swapped_focal_loss(row == "swap"):
                losses = model(images, targets)
            loss = sum(losses.values())
            loss.backward()
            optimizer.step()
            return {"loss": loss.detach()}

        return step

    return {row: make(row) for row in ROWS}


def check_rows(steps) -> float:
    """The largest relative difference of any row's loss or gradient from stock's (one call each)."""
    results = {row: step() for row, step in steps.items()}
    worst = 0.0
    for row in ("swap", "fused"):
        for key, want in results["stock"].items():
            got = results[row][key]
            scale = want.abs().max().clamp(min=1e-30)
            worst = max(worst, float((got.double() - want.double()).abs().max() / scale))
    if worst > 1e-4:
        raise RuntimeError(f"the rows disagree (largest relative difference {worst:.2e})")
    return worst


# --------------------------------------------------------------------------------------------------
# Measuring


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(step: Callable[[], object], device: torch.device):
    """Extra memory at the peak of one call of ``step`` (see the module docstring), or None where the
    CPU method is unavailable (no /proc/self/clear_refs)."""
    if device.type == "cuda":
        return peak_memory(step, device)
    focal.empty_cache()
    if LIBC is not None:
        LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    before = _resident_kib("VmRSS")
    result = step()
    peak = _resident_kib("VmHWM")
    del result
    return (peak - before) * 1024


def measure(steps, device, rounds: int, warmup: int = 1, settle: bool = False) -> Dict[str, dict]:
    """Times every row ``rounds`` times, interleaved (the order rotates each round), after ``warmup``
    calls each; then each row's peak memory in a call of its own. With ``settle`` each timed call
    follows an untimed call of the same row, so that it finds what a training loop's previous step
    leaves (focal's cached output buffers, warm caches) rather than what another row left.

    On the CPU each call's process CPU time is recorded beside its wall time (``cpu_ms``): other
    processes on a shared machine stretch the wall time of a call, but barely the CPU time it uses
    (with one thread, the time it ran)."""
    timer = Timer(device)
    for _ in range(warmup):
        for step in steps.values():
            timer(step)
    times = {row: [] for row in steps}
    cpu_times = {row: [] for row in steps}
    order = list(steps)
    for r in range(rounds):
        for row in order[r % len(order):] + order[: r % len(order)]:
            if settle:
                steps[row]()
            cpu_start = time.process_time()
            times[row].append(timer(steps[row]))
            cpu_times[row].append(time.process_time() - cpu_start)
    out = {}
    for row, values in times.items():
        low, high = spread(values)
        out[row] = {"median_ms": 1e3 * statistics.median(values), "q1_ms": 1e3 * low, "q3_ms": 1e3 * high,
                    "rounds": len(values), "peak_extra_bytes": peak_extra_bytes(steps[row], device)}
        if device.type == "cpu":
            out[row]["cpu_ms"] = 1e3 * statistics.median(cpu_times[row])
    return out


def run_case(name: str, size: int, batch: int, part: str, device, rounds: int) -> dict:
    models = build_models(name, size)
    for model in models.values():
        model.to(device)
    images, targets = make_batch(size, batch, device)
    steps = (loss_path_steps(name, models, images, targets) if part == "loss"
             else training_steps(models, images, targets))
    worst = check_rows(steps)
    rows = measure(steps, device, rounds, settle=part == "loss")
    for clock, suffix in (("median_ms", ""), ("cpu_ms", "_cpu")):
        if clock not in rows["stock"]:
            continue
        for row in rows.values():
            row["speedup_vs_stock" + suffix] = rows["stock"][clock] / row[clock]
        rows["fused"]["speedup_vs_swap" + suffix] = rows["swap"][clock] / rows["fused"][clock]
    return {"model": name, "size": size, "batch": batch, "part": part, "max_rel_diff": worst, "rows": rows}


# --------------------------------------------------------------------------------------------------
# Report


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else ""


def markdown(cases: List[dict], machine: dict) -> str:
    steps = {(c["model"], c["size"], c["batch"]): c for c in cases if c["part"] == "step"}
    cpu = any("cpu_ms" in r for c in cases for r in c["rows"].values())
    lines = [
        f"Machine: {machine['cpu']} ({machine['threads']} threads), torch {machine['torch']}, torchvision "
        f"{machine['torchvision']}, device {machine['device']}{' ' + machine.get('gpu', '') if machine.get('gpu') else ''}; "
        f"commit {str(machine['git_describe'])[:12]}; load average at start {machine['load_average_at_start']}.",
        f"Command: `{machine['command']}`",
    ]
    if cpu:
        lines.append("CPU ms: the process's CPU time per call (median), which other processes on the machine "
                     "barely change; where it is well below the wall time, the machine was busy and its "
                     "ratios are the ones to compare.")
    header = ["model", "px", "batch", "part", "row", "median ms (IQR)", "x stock", "x swap"]
    header += ["CPU ms", "x stock (CPU)", "x swap (CPU)"] if cpu else []
    header += ["peak extra MiB", "loss / step"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for c in cases:
        step = steps.get((c["model"], c["size"], c["batch"]))
        for row in ROWS:
            r = c["rows"][row]
            cells = [c["model"], c["size"], c["batch"], c["part"], row,
                     f"{r['median_ms']:.1f} ({r['q1_ms']:.1f}-{r['q3_ms']:.1f})",
                     _ratio(r, "speedup_vs_stock"), _ratio(r, "speedup_vs_swap")]
            if cpu:
                cells += [f"{r['cpu_ms']:.1f}" if "cpu_ms" in r else "", _ratio(r, "speedup_vs_stock_cpu"),
                          _ratio(r, "speedup_vs_swap_cpu")]
            fraction = ""
            if c["part"] == "loss" and step is not None:
                fraction = f"{r['median_ms'] / step['rows'][row]['median_ms']:.1%}"
            cells += [_mib(r["peak_extra_bytes"]), fraction]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(BUILDERS), default=["retinanet", "fcos"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512])
    parser.add_argument("--batches", nargs="+", type=int, default=[2])
    parser.add_argument("--parts", nargs="+", choices=["loss", "step"], default=["loss", "step"])
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per row (default 7 loss, 3 step)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="128 px, batch 1, loss path, 2 rounds: seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.parts, args.rounds = [128], [1], ["loss"], args.rounds or 2
    if any(s < 64 for s in args.sizes) or any(b < 1 for b in args.batches) or (args.rounds or 1) < 1:
        parser.error("sizes must be >= 64 px, batches and rounds >= 1")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe_machine(device, torch.get_num_threads())
    cases = []
    for part in sorted(args.parts):  # the loss path first: it is the cheap part
        for name in args.models:
            for size in args.sizes:
                for batch in args.batches:
                    rounds = args.rounds or (7 if part == "loss" else 3)
                    case = run_case(name, size, batch, part, device, rounds)
                    cases.append(case)
                    r = case["rows"]
                    print(f"{name} {size}px batch {batch} {part}: " + ", ".join(
                        f"{row} {r[row]['median_ms']:.1f} ms" for row in ROWS)
                        + f"; fused {r['fused']['speedup_vs_stock']:.1f}x stock, "
                        f"{r['fused']['speedup_vs_swap']:.2f}x swap"
                        + (f" (CPU time: {r['fused']['speedup_vs_stock_cpu']:.1f}x, "
                           f"{r['fused']['speedup_vs_swap_cpu']:.2f}x)" if "cpu_ms" in r["fused"] else ""),
                        flush=True)
    table = markdown(cases, machine)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "cases": cases}, indent=1))
    if args.markdown:
        args.markdown.write_text(table)
    return cases


if __name__ == "__main__":
    main()
