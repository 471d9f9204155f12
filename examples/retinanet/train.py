"""Train RetinaNet, then evaluate it with COCO AP.

    python -m examples.retinanet.train                      # digits benchmark, fast preset, 12 minutes
    python -m examples.retinanet.train --minutes 2          # a short demo run
    python -m examples.retinanet.train --preset imbalance   # 256-px digits variant, ~1:1,240 imbalance
    python -m examples.retinanet.train --preset trees       # tree crowns in aerial photographs (trees.py)
    python -m examples.retinanet.train --preset paper --image-size 640 --train-json ... --val-json ...
    python -m examples.retinanet.train --data DIR --amp bf16 --eval-every 1000  # any COCO-format folder
    python -m examples.retinanet.train --output runs/x --resume auto            # continue an interrupted run
    torchrun --nproc_per_node 8 -m examples.retinanet.train --data DIR --batch-size 64   # DDP, one machine

SGD with momentum 0.9 and weight decay 1e-4, linear warm-up, and the paper's step schedule (x0.1 at
2/3 and at 8/9 of training: 60k and 80k of 90k iterations) scaled to the run. The run length is either
``--iters`` or a wall-clock budget ``--minutes``; with a budget the schedule is a function of elapsed
time, so the learning-rate drops land at the same fraction of the run however fast the machine is.

Writes to ``--output`` (rank 0 only): ``log.jsonl`` (losses and learning rate),
``training_curves.png`` (losses, learning rate, AP per evaluation), ``summary.md`` (the final table),
``tensorboard/`` (when the package is installed), ``model_final.pth`` (plus
``model_last.pth`` every ``--checkpoint-every`` iterations, removed at the end), ``metrics.json`` (COCO
stats). Checkpoints hold everything needed to continue exactly: ``--resume PATH`` or ``--resume auto``
(the latest checkpoint in ``--output``, a new run when there is none).
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: the OpenMP runtime reads its settings once (see entry)
    from .entry import configure_process

    configure_process()

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from . import distributed
from .checkpoint import FINAL, LATEST, find_resume, load_training_checkpoint, rng_state, save_atomic, set_rng_state
from .coco import dataset_layout
from .config import RetinaNetConfig, add_config_arguments, build_model, config_from_arguments
from .batches import BatchOrder, build_batches
from .data import CocoDetection, build_transform
from .errors import InputError, report_input_errors
from .evaluate import check_classes, evaluate_dataset
from .options import TrainOptions, add_train_arguments, options_from_arguments, resolve_options
from .plots import CURVES_FILE, SUMMARY_FILE, plot_training_curves, summary_table
from .precision import autocast, check_amp, grad_scaler
from .tensorboard_log import TensorBoardLog


def training_device(options: TrainOptions) -> torch.device:
    """The device to train on; an :class:`InputError` for ``--device cuda`` without a GPU, or for a
    precision the device cannot train in."""
    if options.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    use_cuda = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    check_amp(options.amp, device)
    return device


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or infinite loss (with ``--nonfinite stop``); the message names it."""


def lr_factor(progress: float, iteration: int, options: TrainOptions) -> float:
    """Warm-up (linear from ``warmup_factor`` to 1 over ``warmup_iters``, cut short at
    ``warmup_max_fraction`` of the run) times the step decay at the fractions ``lr_steps`` of the run
    (``progress`` in [0, 1])."""
    factor = options.lr_gamma ** sum(progress >= step for step in options.lr_steps)
    if iteration < options.warmup_iters and progress < options.warmup_max_fraction:
        alpha = max(iteration / options.warmup_iters, progress / options.warmup_max_fraction)
        factor *= options.warmup_factor * (1 - alpha) + alpha
    return factor


def dataset_paths(options: TrainOptions) -> tuple[dict, dict | None]:
    """``({"train": (image root, json), "val": (image root, json) or None}, digits params or None)``:
    ``--data`` (``data/trees`` converted first if needed), else ``--train-json`` (images under
    ``--image-root``, default the json's folder), else
    the built-in digits (generated on first use)."""
    if options.data:
        if options.train_json or options.val_json:
            raise InputError("--data and --train-json/--val-json both name the data: pass one or the other")
        from . import trees

        if os.path.normpath(options.data) == os.path.normpath(trees.DEFAULT_ROOT):  # --preset trees' folder
            trees.ensure_trees_dataset(options.data)  # converted on first use, as the digits are generated
        return dataset_layout(options.data), None
    if options.train_json:
        root = options.image_root or os.path.dirname(options.train_json)
        return {"train": (root, options.train_json), "val": (root, options.val_json)}, None
    from .digits import ensure_digits_dataset, variant_params

    options = resolve_options(options)
    params = variant_params(options.digits)
    if options.num_train_images:
        params = dataclasses.replace(params, num_train=options.num_train_images)
    return ensure_digits_dataset(options.data_root, params), dataclasses.asdict(params)


