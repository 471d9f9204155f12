"""How the benchmark reports: one table per case and the goals, as console text or markdown, and a plot."""

from __future__ import annotations

from bench_rows import LOSSES, ROWS

MODES = {"fwd": "forward", "fwdbwd": "forward+backward"}


def _time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def render(header: list[str], body: list[list[str]], markdown: bool, right: range | tuple = ()) -> list[str]:
    """A table: markdown pipes, or columns aligned for the console (those in ``right`` to the right)."""
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header, *body]]


def _check(agreement: dict | None) -> str:
    if not agreement or "value_error" not in agreement:
        return ""
    errors = f"loss {agreement['value_error']:.0e}"
    if "grad_error" in agreement:
        errors += f", grad {agreement['grad_error']:.0e}"
    return f"{'ok' if agreement['ok'] else 'MISMATCH'} ({errors})"


def case_title(case: dict) -> str:
    shape = case["shape"]
    return (f"{LOSSES[case['loss']].title} | {MODES[case['mode']]} | {case['dtype']} | {shape['name']}: "
            f"{shape['rows']} x {shape['classes']} | {case['rounds']} rounds")


def case_table(case: dict) -> list[str]:
    """Median time, the spread of the rounds (interquartile range, +-% of the median), throughput, time
    over the floor's and over the fused op's with class ids, the agreement check."""
    rows = case["rows"]
    cuda = any(r.get("peak_memory_bytes") is not None for r in rows)
    header = ["implementation", "median", "spread", "Gelem/s", "GB/s", "x floor", "x focal ids"]
    header += ["peak MiB", "host"] if cuda else []
    body = []
    for r in rows:
        if r.get("median_s") is None:
            why = " ".join(filter(None, [_check(r["agreement"]), r["note"] or "not timed"]))
            body.append([r["name"], "-", *[""] * (len(header) - 2), why])
            continue
        low, high = r["spread_s"]
        cells = [r["name"], _time(r["median_s"]), f"+-{(high - low) / 2 / r['median_s']:.0%}",
                 f"{r['elements_per_s'] / 1e9:.3f}", f"{r['gb_per_s']:.1f}", _ratio(r["floor_ratio"]), _ratio(r["fused_ratio"])]
        if cuda:
            outlasted = 1 - r.get("launch_hidden_fraction", 1.0)
            hidden = f" (enqueue outlasted the spin {outlasted:.0%})" if outlasted else ""
            cells += [f"{r['peak_memory_bytes'] / 2**20:.1f}", _time(r["host_median_s"]) + hidden]
        body.append(cells + [_check(r["agreement"])])
    return render(header + ["check"], body, markdown=False, right=range(1, len(header)))


def goals_table(goals: list[dict], markdown: bool = False) -> list[str]:
    """The goals whose case was run, and how many were not."""
    body = []
    for g in goals:
        if g["status"] == "NOT RUN" and g.get("note", "").startswith("not in this run"):
            continue
        measured = "-" if g["measured"] is None else f"{g['measured']:.2f}x ({g['spread'][0]:.2f}-{g['spread'][1]:.2f})"
        body.append([g["status"], g["name"], measured, g.get("note", "")])
    lines = render(["status", "goal", "measured (rounds' spread)", "note"], body, markdown, right=(2,)) if body else []
    left_out = len(goals) - len(body)
    return lines + ([f"({left_out} goals of other cases: not in this run)"] if left_out else [])


GOALS_LEGEND = ("PASS / FAIL: a claim the README makes; MET / OPEN: a target still worked on; UNSURE: the machine's "
                "load decides it (the goal lies within the spread of the rounds, or other processes kept every core "
                "busy): rerun on a quiet machine or with a larger --budget")


def machine_line(m: dict) -> str:
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_capability']}), {m['threads']} threads"
    pages = "" if m.get("gpu") else f", huge pages {'on' if m['thp']['huge_pages_for_large_tensors'] else 'off'}"
    if m.get("others_busy_cores") is not None:
        load = f"other processes kept {m['others_busy_cores']:.1f} of {m['cpu_count']} cores busy"
    else:
        start, end = m["load_average_at_start"] or 0, m.get("load_average_at_end") or 0
        load = f"load average {start:.1f} -> {end:.1f} on {m['cpu_count']} cores"
    return (f"{where}{pages}; torch {m['torch']}, torchvision {m['torchvision']}; commit `{m['git_describe']}`; "
            f"{m['date']}; {load}")


def summary_table(cases: list[dict], markdown: bool = False) -> list[str]:
    """One line per case: each row's median time and, in brackets, its time over the floor's."""
    keys = [k for k in ROWS if any(r["key"] == k and r.get("median_s") for c in cases for r in c["rows"])]
    body = []
    for case in cases:
        timed = {r["key"]: r for r in case["rows"] if r.get("median_s")}
        cells = [case["loss"], case["shape"]["name"], case["dtype"], case["mode"]]
        for key in keys:
            row = timed.get(key)
            if row is None:
                cells.append("-")
            else:
                cells.append(_time(row["median_s"]) + ("" if key == "floor" else f" ({row['floor_ratio']:.2f})"))
        body.append(cells)
    names = ["floor"] + [ROWS[k].name for k in keys[1:]]
    return render(["loss", "shape", "dtype", "mode", *names], body, markdown, right=range(4, 4 + len(keys)))


def markdown_report(result: dict) -> str:
    """The run as RESULTS.md keeps it: machine, command, goals, and every case's times (x floor)."""
    out = [f"**{machine_line(result['machine'])}**", "", f"`{result['machine']['command']}`", ""]
    if result["goals"]:
        out += goals_table(result["goals"], markdown=True) + [""]
    return "\n".join(out + summary_table(result["cases"], markdown=True))


def plot_cases(cases: list[dict], path: str, machine: dict) -> None:
    """Time over the floor, log scale: a panel per mode and dtype, a group of bars per loss and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((c["mode"], c["dtype"]) for c in cases))
    keys = [k for k in ROWS if k != "floor" and any(r["key"] == k and r.get("floor_ratio") for c in cases for r in c["rows"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for ax, (mode, dtype) in zip(axes[:, 0], panels):
        group = [c for c in cases if (c["mode"], c["dtype"]) == (mode, dtype)]
        width = 0.8 / max(1, len(keys))
        for j, key in enumerate(keys):
            xs, ys = [], []
            for i, case in enumerate(group):
                row = next((r for r in case["rows"] if r["key"] == key and r.get("floor_ratio")), None)
                if row:
                    xs.append(i + (j - (len(keys) - 1) / 2) * width)
                    ys.append(row["floor_ratio"])
            ax.bar(xs, ys, width, label=ROWS[key].name, color=plt.cm.tab10(list(ROWS).index(key) % 10))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("time / floor (log)")
        ax.set_xticks(range(len(group)), [f"{c['loss']}\n{c['shape']['name']}" for c in group])
        ax.set_title(f"{MODES[mode]}, {dtype}")
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['threads']} threads"
    fig.suptitle(f"time relative to the floor (torch.sigmoid / torch.softmax) - {where}, torch {machine['torch']}", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 if len(panels) < 3 else 0.03, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
