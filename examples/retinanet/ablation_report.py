"""Collect ablation results over seeds: a table with the seed spread and a plot of the Table 1 sweeps.

``ablate`` writes one ``ablation.json`` per command (rows: arm, seed, AP, ...). This module merges any
number of them (several seeds, arms run by separate commands), groups the rows by arm and reports each
arm's AP per seed, mean and sample standard deviation:

    python -m examples.retinanet.ablation_report runs/abl/*/ablation.json --output results/sweep

writes ``OUTPUT.json`` (the merged raw rows and the per-arm summary), ``OUTPUT.md`` (the table) and
``OUTPUT.png`` (AP against alpha for alpha-balanced CE, Table 1a, and against gamma with alpha retuned
per gamma, Table 1b; a dot per seed, the mean with its standard deviation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

from .errors import InputError, report_input_errors

# Where each Table 1 arm sits on the sweeps' x axes: the alpha of alpha-balanced CE, and (gamma, the
# alpha the paper pairs with it). alpha_ce is alpha .75, the paper's best alpha and its gamma-0 point.
ALPHA_SWEEP = {"alpha_ce_25": 0.25, "alpha_ce_50": 0.5, "alpha_ce": 0.75, "alpha_ce_90": 0.9}
GAMMA_SWEEP = {"alpha_ce": (0.0, 0.75), "fl_g05": (0.5, 0.5), "fl_g1": (1.0, 0.25), "fl": (2.0, 0.25),
               "fl_g5": (5.0, 0.25)}
STATS = ("AP", "AP50", "AP75")


def load_rows(paths: list[str]) -> list[dict]:
    """The rows of every ``ablation.json`` in ``paths``, each with its ``seed`` (older files kept the
    seed in their options only). A repeated (arm, seed) is an error: it would count one seed twice."""
    rows, seen = [], {}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            file_rows, options = data["rows"], data.get("options", {})
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path}: not an ablation.json ({error})") from None
        for row in file_rows:
            row = {**row, "seed": row.get("seed", options.get("seed"))}
            key = (row["arm"], row["seed"])
            if key in seen:
                raise InputError(f"{path}: arm {row['arm']} seed {row['seed']} is also in {seen[key]}")
            seen[key] = path
            rows.append(row)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per arm, in first-seen order: its label, seeds, AP per seed, and mean / sd of each COCO stat
    (sd is the sample standard deviation, 0 for one seed; a diverged run counts as AP 0)."""
    arms: dict[str, list[dict]] = {}
    for row in rows:
        arms.setdefault(row["arm"], []).append(row)
    summary = []
    for arm, arm_rows in arms.items():
        arm_rows = sorted(arm_rows, key=lambda r: r["seed"])
        entry = {"arm": arm, "label": arm_rows[0]["label"], "seeds": [r["seed"] for r in arm_rows],
                 "diverged": sum(bool(r.get("diverged")) for r in arm_rows)}
        for stat in STATS:
            values = [float(r[stat]) for r in arm_rows]
            entry[stat] = values
            entry[f"{stat}_mean"] = statistics.fmean(values)
            entry[f"{stat}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict]) -> str:
    """One line per arm: AP per seed, mean ± sd, AP50 mean."""
    lines = ["| loss | seeds | AP per seed | AP mean ± sd | AP50 mean |", "| --- | --- | --- | ---: | ---: |"]
    for entry in summary:
        per_seed = " / ".join(f"{v:.3f}" for v in entry["AP"])
        mark = f" ({entry['diverged']} diverged)" if entry["diverged"] else ""
        lines.append(f"| {entry['label']}{mark} | {', '.join(map(str, entry['seeds']))} | {per_seed} | "
                     f"{entry['AP_mean']:.3f} ± {entry['AP_sd']:.3f} | {entry['AP50_mean']:.3f} |")
    return "\n".join(lines)


def plot_sweeps(summary: list[dict], path: str, title: str = "") -> None:
    """AP against alpha (alpha-balanced CE) and against gamma (alpha retuned per gamma): a dot per
    seed, the mean with a bar of one standard deviation. Arms outside the sweeps (CE without the
    prior, the family) are drawn as horizontal lines on both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = {entry["arm"]: entry for entry in summary}
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), sharey=True)
    gammas = {arm: gamma for arm, (gamma, _) in GAMMA_SWEEP.items()}
    for ax, sweep, xlabel in ((axes[0], ALPHA_SWEEP, "alpha (alpha-balanced CE, gamma = 0)"),
                              (axes[1], gammas, "gamma (alpha retuned per gamma)")):
        points = sorted(((x, by_arm[arm]) for arm, x in sweep.items() if arm in by_arm), key=lambda p: p[0])
        for x, entry in points:
            ax.scatter([x] * len(entry["AP"]), entry["AP"], color="0.6", s=14, zorder=2)
            if ax is axes[1]:
                ax.annotate(f"alpha {GAMMA_SWEEP[entry['arm']][1]:g}", (x, entry["AP_mean"]), fontsize=7,
                            xytext=(5, -10), textcoords="offset points")
        if points:
            ax.errorbar([x for x, _ in points], [e["AP_mean"] for _, e in points],
                        yerr=[e["AP_sd"] for _, e in points], color="C0", marker="o", capsize=4, zorder=3,
                        label="mean ± sd over seeds")
        if "fl" in by_arm and ax is axes[0]:
            fl = by_arm["fl"]
            ax.axhspan(fl["AP_mean"] - fl["AP_sd"], fl["AP_mean"] + fl["AP_sd"], color="C1", alpha=0.15)
            ax.axhline(fl["AP_mean"], color="C1", label=f"{fl['label']}, mean ± sd")
        for i, arm in enumerate(a for a in by_arm if a not in ALPHA_SWEEP and a not in GAMMA_SWEEP):
            ax.axhline(by_arm[arm]["AP_mean"], color=f"C{i + 2}", linestyle="--", label=by_arm[arm]["label"])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("COCO AP (val)")
    axes[0].set_title("Table 1a: alpha-balanced CE", fontsize=9)
    axes[1].set_title("Table 1b: focal loss over gamma", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(rows: list[dict], output: str, title: str = "", extra: dict | None = None) -> list[dict]:
    """Write ``output``.json / .md / .png for ``rows``; returns the per-arm summary."""
    summary = summarise(rows)
    directory = os.path.dirname(output)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(output + ".json", "w") as f:
        json.dump({"description": title, **(extra or {}), "summary": summary, "rows": rows}, f, indent=1)
    table = markdown_table(summary)
    with open(output + ".md", "w") as f:
        f.write(table + "\n")
    plot_sweeps(summary, output + ".png", title)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="merge ablation.json files: per-arm AP over seeds, table and plot")
    parser.add_argument("results", nargs="+", help="ablation.json files written by examples.retinanet.ablate")
    parser.add_argument("--output", required=True, help="path prefix of the .json, .md and .png written")
    parser.add_argument("--title", default="", help="description stored in the JSON and shown on the plot")
    args = parser.parse_args(argv)
    with report_input_errors(parser.prog):
        rows = load_rows(args.results)
        if not rows:
            raise InputError("the files hold no rows")
        summary = write_report(rows, args.output, args.title)
    print(markdown_table(summary))
    bad = [e["arm"] for e in summary if not all(math.isfinite(v) for v in e["AP"])]
    if bad:
        print(f"warning: non-finite AP in {bad}")


if __name__ == "__main__":
    main()
