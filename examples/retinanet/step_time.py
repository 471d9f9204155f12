"""Training-step time with focal's fused op vs torchvision's (and the pure-PyTorch reference) loss.

    python -m examples.retinanet.step_time

Two measurements, each the median over interleaved repeats (so a background load spike hits every
implementation alike):

1. a full training step (forward, losses, backward, SGD) of the default model on digits batches;
2. the classification loss alone (forward + backward) at the default model's shape and at a
   paper-scale shape (one 800x1333 image: ~120k anchors x 80 classes).
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: the OpenMP runtime reads its settings once (see entry)
    from .entry import configure_process

    configure_process()

import argparse
import statistics
import time

import torch

from .config import add_config_arguments, build_model, config_from_arguments
from .loss import BACKGROUND, IGNORE_INDEX, classification_loss

IMPLS = ("focal", "torchvision", "reference")


def time_call(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def interleaved_medians(fns: dict, rounds: int, repeats: int) -> dict:
    for fn in fns.values():  # warm-up
        fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_call(fn, repeats))
    return {name: statistics.median(values) for name, values in samples.items()}


def synthetic_loss_inputs(batch: int, anchors: int, classes: int, positive_fraction: float = 0.001, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, anchors, classes, generator=g) - 4.0
    u = torch.rand(batch, anchors, generator=g)
    ids = torch.randint(0, classes, (batch, anchors), generator=g)
    targets = torch.where(u < positive_fraction, ids, torch.full_like(ids, BACKGROUND))
    targets = torch.where((u > 0.9) & (u < 0.93), torch.full_like(ids, IGNORE_INDEX), targets)
    return logits, targets


def loss_step(impl: str, logits: torch.Tensor, targets: torch.Tensor):
    normalizer = (targets >= 0).sum().clamp(min=1).float()

    def step():
        x = logits.detach().requires_grad_(True)
        classification_loss(x, targets, normalizer, 0.25, 2.0, impl).backward()

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--data-root", default="data/digits")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from .batches import InMemoryBatches
    from .data import CocoDetection, build_transform
    from .digits import ensure_digits_dataset

    image_root, annotation_file = ensure_digits_dataset(args.data_root)["val"]
    batches = InMemoryBatches(CocoDetection(image_root, annotation_file, build_transform(args.image_size, False)),
                              args.batch_size)
    images, targets = batches.next_batch()
    config = config_from_arguments(args)

    def train_step_fn(impl):
        torch.manual_seed(0)
        model = build_model(config.__class__(**{**config.to_dict(), "loss_impl": impl})).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            losses = model(images, targets)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()

        return step

    rows = []
    steps = interleaved_medians({impl: train_step_fn(impl) for impl in args.impls}, args.rounds, args.repeats)
    rows.append((f"training step, default model, batch {args.batch_size} x {args.image_size} px", steps))
    model = build_model(config)
    num_anchors = sum(a.shape[0] for a in model.anchor_generator(
        [(args.image_size // s, args.image_size // s) for s in model.backbone.strides]))
    shapes = [(args.batch_size, num_anchors, config.num_classes, 10), (1, 120_000, 80, 2)]
    for batch, anchors, classes, repeats in shapes:
        logits, ids = synthetic_loss_inputs(batch, anchors, classes)
        fns = {impl: loss_step(impl, logits, ids) for impl in args.impls}
        rows.append((f"loss fwd+bwd, ({batch}, {anchors}, {classes})", interleaved_medians(fns, args.rounds, repeats)))
    header = "| measurement | " + " | ".join(args.impls) + " |"
    lines = [header, "| --- |" + " ---: |" * len(args.impls)]
    for name, medians in rows:
        base = medians[args.impls[0]]
        cells = [f"{medians[i] * 1000:.1f} ms" + ("" if i == args.impls[0] else f" ({medians[i] / base:.2f}x)")
                 for i in args.impls]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
