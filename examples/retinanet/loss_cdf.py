"""Figure 4 of the paper: cumulative distribution of the normalised loss of positive and negative
samples of a trained model, for several gamma.

Each (anchor, class) output of the model on the val images is one binary sample: positive where the
anchor is matched to an object of that class, negative otherwise (ignored anchors are left out). For
each gamma the focal loss of every sample is computed with ``focal.sigmoid_focal_loss``
(``reduction="none"``, class-id targets, no alpha: a constant factor cancels in the normalisation), the
positives' and negatives' losses are each sorted and normalised to sum to one, and their cumulative sum
is plotted against the fraction of samples.

    python -m examples.retinanet.loss_cdf --checkpoint runs/retinanet/default/model_final.pth
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: the OpenMP runtime reads its settings once (see entry)
    from .entry import configure_process

    configure_process()

import argparse
import json
import os

import torch

from .data import collate
from .errors import report_input_errors
from .evaluate import checkpoint_digits, load_checkpoint
from .loss import IGNORE_INDEX


@torch.no_grad()
def logits_and_classes(model, dataset: torch.utils.data.Dataset, batch_size: int = 32):
    """Class logits (S, K) and class-id targets (S,) of every anchor of every image (S = images * R)."""
    model.eval()
    all_logits, all_classes = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    for images, targets in loader:
        features = model.backbone(model.preprocess(images))
        anchors = torch.cat(model.anchor_generator([f.shape[-2:] for f in features]))  # (R, 4)
        logits, _ = model.head(features)  # (N, R, K)
        classes, _ = model.label_anchors(anchors, targets)  # (N, R)
        all_logits.append(logits.flatten(0, 1))
        all_classes.append(classes.flatten())
    return torch.cat(all_logits), torch.cat(all_classes)


def normalised_loss_cdf(logits: torch.Tensor, classes: torch.Tensor, gamma: float):
    """``(positive_cdf, negative_cdf)``: sorted, sum-normalised cumulative losses (1-D each)."""
    from focal import sigmoid_focal_loss

    keep = classes != IGNORE_INDEX
    logits, classes = logits[keep], classes[keep]
    loss = sigmoid_focal_loss(logits, classes, alpha=-1, gamma=gamma, reduction="none")  # (S, K)
    positive = torch.nn.functional.one_hot(classes.clamp(min=0), logits.shape[-1]).bool()
    positive &= (classes >= 0).unsqueeze(-1)
    cdfs = []
    for values in (loss[positive], loss[~positive]):
        values = values.double().sort().values
        cdfs.append((values.cumsum(0) / values.sum()).float())
    return cdfs[0], cdfs[1]


def plot(cdfs: dict, path: str, num_positive: int, num_negative: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for gamma, (positive, negative) in cdfs.items():
        for ax, cdf in zip(axes, (positive, negative)):
            step = max(1, len(cdf) // 2000)  # plot at most ~2000 points per curve
            fraction = torch.arange(len(cdf)).float()[::step] / max(1, len(cdf) - 1)
            ax.plot(fraction.numpy(), cdf[::step].numpy(), label=f"gamma = {gamma:g}")
    axes[0].set_title(f"positive samples ({num_positive:,})")
    axes[1].set_title(f"negative samples ({num_negative:,})")
    for ax in axes:
        ax.set_xlabel("fraction of samples")
        ax.set_ylabel("cumulative normalised loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Figure 4: CDF of the normalised focal loss")
    parser.add_argument("--checkpoint", default="runs/retinanet/default/model_final.pth")
    parser.add_argument("--data-root", default=None, help="default: the checkpoint's training data folder")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--max-images", type=int, default=500)
    parser.add_argument("--output", default="outputs/retinanet/loss_cdf.png")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with report_input_errors(parser.prog):
        run(args)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    model, checkpoint = load_checkpoint(args.checkpoint)
    logits, classes = logits_and_classes(model, checkpoint_digits(args, checkpoint, "val", args.max_images))
    cdfs = {gamma: normalised_loss_cdf(logits, classes, gamma) for gamma in args.gammas}
    num_positive, num_negative = len(cdfs[args.gammas[0]][0]), len(cdfs[args.gammas[0]][1])
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    plot(cdfs, args.output, num_positive, num_negative)
    # Share of the negatives' loss carried by the hardest 1% / 10% of negatives, as quoted in EXPERIMENTS.md.
    summary = {}
    for gamma, (positive, negative) in cdfs.items():
        n = len(negative)
        summary[f"gamma={gamma:g}"] = {
            "neg_loss_share_hardest_1pct": round(1 - negative[int(0.99 * n) - 1].item(), 4),
            "neg_loss_share_hardest_10pct": round(1 - negative[int(0.90 * n) - 1].item(), 4),
            "pos_loss_share_hardest_20pct": round(1 - positive[int(0.80 * len(positive)) - 1].item(), 4),
        }
    print(json.dumps({"positives": num_positive, "negatives": num_negative, **summary}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
