"""Side-by-side benchmark of focal's fused losses against their peers, on the CPU or CUDA.

Each loss of the family (the sigmoid focal loss, FL*, QFL, VFL, the softmax focal loss) is timed,
forward only and forward+backward, as the fused op with class ids and with dense float targets, beside
its peers (torchvision eager and under torch.compile, fvcore and kornia when installed, the project's
pure-PyTorch reference, F.cross_entropy for the softmax loss) and beside its floor, torch.sigmoid(x)
(torch.softmax for the softmax loss): one pass that reads the logits and writes a fresh tensor of their
size, the least any row that returns a gradient must do. Every row computes sum / number of positives
and is checked against a float64 evaluation before it is timed.

    python benchmarks/bench.py                                  # the focal loss, headline shape, CPU
    python benchmarks/bench.py --quick                          # one small shape, float32: seconds
    python benchmarks/bench.py --losses all --threads 2 --json cpu.json --plot cpu.png --markdown cpu.md
    python benchmarks/bench.py --device cuda --shapes headline paper --json gpu.json

Run from the repository root after building the extension; without it the fused rows are skipped with
a note. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed focal wins; the checkout is the fallback

from bench_report import GOALS_LEGEND, case_table, case_title, goals_table, markdown_report, plot_cases  # noqa: E402
from bench_rows import DTYPES, LOSSES, ROWS, SHAPES, Unavailable, make_problem  # noqa: E402
from bench_run import (  # noqa: E402,F401  (Timer and time_cuda: the timer other GPU scripts import from here)
    OthersClock,
    Timer,
    describe_machine,
    evaluate_goals,
    load_average,
    measure_cpu_facts,
    run_case,
    time_cuda,
)

SCHEMA_VERSION = 2
DEFAULT_SHAPES = {"cpu": ["headline"], "cuda": ["headline", "paper"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--losses", nargs="+", choices=(*LOSSES, "all"), default=["focal"])
    parser.add_argument("--shapes", nargs="+", choices=(*SHAPES, "all"), help="default: headline (cuda: headline paper)")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), help="default: float32 bfloat16 (+ float16 on cuda)")
    parser.add_argument("--modes", nargs="+", choices=("fwd", "fwdbwd"), default=["fwd", "fwdbwd"])
    parser.add_argument("--impls", nargs="+", choices=tuple(ROWS), help="rows to run (default: all; the floor always runs)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="r512x1, float32, few rounds: a smoke test")
    parser.add_argument("--budget", type=float, help="seconds of timed rounds per case (default 3, quick 0.3)")
    parser.add_argument("--rounds", type=int, help="at least this many timed rounds per case (default 5, quick 3)")
    parser.add_argument("--json", metavar="PATH", help="write every measurement here (rewritten after every case)")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (PNG) here")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as markdown here (for RESULTS.md)")
    parser.add_argument("--require-fused", action="store_true",
                        help="exit 1 when the fused ops cannot run on the device (default: skip their rows with a note)")
    args = parser.parse_args(argv)
    if "all" in args.losses:
        args.losses = list(LOSSES)
    if args.shapes is None:
        args.shapes = ["r512x1"] if args.quick else DEFAULT_SHAPES[args.device]
    elif "all" in args.shapes:
        args.shapes = [s for s in SHAPES if args.device == "cuda" or s != "paper"]
    if args.dtype is None:
        args.dtype = ["float32"] if args.quick else ["float32", "bfloat16"] + (["float16"] if args.device == "cuda" else [])
    if args.device == "cpu" and "float16" in args.dtype:
        parser.error("float16 is benchmarked on cuda only")
    args.impls = ["floor"] + [k for k in ROWS if k != "floor" and (args.impls is None or k in args.impls)]
    args.budget = (0.3 if args.quick else 3.0) if args.budget is None else args.budget
    args.rounds = (3 if args.quick else 5) if args.rounds is None else args.rounds
    if args.budget < 0 or args.rounds < 1:
        parser.error("--budget must be >= 0 and --rounds >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def probe_rows(args, device) -> tuple[dict, list[str]]:
    """Which rows can run here, by building each on a tiny problem (compiled rows are not compiled)."""
    availability, notes = {}, []
    probe = make_problem(SHAPES["small"], torch.float32, device)
    for key in args.impls:
        entry = availability[key] = {"name": ROWS[key].name, "available": True, "note": None}
        loss = next((LOSSES[k] for k in args.losses if key in LOSSES[k].rows), None)
        if loss is None or key.endswith("_compile"):
            continue
        try:
            ROWS[key].build(loss, probe)
        except Unavailable as exc:
            entry.update(available=False, note=str(exc))
            notes.append(f"skipped {ROWS[key].name}: {exc}")
    return availability, notes


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe_machine(device, torch.get_num_threads())
    others = OthersClock()
    timer = Timer(device)
    busy = machine["busy_cores_at_start"]
    if busy is None:
        busy = machine["load_average_at_start"]
    print(f"machine: {machine.get('gpu', machine['cpu'])}, {machine['threads']} threads, torch {machine['torch']}, "
          f"commit {machine['git_describe']}, {busy:.1f} of {machine['cpu_count']} cores busy at the start")
    notes = []
    if device.type == "cpu":
        thp = machine["thp"]
        notes.append(f"huge pages {'ON' if thp['huge_pages_for_large_tensors'] else 'OFF'} "
                     f"(THP_MEM_ALLOC_ENABLE={thp['THP_MEM_ALLOC_ENABLE']}, kernel THP '{thp['kernel']}')"
                     + ("" if thp["huge_pages_for_large_tensors"] else
                        ": every fresh large tensor pays 4 KiB page faults; THP_MEM_ALLOC_ENABLE=1 speeds up every row"))
        if (busy or 0) > 0.75 * machine["cpu_count"]:
            notes.append("the machine is busy: absolute times move with its load; ratios between rows of one case "
                         "hold better (rounds interleave), and goals the load could flip say UNSURE")
    availability, skipped = probe_rows(args, device)
    facts = measure_cpu_facts(3 if args.quick else 5) if device.type == "cpu" else None
    if facts:
        notes.append(f"a fresh {facts['tensor_mib']:.0f} MiB tensor costs {facts['fresh_tensor_first_write_ms']:.1f} ms of "
                     f"page faults; ATen log1p {facts['log1p_ms']:.1f} ms vs log {facts['log_ms']:.1f} ms (every peer "
                     "computes log1p; when it is in its slow state the peers are several times slower)")
    for note in notes + skipped:
        print("note: " + note)
    for path in (args.json, args.plot, args.markdown):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def make_result(cases: list[dict], complete: bool) -> dict:
        """Everything measured so far: the JSON is rewritten after every case, so a run cut short still
        leaves its finished cases, marked ``complete: false``."""
        machine["others_busy_cores"] = others.busy_cores()
        return {"schema": SCHEMA_VERSION, "complete": complete, "machine": machine,
                "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "markdown")},
                "implementations": availability, "notes": notes + skipped, "cpu_facts": facts, "cases": cases,
                "goals": evaluate_goals(cases, machine),
                "agreement_ok": all(r["agreement"]["ok"] for c in cases for r in c["rows"] if r["agreement"] and r["ours"])}

    cases = []
    keys = [k for k in args.impls if availability[k]["available"]]
    for loss in args.losses:
        for shape in args.shapes:
            for dtype in args.dtype:
                for mode in args.modes:
                    case = run_case(loss, SHAPES[shape], DTYPES[dtype], mode, keys, device, timer, budget_s=args.budget,
                                    min_rounds=args.rounds, warmup=min(3, args.rounds))
                    cases.append(case)
                    print("\n== " + case_title(case) + " ==")
                    print("\n".join(case_table(case)), flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(make_result(cases, complete=False), indent=1))

    machine["load_average_at_end"] = load_average()
    result = make_result(cases, complete=True)
    if result["goals"]:
        print("\n== goals (forward+backward) ==")
        print("\n".join(goals_table(result["goals"])))
        if any(g["status"] != "NOT RUN" for g in result["goals"]):
            print(GOALS_LEGEND)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown_report(result) + "\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            print(f"note: no plot written to {args.plot}: matplotlib is not installed")
        else:
            plot_cases(cases, args.plot, machine)
            print(f"wrote {args.plot}")
    if not result["agreement_ok"]:
        print("error: focal disagrees with the exact loss (see 'check' above)", file=sys.stderr)
        return 1
    missing = [k for k in args.impls if ROWS[k].ours and k != "reference" and not availability[k]["available"]]
    if args.require_fused and missing:
        print(f"error: --require-fused, but {', '.join(missing)} could not run: {availability[missing[0]]['note']}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