def training_state(model, optimizer, config: RetinaNetConfig, options: TrainOptions, iteration: int,
                   elapsed: float, batches: BatchOrder, history: list[dict], evaluations: list[dict],
                   running: dict, digits_params: dict | None, rng_states: list[dict], scaler=None) -> dict:
    """Everything a run needs to continue exactly where it stopped, as tensors and plain containers
    (see ``checkpoint``): model, optimizer (momentum buffers), gradient scaler, the schedule's position
    (iteration and elapsed seconds: the learning rate is a function of those), the data position,
    every process's RNG states, the log so far, and the config and options as dicts."""
    return {"config": config.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "schedule": {"iteration": iteration, "elapsed_seconds": elapsed},
            "data": batches.state_dict(), "rng": rng_states, "world_size": len(rng_states),
            "history": history, "evaluations": evaluations, "running": running, "iteration": iteration,
            "image_size": options.image_size, "options": dataclasses.asdict(options),
            "digits_params": digits_params, "class_names": batches.class_names,
            "category_ids": batches.category_ids}


def check_resumable(checkpoint: dict, path: str, batches: BatchOrder, world_size: int) -> None:
    """An :class:`InputError` when ``checkpoint`` cannot continue this run exactly: not a training
    checkpoint (no optimizer state), another dataset's classes, another global batch or process count."""
    if "optimizer" not in checkpoint or "data" not in checkpoint:
        raise InputError(f"{path} holds weights only (no optimizer or data position): it cannot be resumed")
    if list(checkpoint.get("category_ids") or []) != list(batches.category_ids):
        raise InputError(f"{path} was trained on category ids {list(checkpoint.get('category_ids') or [])[:10]}, "
                         f"this dataset has {batches.category_ids[:10]}: resume on the same data")
    if checkpoint.get("world_size", 1) != world_size:
        raise InputError(f"{path} was written by {checkpoint.get('world_size', 1)} processes, this run has "
                         f"{world_size}: resume with the same process count (the data order and RNG states "
                         f"are per process)")
    batch = (checkpoint.get("options") or {}).get("batch_size")
    if batch is not None and batch != batches.batch_size * batches.world_size:
        raise InputError(f"{path} was trained with --batch-size {batch}, this run has "
                         f"{batches.batch_size * batches.world_size}: resume with the same batch size")


def finish_ddp_step(losses: dict) -> None:
    """Run a backward pass whose gradients are discarded, so that DistributedDataParallel, which
    expects one after each forward, completes its gradient reduction before the skipped batch is
    dropped (the next ``zero_grad`` clears them; no optimizer step is taken)."""
    torch.stack([torch.nan_to_num(v.float(), 0.0, 0.0, 0.0) for v in losses.values()]).sum().mul(0).backward()


def check_finite(losses: dict, iteration: int) -> str | None:
    """None when every loss is finite, else a one-line description of the first one that is not."""
    for name, value in losses.items():
        if not torch.isfinite(value.detach()).all():
            return f"{name} is {float(value.detach())} at iteration {iteration}"
    return None


def clipped_step(optimizer: torch.optim.Optimizer, params: list, clip_grad: float | None,
                 scaler: torch.amp.GradScaler | None = None) -> torch.Tensor | None:
    """Clip the global gradient norm of ``params`` to ``clip_grad`` (if set), then step. Returns the
    norm before clipping (None without clipping). With a float16 ``scaler`` the gradients are unscaled
    first, so that the clipping threshold is in true gradient units."""
    if scaler is not None and clip_grad:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, clip_grad) if clip_grad else None
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    return norm


def load_datasets(options: TrainOptions):
    """``(paths, digits_params, train_set, val_set or None)``, every file checked (json, image headers),
    none decoded yet: a bad file is reported before any long work. ``val_set`` must have the train
    set's categories."""
    paths, digits_params = dataset_paths(options)
    train_set = CocoDetection(*paths["train"], build_transform(options.image_size, train=False))
    val_set = None
    if options.evaluate and paths.get("val") and paths["val"][1]:
        val_set = CocoDetection(*paths["val"], build_transform(options.image_size, train=False))
        check_classes(len(train_set.category_ids), train_set.category_ids, val_set,
                      f"training set {paths['train'][1]}")
    return paths, digits_params, train_set, val_set


