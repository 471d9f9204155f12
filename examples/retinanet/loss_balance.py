"""Where the classification loss and its gradient come from: positives, hard and easy negatives.

The paper's argument for the focal loss (sections 3 and 5) is that in dense detection the many easy
negatives, each with a small cross-entropy loss, together outweigh the few positives in the loss and
in the gradient. This measures that on a model of this example, for several losses at once:

* every (anchor, class) output on some training images is one sample: positive where the anchor is
  matched to an object of that class, a negative otherwise (ignored anchors left out); a negative is
  *easy* when the model gives it p < ``--easy`` (p_t > 1 - easy), *hard* otherwise;
* for each loss (``name=gamma,alpha``; alpha < 0: no alpha) the loss of each group, normalised by the
  number of positive anchors as in training, and the norm of the gradient each group alone sends to
  the classification subnet's parameters (``head.cls_subnet`` and ``head.cls_score``).

    python -m examples.retinanet.loss_balance --checkpoint runs/abl/fl-s0/fl/model_final.pth
    python -m examples.retinanet.loss_balance --checkpoint runs/abl/fl-s0/fl/model_final.pth --untrained

``--untrained`` measures the same architecture freshly initialised (prior bias, seed ``--seed``)
instead of the checkpoint's weights: the situation at the first iteration.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: the OpenMP runtime reads its settings once (see entry)
    from .entry import configure_process

    configure_process()

import argparse
import json

import torch

from .errors import InputError, report_input_errors
from .loss import BACKGROUND, IGNORE_INDEX

GROUPS = ("positive", "hard negative", "easy negative")
DEFAULT_LOSSES = ["CE=0,-1", "alpha-CE=0,0.75", "FL=2,0.25"]


def parse_loss(text: str) -> tuple[str, float, float]:
    """``name=gamma,alpha`` -> ``(name, gamma, alpha)``."""
    try:
        name, values = text.split("=")
        gamma, alpha = (float(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=gamma,alpha (e.g. FL=2,0.25), got {text!r}") from None
    if gamma < 0 or not (alpha < 0 or 0 <= alpha <= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: gamma must be >= 0 and alpha within [0, 1] or negative")
    return name, gamma, alpha


def sample_groups(logits: torch.Tensor, classes: torch.Tensor, easy: float) -> dict[str, torch.Tensor]:
    """Boolean (S, K) masks of the positive, hard negative and easy negative samples of ``logits``
    (S, K) with class-id targets ``classes`` (S,) (``BACKGROUND``, ``IGNORE_INDEX`` or a class)."""
    valid = (classes != IGNORE_INDEX).unsqueeze(-1).expand_as(logits)
    positive = torch.zeros_like(logits, dtype=torch.bool)
    rows = (classes >= 0).nonzero().squeeze(-1)
    positive[rows, classes[rows]] = True
    negative = valid & ~positive
    is_easy = torch.sigmoid(logits.detach()) < easy
    return {"positive": positive, "hard negative": negative & ~is_easy, "easy negative": negative & is_easy}


def group_losses(logits: torch.Tensor, classes: torch.Tensor, gamma: float, alpha: float,
                 groups: dict[str, torch.Tensor], normalizer: float) -> dict[str, torch.Tensor]:
    """The summed focal loss of each group divided by ``normalizer`` (differentiable), from
    ``focal.sigmoid_focal_loss`` with ``reduction="none"``."""
    from focal import sigmoid_focal_loss

    per_sample = sigmoid_focal_loss(logits, classes.clamp(min=BACKGROUND), alpha=alpha, gamma=gamma, reduction="none")
    return {name: per_sample[mask].sum() / normalizer for name, mask in groups.items()}


def measure(model, images: torch.Tensor, targets: list[dict], losses: list[tuple[str, float, float]],
            easy: float = 0.1) -> dict:
    """Loss and gradient norm per group and loss, for one batch (see the module docstring)."""
    model.eval()  # BatchNorm in inference mode: the measurement must not change the model
    with torch.no_grad():
        features = model.backbone(model.preprocess(images))
        anchors = torch.cat(model.anchor_generator([f.shape[-2:] for f in features]))
        classes, _ = model.label_anchors(anchors, targets)
    features = [f.detach() for f in features]
    params = list(model.head.cls_subnet.parameters()) + list(model.head.cls_score.parameters())
    logits, _ = model.head(features)
    logits, classes = logits.flatten(0, 1), classes.flatten()
    groups = sample_groups(logits, classes, easy)
    normalizer = max(1.0, float((classes >= 0).sum()))
    result = {"samples": {name: int(mask.sum()) for name, mask in groups.items()}, "positives": normalizer,
              "losses": {}}
    for name, gamma, alpha in losses:
        per_group = group_losses(logits, classes, gamma, alpha, groups, normalizer)
        entry = {}
        for group, value in per_group.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))
            entry[group] = {"loss": float(value.detach()), "grad_norm": float(norm)}
        result["losses"][name] = entry
    return result


def accumulate(batches: list[dict]) -> dict:
    """Mean over batches of every number in ``measure``'s results (samples summed)."""
    out = {"batches": len(batches), "samples": {}, "losses": {}}
    for group in GROUPS:
        out["samples"][group] = sum(b["samples"][group] for b in batches)
    for name in batches[0]["losses"]:
        out["losses"][name] = {
            group: {key: sum(b["losses"][name][group][key] for b in batches) / len(batches)
                    for key in ("loss", "grad_norm")} for group in GROUPS}
    return out


