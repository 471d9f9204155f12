"""Markdown summary of bench.py JSON results, for benchmarks/RESULTS.md and the top-level README.

    python benchmarks/summarize.py cpu.json [cpu-thp.json ...]

Prints, per file: the machine and the command, the headline table (200000 x 80, forward+backward,
every dtype in the run), the goals, and a compact table of every case with the fused op's time, its
ratio to the floor and its speedup over torch.compile(torchvision).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEADLINE_SHAPE = "headline"
FUSED = "fused_ids"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def machine_line(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_capability']}), {m['threads']} threads"
    thp = m["thp"]
    pages = "" if m.get("gpu") else f", huge pages {'on' if thp['huge_pages_for_large_tensors'] else 'off'}"
    return (
        f"{where}{pages}; torch {m['torch']}, torchvision {m['torchvision']}; "
        f"commit `{m['git_describe']}`; {m['date']}; load average {m.get('load_average_at_start') or 0:.1f} -> "
        f"{m.get('load_average_at_end') or 0:.1f} on {m['cpu_count']} cores"
    )


def headline_table(result: dict) -> list[str]:
    cases = [c for c in result["cases"] if c["shape"]["name"] == HEADLINE_SHAPE and c["mode"] == "fwdbwd"]
    if not cases:
        return []
    dtypes = [c["dtype"] for c in cases]
    lines = [
        "| forward+backward, 200000 x 80 | " + " | ".join(dtypes) + " |",
        "| --- |" + " --- |" * len(dtypes),
    ]
    keys = [r["key"] for r in cases[0]["rows"]]
    for key in keys:
        cells, name = [], key
        for case in cases:
            row = next(r for r in case["rows"] if r["key"] == key)
            name = row["name"].replace("[floor]", "(floor)").strip()
            if row.get("median_s") is None:
                cells.append("n/a")
                continue
            vs_fused = case["ratios"][key].get(FUSED)  # time(row) / time(fused, class ids)
            cell = f"{_ms(row['median_s'])} ({row['floor_ratio']:.2f}x floor)"
            if vs_fused and key != FUSED and not key.startswith("floor"):
                cell += f", focal {vs_fused:.1f}x faster" if vs_fused >= 1 else f", {1 / vs_fused:.1f}x faster than class ids"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def goals_table(result: dict) -> list[str]:
    if all(g["status"] == "NOT RUN" for g in result["goals"]):
        return []
    lines = ["| goal | measured | status |", "| --- | --- | --- |"]
    for g in result["goals"]:
        measured = f"{g['measured']:.2f}x" if g["measured"] is not None else "-"
        lines.append(f"| {g['name']} | {measured} | {g['status']} |")
    return lines


def cases_table(result: dict) -> list[str]:
    lines = [
        "| shape | dtype | mode | floor | focal ids | x floor | focal float | torch.compile(tv) | focal speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in result["cases"]:
        rows = {r["key"]: r for r in case["rows"]}

        def t(key):
            return rows.get(key, {}).get("median_s")

        fused, compiled = t(FUSED), t("tv_compile")
        cells = [
            f"{case['shape']['name']} ({case['shape']['rows']})",
            case["dtype"],
            case["mode"],
            _ms(t("floor")),
            _ms(fused),
            f"{rows[FUSED]['floor_ratio']:.2f}" if fused else "-",
            _ms(t("fused_float")),
            _ms(compiled),
            f"{compiled / fused:.1f}x" if fused and compiled else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summarize(path: Path) -> str:
    result = json.loads(path.read_text())
    out = [f"**{machine_line(result)}**", "", f"`{result['machine']['command']}`", ""]
    for block in (headline_table(result), goals_table(result), cases_table(result)):
        if block:
            out += block + [""]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by bench.py --json")
    args = parser.parse_args(argv)
    print("\n\n".join(summarize(p) for p in args.results))


if __name__ == "__main__":
    main()
