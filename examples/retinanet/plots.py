"""What a user looks at after (and during) a run: the training curves as a PNG, and the summary table.

``training_curves.png`` has three panels: the losses per logged interval (classification, box, total;
log scale), the learning rate, and COCO AP / AP50 at each evaluation (``--eval-every`` and the final
one). It is rewritten at each evaluation and at the end, so it can be opened while a run is going.
"""

from __future__ import annotations

import math

CURVES_FILE = "training_curves.png"
SUMMARY_FILE = "summary.md"


def plot_training_curves(history: list[dict], evaluations: list[dict], path: str) -> None:
    """Write the three-panel PNG described in the module docstring to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on a training machine
    import matplotlib.pyplot as plt

    fig, (losses, lr, ap) = plt.subplots(1, 3, figsize=(12, 3.4))
    finite = [h for h in history if all(math.isfinite(h[k]) for k in ("loss", "loss_cls", "loss_box"))]
    iters = [h["iter"] for h in finite]
    for key, label in (("loss", "total"), ("loss_cls", "classification (focal)"), ("loss_box", "box")):
        losses.plot(iters, [h[key] for h in finite], label=label)
    losses.set_title("loss per positive anchor")
    if finite:
        losses.set_yscale("log")
    losses.legend(fontsize=7)
    lr.plot([h["iter"] for h in history], [h["lr"] for h in history])
    lr.set_title("learning rate")
    if evaluations:
        ap.plot([e["iter"] for e in evaluations], [e["AP"] for e in evaluations], "o-", label="AP")
        ap.plot([e["iter"] for e in evaluations], [e["AP50"] for e in evaluations], "s--", label="AP50")
        ap.legend(fontsize=7)
    else:
        ap.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=ap.transAxes)
    ap.set_title("COCO AP on the val set")
    ap.set_ylim(0, 1)
    for axis in (losses, lr, ap):
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def summary_table(summary: dict) -> str:
    """The run's final numbers as a two-column Markdown table (printed and written to summary.md)."""
    rows = [("iterations", summary.get("iterations")), ("skipped batches", summary.get("skipped_batches")),
            ("processes", summary.get("world_size", 1)), ("training time (s)", summary.get("train_seconds")),
            ("images / s", summary.get("images_per_second")), ("final loss", summary.get("final_loss")),
            ("final classification loss", summary.get("final_loss_cls")),
            ("final box loss", summary.get("final_loss_box"))]
    rows += [(name, summary.get(name)) for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    lines = ["| metric | value |", "| --- | ---: |"]
    for name, value in rows:
        if value is None:
            continue
        shown = f"{value:.4f}" if name.startswith("AP") or "loss" in name else value
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)