def train(config: RetinaNetConfig, options: TrainOptions, batches: BatchOrder | None = None,
          digits_params: dict | None = None) -> dict:
    """Train one model; returns ``{"model", "history", "iterations", "seconds", "stats", "skipped"}``.

    ``batches`` can be passed in so several runs (``ablate``) share one decoded dataset. Inside a
    ``torchrun`` process group (``distributed.process_group``) every process trains on its share of
    each global batch of ``options.batch_size`` images; only rank 0 logs and writes files, and only
    its ``stats`` are set.
    """
    options = resolve_options(options)
    ctx = distributed.context()
    if options.batch_size % ctx.world_size:
        raise InputError(f"--batch-size {options.batch_size} is the global batch: it must be a multiple of "
                         f"the {ctx.world_size} processes")
    device = training_device(options)
    torch.manual_seed(options.seed)
    torch.set_num_threads(options.threads)
    os.makedirs(options.output, exist_ok=True)
    # Rank 0 writes the checkpoints, so rank 0 chooses the one to resume from, for every process.
    resume_path = distributed.rank0_object(find_resume(options.output, options.resume) if ctx.is_main else None)
    resumed = load_training_checkpoint(resume_path) if resume_path else None
    paths, val_set = None, None
    if batches is None or options.evaluate:
        paths, digits_params, train_set, val_set = load_datasets(options)
    owns_batches = batches is None
    if owns_batches:
        config = dataclasses.replace(config, num_classes=len(train_set.category_ids))
        batches = build_batches(train_set, options.batch_size // ctx.world_size, options.flip_prob, options.seed,
                                options.loader, options.image_size, options.workers,
                                progress=options.progress and ctx.is_main, rank=ctx.rank,
                                world_size=ctx.world_size, augment=options.augment)
    if resumed is not None:
        # The model is the checkpoint's; the run length and the rest come from this command.
        config = RetinaNetConfig.from_dict({**resumed["config"], "weights": None})
        check_resumable(resumed, resume_path, batches, world_size=ctx.world_size)
    elif options.resume == "auto" and ctx.is_main:
        print(f"no checkpoint in {options.output} yet: starting a new run")
    model = build_model(config).to(device)
    model.train()
    scaler = grad_scaler(options.amp, device)
    forward = distributed.wrap(model, options.sync_bn, device)  # the DDP module, or the model itself
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=options.lr, momentum=options.momentum,
                                weight_decay=options.weight_decay)
    budget = None if options.iters is not None else (options.minutes or 12.0) * 60.0
    total = options.iters
    history: list[dict] = []
    evaluations: list[dict] = []  # {"iter", "AP", "AP50", ...} per evaluation (rank 0)
    iteration, elapsed_before, running, running_steps, skipped = 0, 0.0, {}, 0, 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        batches.load_state_dict(resumed["data"])
        set_rng_state(resumed["rng"][ctx.rank])
        iteration = resumed["schedule"]["iteration"]
        elapsed_before = resumed["schedule"]["elapsed_seconds"]
        history, running = list(resumed["history"]), dict(resumed["running"])
        evaluations = list(resumed.get("evaluations") or [])
        running_steps, skipped = resumed["running_steps"], resumed["skipped"]
        if ctx.is_main:
            print(f"resumed from {resume_path} at iteration {iteration}")
    log_file = None
    if ctx.is_main:
        log_file = open(os.path.join(options.output, "log.jsonl"), "w")  # rewritten from the checkpoint's
        for record in history:                                             # log: no records past it survive
            log_file.write(json.dumps(record) + "\n")
    board = TensorBoardLog(options.output, enabled=options.tensorboard and ctx.is_main)
    bar = None
    if options.progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total if total else int(budget), unit="it" if total else "s",
                   desc="training", dynamic_ncols=True, initial=iteration if total else int(elapsed_before))
    start = time.perf_counter() - elapsed_before
    progress = iteration / total if total else elapsed_before / budget
    while progress < 1.0:
        factor = lr_factor(progress, iteration, options)
        for group in optimizer.param_groups:
            group["lr"] = options.lr * factor
        images, targets = batches.next_batch()
        with autocast(options.amp, device):
            losses = forward(images, targets)
        problem = check_finite(losses, iteration + 1)
        if distributed.any_true(problem is not None, device):  # every process skips or stops together
            problem = problem or f"a loss of another process is not finite at iteration {iteration + 1}"
            if ctx.world_size > 1:
                finish_ddp_step(losses)
            if options.nonfinite == "stop":
                if log_file is not None:
                    log_file.close()
                raise NonFiniteLossError(f"{problem}{f' (rank {ctx.rank})' if ctx.world_size > 1 else ''} "
                                         f"(a diverging run: lower --lr, set --clip-grad, or --nonfinite skip "
                                         f"to drop such batches)")
            skipped += 1  # the batch is dropped; the iteration still counts towards the schedule
            if ctx.is_main:
                print(f"warning: {problem}; batch skipped ({skipped} so far)")
        else:
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            clipped_step(optimizer, params, options.clip_grad, scaler)
            for name, value in losses.items():
                running[name] = running.get(name, 0.0) + value.detach()
            running_steps += 1
        iteration += 1
        elapsed = time.perf_counter() - start
        if budget is not None:
            elapsed = distributed.rank0_value(elapsed)
        new_progress = iteration / total if total else elapsed / budget
        if (iteration % options.log_every == 0 or new_progress >= 1.0) and running_steps:
            averaged = distributed.mean_over_processes(running)
            record = {name: float(value) / running_steps for name, value in averaged.items()}
            running, running_steps = {}, 0
            record.update(iter=iteration, seconds=round(elapsed, 2), lr=options.lr * factor)
            record["loss"] = record["loss_cls"] + record["loss_box"]
            history.append(record)
            board.scalars(record, iteration, "train")
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}", cls=f"{record['loss_cls']:.3f}",
                                box=f"{record['loss_box']:.3f}", lr=f"{record['lr']:.4f}",
                                it=iteration, refresh=False)
        if bar is not None:
            bar.update(1 if total else max(0, int(elapsed) - bar.n))
        progress = new_progress
        if val_set is not None and options.eval_every and iteration % options.eval_every == 0 and progress < 1.0:
            stats = evaluate_dataset(model, val_set)  # every process predicts its share
            model.train()
            if ctx.is_main:
                evaluations.append({"iter": iteration, **stats})
                board.scalars(stats, iteration, "val")
                plot_training_curves(history, evaluations, os.path.join(options.output, CURVES_FILE))
        if options.checkpoint_every and iteration % options.checkpoint_every == 0 and progress < 1.0:
            rng_states = distributed.all_gather(rng_state())  # a collective: every process takes part
            if ctx.is_main:
                state = training_state(model, optimizer, config, options, iteration, elapsed, batches, history,
                                       evaluations, running, digits_params, rng_states, scaler)
                save_atomic({**state, "running_steps": running_steps, "skipped": skipped},
                            os.path.join(options.output, LATEST))
                plot_training_curves(history, evaluations, os.path.join(options.output, CURVES_FILE))
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if owns_batches:
        # Now, not when this frame is freed: plotting can leave it in a reference cycle (a caught
        # exception's traceback), which would keep a streaming loader's workers until a garbage
        # collection, and that collection would wait 5 s for each of them.
        batches.close()
    rng_states = distributed.all_gather(rng_state())
    if ctx.is_main:
        log_file.close()
        state = training_state(model, optimizer, config, options, iteration, seconds, batches, history,
                               evaluations, running, digits_params, rng_states, scaler)
        save_atomic({**state, "running_steps": running_steps, "skipped": skipped},
                    os.path.join(options.output, FINAL))
        if os.path.exists(os.path.join(options.output, LATEST)):  # older than FINAL: --resume auto must not
            os.remove(os.path.join(options.output, LATEST))       # pick it
    result = {"model": model, "history": history, "iterations": iteration, "seconds": seconds,
              "stats": None, "skipped": skipped}
    summary = {"iterations": iteration, "skipped_batches": skipped, "world_size": ctx.world_size,
               "train_seconds": round(seconds, 1),
               "images_per_second": round(iteration * options.batch_size / seconds, 1),
               # other processes on the machine slow a wall-clock-budgeted run down: record them
               "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()]}
    if history:
        summary.update({f"final_{k}": round(history[-1][k], 4) for k in ("loss", "loss_cls", "loss_box")})
    if val_set is not None:
        stats = evaluate_dataset(model, val_set, verbose=options.progress and ctx.is_main,
                                 progress=options.progress)
        result["stats"] = stats
        summary.update(stats or {})
        if ctx.is_main:
            evaluations.append({"iter": iteration, **stats})
            board.scalars(stats, iteration, "val")
    result["evaluations"] = evaluations
    board.close()
    if ctx.is_main:
        plot_training_curves(history, evaluations, os.path.join(options.output, CURVES_FILE))
        table = summary_table(summary)
        with open(os.path.join(options.output, SUMMARY_FILE), "w") as f:
            f.write(table + "\n")
        print(table)
        with open(os.path.join(options.output, "metrics.json"), "w") as f:
            json.dump({"summary": summary, "config": config.to_dict(), "options": dataclasses.asdict(options),
                       "world_size": ctx.world_size}, f, indent=1)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train RetinaNet with focal's sigmoid focal loss",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(parser)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    with report_input_errors(parser.prog):
        try:
            config = config_from_arguments(args)
        except ValueError as error:  # the model config's own checks
            raise InputError(str(error)) from None
        options = options_from_arguments(args)
        if options.minutes is None and options.iters is None:
            options.minutes = 12.0
        with distributed.process_group(options.device):
            try:
                train(config, options)
            except NonFiniteLossError as error:  # a diverged run: one line, not a traceback
                print(f"{parser.prog}: error: {error}", file=sys.stderr)
                raise SystemExit(1) from None


if __name__ == "__main__":
    main()
