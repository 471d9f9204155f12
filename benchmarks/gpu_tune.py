"""Which variant of the CUDA kernels is fastest on this GPU (``make gpu-tune``).

The class-id and float-target kernels (csrc/cuda/focal_kernels.cuh) are compiled in a few launch
shapes (threads per block, bytes in flight per thread, register cap), the softmax focal loss's
thread-per-element kernel (csrc/cuda/softmax_kernels.cuh) in a few numbers of classes per load or
through a ring in shared memory, and its row kernels with their rows in registers or streamed
through shared memory (a ring), and the host code picks one of each per GPU architecture from one
table (``kArchVariants`` in
csrc/cuda/variants.cu). Results do not depend on the variant, only the time does. This script, in
one run on a GPU machine:

1. builds focal for the visible GPU's architecture with the machine's own python
   (``python3 -m pip install --no-build-isolation --no-deps -e .``, as benchmarks/gpu_check.sh);
2. times forward + backward of every hot path (class ids, float targets, and class ids with a row
   weight) in every shape, at 200000 x 80 and 960000 x 80, in float32, bfloat16 and float16, with
   CUDA events after an L2 flush (benchmarks/bench.py's timer), and the floor (``torch.sigmoid`` of
   the logits) in the same run; and the softmax focal loss in each of its kernels (16 lanes per
   row of the same 80 classes and a block per row of 1000 classes, as many elements, each in both
   its variants; and, in every variant of the thread-per-element kernel, the two layouts it takes: a thread per
   pixel of 21-class segmentation logits, and a thread per row of 20 classes, each of as many
   elements) against its own floor (``torch.softmax`` and the write of a gradient);
3. checks that every variant gives the same loss and gradient, bit for bit;
4. writes JSON and a markdown table, and prints this GPU's line of ``kArchVariants``.

    python benchmarks/gpu_tune.py [--out DIR] [--no-build]    (make gpu-tune)
    python benchmarks/gpu_tune.py --dry-run                    # the plan and the table, no GPU needed

The whole run is meant to fit in 8 minutes (the build most of it); ``--budget-s`` caps the timing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))  # an installed focal wins; the checkout (built in place) is the fallback
KERNELS = REPO_ROOT / "csrc" / "cuda" / "focal_kernels.cuh"
SOFTMAX_KERNELS = REPO_ROOT / "csrc" / "cuda" / "softmax_kernels.cuh"
TABLE = REPO_ROOT / "csrc" / "cuda" / "variants.cu"

SHAPES = [(200_000, 80), (960_000, 80)]
DTYPES = ["float32", "bfloat16", "float16"]
# Variant families: the names' array in the sources, the environment variable that picks one, and
# the column of kArchVariants.
FAMILIES = {"shape": ("kLaunchShapeNames", KERNELS, "FOCAL_CUDA_VARIANT"),
            "softmax": ("kSoftmaxVariantNames", SOFTMAX_KERNELS, "FOCAL_CUDA_SOFTMAX_VARIANT"),
            "softmax_rows": ("kRowVariantNames", SOFTMAX_KERNELS, "FOCAL_CUDA_SOFTMAX_ROWS_VARIANT")}
# path -> the variant family that applies to it (None: one variant)
PATHS = {"ids": "shape", "float": "shape", "row_weight": "shape", "softmax_rows": "softmax_rows",
         "softmax_long_rows": "softmax_rows", "softmax_pixels": "softmax", "softmax_straddling_pixels": "softmax",
         "softmax_short_rows": "softmax"}
# The floor each path is measured against: the sigmoid's, or the softmax's (with the gradient's write).
FLOOR_OF = {"ids": "floor", "float": "floor", "row_weight": "floor", "softmax_rows": "softmax_floor_rows",
            "softmax_long_rows": "softmax_floor_long_rows", "softmax_pixels": "softmax_floor_pixels",
            "softmax_straddling_pixels": "softmax_floor_straddling_pixels",
            "softmax_short_rows": "softmax_floor_short_rows"}
SEGMENTATION_CLASSES, SEGMENTATION_SIDE = 21, 64  # the thread-per-pixel layout: (n, 21, 64, 64)
# Images of 60 x 60: 3600 positions, not a multiple of a warp's 32, so that a warp's 32 elements
# may straddle two images (the ring's word-by-word layout, ElementLayout in softmax_kernels.cuh).
STRADDLING_SIDE = 60
SHORT_ROW_CLASSES = 20  # rows short enough for a thread each (kThreadRowClasses in softmax_kernels.cuh)
LONG_ROW_CLASSES = 1000  # rows long enough for a block each (over kWarpRowClasses)
REPEATS = 15
POSITIVE_FRACTION, IGNORED_FRACTION = 0.005, 0.02  # as benchmarks/bench.py's anchors


class TuneError(Exception):
    """The run cannot go on: no GPU, a failed build, a table that does not parse."""


# --------------------------------------------------------------------------------------------------
# The table in the sources


def variant_names(family: str = "shape", text: str | None = None) -> list[str]:
    """The names of a variant family (FAMILIES) by index, from its array in the sources."""
    array, source, _ = FAMILIES[family]
    text = source.read_text() if text is None else text
    m = re.search(array + r"\[[^\]]*\]\s*=\s*\{([^}]*)\}", text)
    if not m:
        raise TuneError(f"no {array} in {source}")
    names = re.findall(r'"([^"]+)"', m[1])
    if not names or len(set(names)) != len(names):
        raise TuneError(f"{array} must list distinct names, got {names}")
    return names


def arch_table(text: str | None = None, names: dict[str, list[str]] | None = None
               ) -> dict[tuple[int, int], dict[str, int]]:
    """kArchVariants of variants.cu: (major, minor) -> {family: variant index}, checked against
    `names` (family -> names)."""
    text = TABLE.read_text() if text is None else text
    names = {f: variant_names(f) for f in FAMILIES} if names is None else names
    m = re.search(r"kArchVariants\[\]\s*=\s*\{(.*?)\n\};", text, re.S)
    if not m:
        raise TuneError(f"no kArchVariants table in {TABLE}")
    table: dict[tuple[int, int], dict[str, int]] = {}
    body = re.sub(r"//[^\n]*", "", m[1])  # the rows' comments
    for row in re.findall(r"\{([^{}]*)\}", body):
        row = row.strip()
        fields = [v.strip() for v in row.split(",")]
        if not all(re.fullmatch(r"\d+", v) for v in fields):
            raise TuneError(f"kArchVariants: {{{row}}} is not a row of numbers {{major, minor, {', '.join(FAMILIES)}}}")
        values = [int(v) for v in fields]
        if len(values) != 2 + len(FAMILIES):
            raise TuneError(f"kArchVariants: {{{row}}} is not {{major, minor, {', '.join(FAMILIES)}}}")
        key = (values[0], values[1])
        if key in table:
            raise TuneError(f"kArchVariants lists sm_{key[0]}{key[1]} twice")
        table[key] = {}
        for family, index in zip(FAMILIES, values[2:]):
            if not 0 <= index < len(names[family]):
                raise TuneError(f"kArchVariants: sm_{key[0]}{key[1]} takes {family} {index}, which does not exist "
                                f"({len(names[family])}: {', '.join(names[family])})")
            table[key][family] = index
    return table


def plan() -> list[dict]:
    """Every timing of a run: path x size x dtype x variant (None for a path of one variant)."""
    names = {f: variant_names(f) for f in FAMILIES}
    cases = []
    for rows, cols in SHAPES:
        for dtype in DTYPES:
            for floor in dict.fromkeys(FLOOR_OF.values()):
                cases.append({"path": floor, "rows": rows, "cols": cols, "dtype": dtype, "variant": None})
            for path, family in PATHS.items():
                for variant in names[family] if family else [None]:
                    cases.append({"path": path, "rows": rows, "cols": cols, "dtype": dtype, "variant": variant})
    return cases


def problem(path: str) -> str:
    """The inputs a path times: its own, or for a floor those of the first path it is the floor of."""
    return next((p for p, floor in FLOOR_OF.items() if floor == path), path)


def table_entry(major: int, minor: int, best: dict[str, int], names: dict[str, list[str]], note: str) -> str:
    """A line of kArchVariants: the best variant of each family, by index."""
    picked = ", ".join(names[f][best[f]] for f in FAMILIES)
    return f"    {{{major}, {minor}, {', '.join(str(best[f]) for f in FAMILIES)}}},  // {note}: {picked}"


# --------------------------------------------------------------------------------------------------
# On the GPU


def build_for_visible_gpu(python: str) -> None:
    import torch

    major, minor = torch.cuda.get_device_capability()
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", FOCAL_WITH_CUDA="1")
    cmd = [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(REPO_ROOT)]
    print(f"building for sm_{major}{minor}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TuneError(f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def make_inputs(path: str, rows: int, cols: int, dtype, device, seed: int = 0):
    """Logits, targets (class ids, or their one-hot floats for the float path) and a row weight
    (row_weight path only), made on the device. The softmax paths: (rows, cols) logits with a class
    id per row; (n, 21, 64, 64) or (n, 21, 60, 60) segmentation logits of about rows x cols
    elements with a class id per pixel; or rows of 20 or of 1000 classes, as many elements; a few
    percent ignored (-100) in each."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    if path.startswith("softmax"):
        if path in ("softmax_pixels", "softmax_straddling_pixels"):
            side = SEGMENTATION_SIDE if path == "softmax_pixels" else STRADDLING_SIDE
            classes = SEGMENTATION_CLASSES
            n = max(1, rows * cols // (classes * side * side))
            x = (torch.randn(n, classes, side, side, generator=g, device=device) * 3).to(dtype)
            ids = torch.randint(0, classes, (n, side, side), generator=g, device=device)
        elif path in ("softmax_short_rows", "softmax_long_rows"):
            classes = SHORT_ROW_CLASSES if path == "softmax_short_rows" else LONG_ROW_CLASSES
            n = max(1, rows * cols // classes)
            x = (torch.randn(n, classes, generator=g, device=device) * 3).to(dtype)
            ids = torch.randint(0, classes, (n,), generator=g, device=device)
        else:
            x = (torch.randn(rows, cols, generator=g, device=device) * 3).to(dtype)
            ids = torch.randint(0, cols, (rows,), generator=g, device=device)
        u = torch.rand(ids.shape, generator=g, device=device)
        return x, torch.where(u < IGNORED_FRACTION, torch.full_like(ids, -100), ids), None
    x = (torch.randn(rows, cols, generator=g, device=device) * 3).to(dtype)
    u = torch.rand(rows, generator=g, device=device)
    ids = torch.randint(0, cols, (rows,), generator=g, device=device)
    ids = torch.where(u < POSITIVE_FRACTION, ids, torch.full_like(ids, -1))
    ids = torch.where((u >= POSITIVE_FRACTION) & (u < POSITIVE_FRACTION + IGNORED_FRACTION),
                      torch.full_like(ids, -100), ids)
    if path == "float":
        t = torch.zeros(rows, cols + 1, dtype=dtype, device=device)
        t.scatter_(1, torch.where(ids >= 0, ids, cols).unsqueeze(1), 1)
        return x, t[:, :cols].contiguous(), None
    row_weight = (torch.rand(rows, generator=g, device=device) + 0.5).to(dtype) if path == "row_weight" else None
    return x, ids, row_weight


def op_call(x, t, row_weight, softmax: bool = False):
    """Forward + backward of the fused op in one call (the loss and the gradient it returns)."""
    import torch

    if softmax:
        return torch.ops.focal.softmax_focal_loss.default(x, t, None, None, None, 0.25, 2.0, 0.0, -100, "sum",
                                                          1.0 / 1000, True)
    return torch.ops.focal.sigmoid_focal_loss.default(x, t, None, row_weight, None, 0.25, 2.0, 0.0, -100, "sum",
                                                      1.0 / 1000, True)


def floor_step(path: str, x):
    """The floor's step: torch.sigmoid of the logits; for the softmax, torch.softmax over the class
    dimension and the write of a gradient of the logits' size."""
    import torch

    if path == "floor":
        return lambda: torch.sigmoid(x)
    grad = torch.empty_like(x)
    return lambda: (torch.softmax(x, dim=1), grad.zero_())


def with_variant(path: str, variant: str | None) -> None:
    """Sets the environment variable of the path's variant family to `variant`; None clears them all."""
    for family, (_, _, env) in FAMILIES.items():
        if variant is not None and PATHS.get(path) == family:
            os.environ[env] = variant
        else:
            os.environ.pop(env, None)


def add_floor_ratios(results: list[dict]) -> None:
    """Sets each timing's ``x_floor``: its median over its floor's (FLOOR_OF) at the same size and
    dtype, or None where that floor was not timed; a floor's own is 1."""
    floors = {(r["path"], r["rows"], r["dtype"]): r["median_s"] for r in results if r["path"] not in PATHS}
    for r in results:
        floor = floors.get((FLOOR_OF.get(r["path"], r["path"]), r["rows"], r["dtype"]))
        r["x_floor"] = r["median_s"] / floor if floor else None


def pick_best(results: list[dict], names: dict[str, list[str]]) -> tuple[dict, dict]:
    """Per variant family: the geometric mean of x_floor of each variant over the family's paths,
    and the index of the variant with the smallest (the first, where none was timed)."""
    scores: dict[str, dict[str, float]] = {}
    best: dict[str, int] = {}
    for family, family_names in names.items():
        scores[family] = {}
        for variant in family_names:
            ratios = [r["x_floor"] for r in results
                      if PATHS.get(r["path"]) == family and r["variant"] == variant and r["x_floor"]]
            if ratios:
                scores[family][variant] = math.exp(sum(map(math.log, ratios)) / len(ratios))
        fastest = min(scores[family], key=scores[family].get) if scores[family] else family_names[0]
        best[family] = family_names.index(fastest)
    return scores, best


def run(out: Path, budget_s: float) -> dict:
    import torch

    import focal  # noqa: F401  (registers torch.ops.focal)
    from bench import Timer  # the CUDA-event timer with its L2 flush (benchmarks/bench.py)

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    timer = Timer(device)
    names = {f: variant_names(f) for f in FAMILIES}
    start = time.monotonic()
    results = []
    same_bits = []
    inputs: dict = {}
    for case in plan():
        if time.monotonic() - start > budget_s:
            print(f"time budget of {budget_s:.0f} s spent: {len(results)} of {len(plan())} timings done")
            break
        dtype = getattr(torch, case["dtype"])
        key = (problem(case["path"]), case["rows"], case["cols"], dtype)
        if key not in inputs:
            inputs.clear()  # one problem on the device at a time
            inputs[key] = make_inputs(*key, device)
        x, t, row_weight = inputs[key]
        with_variant(case["path"], case["variant"])
        if case["path"] not in PATHS:
            step = floor_step(case["path"], x)
        else:
            softmax = case["path"].startswith("softmax")
            step = lambda: op_call(x, t, row_weight, softmax)  # noqa: E731
        for _ in range(3):
            step()
        times = sorted(timer(step) for _ in range(REPEATS))
        results.append({**case, "median_s": times[len(times) // 2], "min_s": times[0]})
        with_variant(case["path"], None)
    # The same bits in every variant, on this GPU's compiler output.
    for path, family in PATHS.items():
        if family is None:
            continue
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            x, t, row_weight = make_inputs(path, 20_011, 80, dtype, device, seed=1)
            outs = []
            for variant in names[family]:
                with_variant(path, variant)
                outs.append([o.clone() for o in op_call(x, t, row_weight, path.startswith("softmax"))])
            with_variant(path, None)
            bits = lambda v: v.reshape(-1).view(torch.uint8)  # noqa: E731
            equal = all(torch.equal(bits(a), bits(b)) for o in outs[1:] for a, b in zip(o, outs[0]))
            same_bits.append({"path": path, "dtype": dtype_name, "bitwise_equal": bool(equal)})
    add_floor_ratios(results)
    scores, best = pick_best(results, names)
    major, minor = props.major, props.minor
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.strip() or os.environ.get("GIT_COMMIT", "?")
    summary = ", ".join(f"{names[f][best[f]]} {scores[f].get(names[f][best[f]], float('nan')):.2f}x" for f in FAMILIES)
    report = {
        "gpu": props.name, "capability": f"{major}.{minor}", "commit": commit,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "timings": results, "same_bits": same_bits,
        "geomean_x_floor": scores, "best": {f: names[f][best[f]] for f in FAMILIES},
        "entry": table_entry(major, minor, best, names, f"{props.name}, {summary} the floor ({commit})"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_tune.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_tune.md").write_text(markdown(report))
    print(markdown(report))
    print("\nkArchVariants entry for this GPU (csrc/cuda/variants.cu):")
    print(report["entry"])
    if not all(s["bitwise_equal"] for s in same_bits):
        raise TuneError("variants gave different bits (see same_bits in gpu_tune.json)")
    return report


def markdown(report: dict) -> str:
    lines = [f"{report['gpu']} (sm_{report['capability'].replace('.', '')}), commit {report['commit']}, "
             f"{report['date']}: forward + backward, ms (x the floor: torch.sigmoid, or torch.softmax and a "
             "gradient's write for the softmax paths)", "",
             "| path | variant | size | dtype | ms | x floor |", "| --- | --- | --- | --- | ---: | ---: |"]
    for r in report["timings"]:
        x = f"{r['x_floor']:.2f}" if r.get("x_floor") else "-"
        lines.append(f"| {r['path']} | {r['variant'] or '-'} | {r['rows']}x{r['cols']} | {r['dtype']} | "
                     f"{r['median_s'] * 1e3:.3f} | {x} |")
    for family, scores in report["geomean_x_floor"].items():
        lines += ["", f"geometric mean of the {family} variants' paths, x floor: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
                  + f"; best: **{report['best'][family]}**"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "gpu-tune", help="where JSON and table go")
    parser.add_argument("--dry-run", action="store_true", help="list the plan and check the table; no GPU needed")
    parser.add_argument("--no-build", action="store_true", help="time the focal already built")
    parser.add_argument("--budget-s", type=float, default=180.0, help="stop timing after this many seconds")
    parser.add_argument("--python", default=sys.executable, help="the python that builds focal (default: this one)")
    args = parser.parse_args(argv)
    try:
        names = {f: variant_names(f) for f in FAMILIES}
        table = arch_table(names=names)
        cases = plan()
        if args.dry_run:
            for family, family_names in names.items():
                print(f"{family} variants: {', '.join(f'{i}: {n}' for i, n in enumerate(family_names))}")
            print("kArchVariants: " + ", ".join(
                f"sm_{a}{b} -> {' + '.join(names[f][i] for f, i in row.items())}" for (a, b), row in sorted(table.items()))
                + f"; any other -> {' + '.join(n[0] for n in names.values())}")
            timed = [c for c in cases if c["path"] in PATHS]
            print(f"plan: {len(cases)} timings ({len(timed)} of the op, {len(cases) - len(timed)} floors) x {REPEATS} "
                  f"repeats, sizes {', '.join(f'{r}x{c}' for r, c in SHAPES)}, dtypes {', '.join(DTYPES)}")
            for c in cases:
                print(f"  {c['path']:20s} {c['rows']}x{c['cols']} {c['dtype']:8s} {c['variant'] or '-'}")
            return 0
        import torch

        if not torch.cuda.is_available():
            raise TuneError("no CUDA GPU is visible to torch: gpu-tune times kernels on a GPU "
                            "(use --dry-run to check the plan without one)")
        if not args.no_build:
            build_for_visible_gpu(args.python)
        run(args.out, args.budget_s)
    except TuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
