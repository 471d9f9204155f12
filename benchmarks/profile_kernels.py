"""Where the device time of a training step's loss goes: every kernel that one forward+backward
launches (focal's, ATen's for autograd's seed gradient, the floor's sigmoid), from the PyTorch
profiler, with its time per step and calls per step, and for each row the bandwidth of the bytes it
must move (``bench_rows.bytes_moved``). ``bench.py`` says how fast a row is; this says which kernel to
look at. The problems and rows are the benchmark's.

    python benchmarks/profile_kernels.py [--device cuda] [--loss focal] [--shape headline]
        [--dtype float32 ...] [--impls floor fused_ids fused_float] [--steps 20] [--plain]

On the CPU it lists the operators by self time instead. Under another profiler, ``--plain`` runs
the steps (after three warm-up steps) without PyTorch's, e.g. one launch of the class-id kernel
under Nsight Compute: ``ncu --kernel-name regex:focal_ids_kernel --launch-skip 3 --launch-count 1
python benchmarks/profile_kernels.py --plain --steps 1 --impls fused_ids``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, when focal is not installed
from bench_rows import DTYPES, LOSSES, ROWS, SHAPES, Unavailable, bytes_moved, make_problem, make_step, row_name  # noqa: E402

# Steps run before the measured ones, so that first-call work (allocations, module loads) stays out.
# gpu_check.sh's ncu step skips this many launches (--launch-skip) to profile the first measured one.
WARMUP_STEPS = 3


def kernel_times(step, device: torch.device, steps: int) -> tuple[list[tuple[str, int, float]], float]:
    """(name, calls per step, seconds per step) of each kernel (CUDA) or operator (CPU), slowest
    first, and their total per step."""
    for _ in range(WARMUP_STEPS):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    rows = {}
    for event in prof.events():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            seconds = event.device_time / 1e6
        else:
            if not event.name.startswith(("aten::", "focal::")):
                continue
            seconds = event.self_cpu_time_total / 1e6
        calls, total = rows.get(event.name, (0, 0.0))
        rows[event.name] = (calls + 1, total + seconds)
    table = sorted(
        ((name, calls // steps, total / steps) for name, (calls, total) in rows.items()), key=lambda r: -r[2]
    )
    return table, sum(r[2] for r in table)


def short(name: str, width: int = 96) -> str:
    """A kernel's name without its template arguments' namespaces, cut to `width`."""
    for prefix in ("void ", "at::native::", "focal::cuda::", "(anonymous namespace)::"):
        name = name.replace(prefix, "")
    return name if len(name) <= width else name[: width - 3] + "..."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loss", default="focal", choices=tuple(LOSSES))
    parser.add_argument("--shape", default="headline", choices=tuple(SHAPES))
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=tuple(DTYPES))
    parser.add_argument("--impls", nargs="+", default=["floor", "fused_ids", "fused_float"], choices=tuple(ROWS))
    parser.add_argument("--steps", type=int, default=20, help="profiled steps (default 20)")
    parser.add_argument("--plain", action="store_true",
                        help="run the steps without PyTorch's profiler (for an external one: ncu, nsys)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device is visible", file=sys.stderr)
        return 2
    loss, shape = LOSSES[args.loss], SHAPES[args.shape]
    what = "kernel" if device.type == "cuda" else "operator (self time)"
    for dtype_name in args.dtype:
        problem = make_problem(shape, DTYPES[dtype_name], device)
        print(f"\n== {loss.title}, {shape.name}: {shape.rows} x {shape.classes}, {dtype_name}, forward+backward, "
              f"{args.steps} steps on {device.type} ==")
        for key in (k for k in args.impls if k in loss.rows):
            row, name = ROWS[key], row_name(key, loss)
            try:
                step = make_step(row, row.build(loss, problem), problem, "fwdbwd")
            except Unavailable as exc:
                print(f"\n{name}: not available ({exc})")
                continue
            if args.plain:
                for _ in range(WARMUP_STEPS + args.steps):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                print(f"\n{name}: {WARMUP_STEPS + args.steps} steps run")
                continue
            table, total = kernel_times(step, device, args.steps)
            moved = bytes_moved(row, loss, problem, "fwdbwd")
            rate = f", {moved / total / 1e9:.0f} GB/s of the {moved / 1e6:.0f} MB it must move" if total else ""
            print(f"\n{name}: {total * 1e6:.1f} us per step{rate}")
            print(f"  {'us/step':>9} {'calls':>5}  {what}")
            for name, calls, seconds in table:
                print(f"  {seconds * 1e6:9.1f} {calls:5d}  {short(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