def table(result: dict) -> str:
    """Markdown: per loss, each group's share of the loss and its gradient norm relative to the positives'."""
    lines = ["| loss | loss share: positive / hard neg. / easy neg. | gradient norm: positive / hard neg. / easy neg. |",
             "| --- | --- | --- |"]
    for name, groups in result["losses"].items():
        total = sum(groups[g]["loss"] for g in GROUPS) or 1.0
        shares = " / ".join(f"{100 * groups[g]['loss'] / total:.1f} %" for g in GROUPS)
        norms = " / ".join(f"{groups[g]['grad_norm']:.3g}" for g in GROUPS)
        lines.append(f"| {name} | {shares} | {norms} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="loss and gradient of positives vs easy and hard negatives")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--untrained", action="store_true", help="the checkpoint's architecture, freshly initialised")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed with --untrained")
    parser.add_argument("--losses", type=parse_loss, nargs="+", default=[parse_loss(t) for t in DEFAULT_LOSSES],
                        help="name=gamma,alpha (alpha < 0: none)")
    parser.add_argument("--easy", type=float, default=0.1, help="a negative with p below this is easy")
    parser.add_argument("--images", type=int, default=64, help="training images measured (in batches of 16)")
    parser.add_argument("--data-root", default=None, help="default: the checkpoint's training data folder")
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not 0 < args.easy < 1 or args.images < 1:
        parser.error("--easy must be within (0, 1) and --images at least 1")
    with report_input_errors(parser.prog):
        run(args)


def run(args) -> None:
    from .config import build_model
    from .data import collate
    from .evaluate import checkpoint_digits, load_checkpoint

    torch.set_num_threads(args.threads)
    model, checkpoint = load_checkpoint(args.checkpoint)
    if model.config.detector != "focal":
        raise InputError(f"{args.checkpoint} is a {model.config.detector} detector: only --detector focal is measured")
    if args.untrained:
        torch.manual_seed(args.seed)
        model = build_model(model.config)
    loader = torch.utils.data.DataLoader(checkpoint_digits(args, checkpoint, "train", args.images), batch_size=16,
                                         collate_fn=collate)
    batches = [measure(model, images, targets, args.losses, args.easy) for images, targets in loader]
    result = {"checkpoint": args.checkpoint, "untrained": args.untrained, "easy_below": args.easy,
              **accumulate(batches)}
    print(json.dumps(result["samples"]))
    print(table(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
