"""The paper's Table 1(a/b) comparison on the digits benchmark, at one training budget per arm:

* ``fl``: focal loss, gamma = 2, alpha = .25, prior initialisation pi = .01 (the RetinaNet default);
* ``alpha_ce``: alpha-balanced cross entropy, gamma = 0, alpha = .75, prior initialisation;
* ``ce_no_prior``: plain cross entropy (gamma = 0, no alpha weighting) with the final classification
  bias at 0 instead of the prior, the setting the paper reports as diverging (section 3.3);
* ``alpha_ce_25`` / ``_50`` / ``_90``: alpha-balanced CE at other alphas (Table 1a's sweep);
* ``fl_g05``, ``fl_g1``, ``fl_g5``: FL at gamma .5, 1 and 5 with the paper's best alpha for each
  (Table 1b);
* ``fl_star``, ``qfl``, ``vfl``: the family's other members (``--cls-loss``), fused like FL.

    python -m examples.retinanet.ablate --preset imbalance            # Table 1a/1b, seeds 0 and 1
    python -m examples.retinanet.ablate --arms fl alpha_ce --seed 2   # two arms, one seed

The default arms are Table 1's (``TABLE1_ARMS``), the default seeds 0 and 1. Writes ``OUTPUT/ablation.json`` (a row per arm and
seed), ``OUTPUT/ablation.md`` (the table with each arm's seed spread), ``OUTPUT/ablation.png`` (AP over
the alpha and gamma sweeps, see ``ablation_report``) and ``OUTPUT/loss_curves.png`` (the first seed's
losses). All arms share one decoded dataset and the same optimiser settings as ``train``; seed ``s``
fixes the initialisation and the batch order, the same for every arm.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: the OpenMP runtime reads its settings once (see entry)
    from .entry import configure_process

    configure_process()

import argparse
import dataclasses
import json
import math
import os

from .ablation_report import markdown_table, write_report
from .config import add_config_arguments, config_from_arguments
from .batches import InMemoryBatches
from .data import CocoDetection, build_transform
from .errors import report_input_errors
from .train import add_train_arguments, dataset_paths, options_from_arguments, train

ARMS = {
    "fl": ("FL (gamma=2, alpha=.25)", dict(focal_gamma=2.0, focal_alpha=0.25, prior_prob=0.01)),
    "alpha_ce": ("alpha-balanced CE (gamma=0, alpha=.75)", dict(focal_gamma=0.0, focal_alpha=0.75, prior_prob=0.01)),
    "ce_no_prior": ("CE, no prior init (gamma=0, bias 0)", dict(focal_gamma=0.0, focal_alpha=-1.0, prior_prob=0.0)),
    # Table 1a: alpha-balanced CE over alpha (the paper's best is .75).
    "alpha_ce_25": ("alpha-balanced CE (gamma=0, alpha=.25)", dict(focal_gamma=0.0, focal_alpha=0.25, prior_prob=0.01)),
    "alpha_ce_50": ("alpha-balanced CE (gamma=0, alpha=.5)", dict(focal_gamma=0.0, focal_alpha=0.5, prior_prob=0.01)),
    "alpha_ce_90": ("alpha-balanced CE (gamma=0, alpha=.9)", dict(focal_gamma=0.0, focal_alpha=0.9, prior_prob=0.01)),
    # Table 1b: gamma with the paper's best alpha for it.
    "fl_g05": ("FL (gamma=.5, alpha=.5)", dict(focal_gamma=0.5, focal_alpha=0.5, prior_prob=0.01)),
    "fl_g1": ("FL (gamma=1, alpha=.25)", dict(focal_gamma=1.0, focal_alpha=0.25, prior_prob=0.01)),
    "fl_g5": ("FL (gamma=5, alpha=.25)", dict(focal_gamma=5.0, focal_alpha=0.25, prior_prob=0.01)),
    # focal's family, each fused, at the same budget: FL* (Appendix A: gamma 2, beta 1), QFL and VFL
    # with the IoU of each positive's predicted box as its target.
    "fl_star": ("FL* (gamma=2, beta=1, alpha=.25)", dict(cls_loss="focal_star", focal_gamma=2.0, star_beta=1.0,
                                                       focal_alpha=0.25, prior_prob=0.01)),
    "qfl": ("QFL (beta=2)", dict(cls_loss="qfl", qfl_beta=2.0, prior_prob=0.01)),
    "vfl": ("VFL (alpha=.75, gamma=2)", dict(cls_loss="vfl", vfl_alpha=0.75, vfl_gamma=2.0, prior_prob=0.01)),
}
# Table 1a (alpha-balanced CE over alpha), Table 1b (FL over gamma; gamma 0 is alpha_ce) and CE without
# the prior initialisation (section 3.3): what ``ablate`` runs unless --arms says otherwise.
TABLE1_ARMS = ["fl", "alpha_ce", "ce_no_prior", "alpha_ce_25", "alpha_ce_50", "alpha_ce_90", "fl_g05", "fl_g1",
               "fl_g5"]
DEFAULT_SEEDS = (0, 1)  # at least two seeds per arm: one seed orders nothing at these spreads


def plot_loss_curves(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, result in results.items():
        history = [h for h in result["history"] if math.isfinite(h["loss"])]
        iters = [h["iter"] for h in history]
        axes[0].plot(iters, [h["loss_cls"] for h in history], label=ARMS[name][0])
        axes[1].plot(iters, [h["loss_box"] for h in history], label=ARMS[name][0])
    axes[0].set_title("classification loss (per positive anchor)")
    axes[1].set_title("box regression loss (per positive anchor)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_arguments(argv=None) -> argparse.Namespace:
    """The command line, with ``seeds`` resolved (``--seeds``, else ``--seed``, else ``DEFAULT_SEEDS``)."""
    parser = argparse.ArgumentParser(description="Table 1a/1b: FL, alpha-CE and CE without prior init, same budget",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(parser)
    add_config_arguments(parser)
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=TABLE1_ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="run every arm once per seed (default: --seed alone if given, else 0 and 1)")
    parser.set_defaults(output="runs/retinanet/ablate", iters=1000, seed=None)
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seed is not None:
        parser.error("--seed and --seeds both set the seeds: pass one of them")
    if args.seeds is None:
        args.seeds = [args.seed] if args.seed is not None else list(DEFAULT_SEEDS)
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    args.seed = args.seeds[0]
    if len(set(args.arms)) != len(args.arms):
        parser.error(f"--arms names an arm twice: {args.arms}")
    args.prog = parser.prog
    return args


def main(argv=None) -> None:
    args = parse_arguments(argv)
    with report_input_errors(args.prog):
        run(args)


def run(args) -> None:
    base_options = options_from_arguments(args)
    base_config = config_from_arguments(args)
    paths, digits_params = dataset_paths(base_options)
    train_set = CocoDetection(*paths["train"], build_transform(base_options.image_size, train=False))
    base_config = dataclasses.replace(base_config, num_classes=len(train_set.category_ids))
    os.makedirs(base_options.output, exist_ok=True)
    seeds = args.seeds
    results, rows = {}, []
    for seed, name in ((seed, name) for seed in seeds for name in args.arms):
        label, overrides = ARMS[name]
        print(f"== {label}, seed {seed}")
        run_dir = name if len(seeds) == 1 else os.path.join(f"seed{seed}", name)
        options = dataclasses.replace(base_options, output=os.path.join(base_options.output, run_dir), seed=seed)
        batches = InMemoryBatches(train_set, options.batch_size, options.flip_prob, options.seed,
                                  augment=options.augment)
        config = dataclasses.replace(base_config, **overrides)
        diverged = False
        try:
            result = train(config, dataclasses.replace(options, evaluate=False), batches, digits_params)
        except RuntimeError as error:  # NonFiniteLossError: the arm diverged
            print(f"{name} failed: {error}")
            result, diverged = {"history": [], "iterations": 0, "seconds": 0.0, "model": None}, True
        stats = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        if not diverged:
            from .evaluate import evaluate_model

            stats = evaluate_model(result["model"], *paths["val"], options.image_size)
        if seed == seeds[0]:
            results[name] = result
        rows.append({"arm": name, "label": label, "seed": seed, "iterations": result["iterations"],
                     "seconds": round(result["seconds"], 1), "diverged": diverged,
                     **{k: stats[k] for k in ("AP", "AP50", "AP75")},
                     "final_loss_cls": result["history"][-1]["loss_cls"] if result["history"] else None})
        print(json.dumps(rows[-1]))
    options = dataclasses.asdict(base_options)
    summary = write_report(rows, os.path.join(base_options.output, "ablation"),
                           f"{base_options.digits} digits, {base_options.image_size} px, {rows[0]['iterations']} "
                           f"iterations per arm, seeds {seeds}", {"options": options})
    print(markdown_table(summary))
    plot_loss_curves(results, os.path.join(base_options.output, "loss_curves.png"))


if __name__ == "__main__":
    main()
