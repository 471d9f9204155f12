"""Training options: the ``TrainOptions`` dataclass, their checks, the defaults that depend on the data,
and the command-line flags (one per field).

Every value is checked when a ``TrainOptions`` is built, so a flag that cannot mean what was asked
(``--minutes 0``, ``--batch-size 0``, ...) ends the command before any data is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from .augment import AUGMENT_CHOICES
from .batches import LOADER_CHOICES
from .errors import InputError
from .precision import AMP_CHOICES
from .trees import DEFAULT_ROOT as TREES_ROOT, TILE as TREES_TILE

NONFINITE_CHOICES = ("stop", "skip")  # --nonfinite: what a NaN or infinite loss does
DEVICE_CHOICES = ("auto", "cpu", "cuda")


# The built-in digits variant (``digits.VARIANTS``) a model preset trains on when ``--digits`` is not
# given; presets not listed use "default". This is what lets ``--preset imbalance`` alone select the
# model and its data, while the fast and paper presets keep the default data as before.
PRESET_DIGITS = {"imbalance": "imbalance"}

# The data a preset trains on when no data flag is given, its image size and augmentation: ``--preset
# trees`` alone trains on the tree crowns (``trees.py``, converted on first use) in 400-px tiles.
PRESET_DATA = {"trees": {"data": TREES_ROOT, "image_size": TREES_TILE, "augment": "aerial"}}

# The batch and learning rate of a preset's model, when --batch-size and --lr are not given (the
# command line's defaults; TrainOptions keeps 16 and 0.04). Trees: a 400-px tile has 17x the pixels of
# a digits canvas, so 4 tiles a step at the same learning rate per image (0.04 / 16) take 4x the steps
# of 16 in the same minutes, with still 4x the pixels of a digits step.
PRESET_TRAINING = {"trees": {"batch_size": 4, "lr": 0.01}}


@dataclass
class TrainOptions:
    output: str = "runs/retinanet/default"
    data_root: str | None = None  # built-in digits folder; None: data/digits, data/digits-VARIANT for others
    digits: str | None = None  # built-in digits variant; None: the preset's (PRESET_DIGITS) or "default"
    data: str | None = None  # a COCO-format folder (see coco.dataset_layout); or the three below
    image_root: str | None = None
    train_json: str | None = None
    val_json: str | None = None
    num_train_images: int | None = None  # digits dataset size override
    image_size: int | None = None  # None: the digits variant's canvas (96 px default), 96 with --train-json
    batch_size: int = 16
    lr: float = 0.04
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 300
    warmup_max_fraction: float = 0.1  # short runs: warm-up ends by this fraction of the run at the latest
    warmup_factor: float = 0.001
    lr_steps: tuple[float, ...] = (2 / 3, 8 / 9)  # fractions of the run
    lr_gamma: float = 0.1
    minutes: float | None = 12.0
    iters: int | None = None  # overrides --minutes
    resume: str | None = None  # a checkpoint to continue from, or "auto": the latest in --output
    clip_grad: float | None = None  # max global gradient norm; None: no clipping
    sync_bn: bool = False  # several CUDA processes: BatchNorm statistics over the global batch
    amp: str = "none"  # mixed precision: "none", "bf16" (CPU or CUDA), "fp16" (CUDA, with a gradient scaler)
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda"
    nonfinite: str = "stop"  # a NaN/inf loss: "stop" (error naming the loss and iteration) or "skip" the batch
    loader: str = "auto"  # "memory" (decode all images once), "stream" (DataLoader workers), "auto"
    workers: int = 2  # DataLoader worker processes of --loader stream
    flip_prob: float = 0.0
    # augment.AUGMENT_CHOICES; None: the preset's (PRESET_DATA), "digits" on the default built-in digits,
    # else "none"
    augment: str | None = None
    seed: int = 0
    threads: int = 2
    log_every: int = 20
    checkpoint_every: int = 500
    evaluate: bool = True
    eval_every: int = 0  # also evaluate every N iterations (AP over the run); 0: only at the end
    tensorboard: bool = True  # a TensorBoard log in OUTPUT/tensorboard when the package is installed
    progress: bool = True

    def __post_init__(self) -> None:
        check_options(self)


def check_options(options: TrainOptions) -> None:
    """An :class:`InputError` for any value that cannot mean what was asked, before any work starts
    (``--minutes 0`` used to mean "not set", ``--minutes -1`` never stopped, ``--batch-size 0`` failed
    deep inside the head)."""
    def need(condition: bool, flag: str, rule: str, value) -> None:
        if not condition:
            raise InputError(f"--{flag} must be {rule}, got {value}")

    o = options
    need(o.batch_size >= 1, "batch-size", "at least 1", o.batch_size)
    need(math.isfinite(o.lr) and o.lr > 0, "lr", "a positive number", o.lr)
    need(0 <= o.momentum < 1, "momentum", "within [0, 1)", o.momentum)
    need(o.weight_decay >= 0, "weight-decay", "0 or more", o.weight_decay)
    need(o.warmup_iters >= 0, "warmup-iters", "0 or more", o.warmup_iters)
    need(0 <= o.warmup_max_fraction <= 1, "warmup-max-fraction", "within [0, 1]", o.warmup_max_fraction)
    need(0 < o.warmup_factor <= 1, "warmup-factor", "within (0, 1]", o.warmup_factor)
    need(all(0 < step < 1 for step in o.lr_steps), "lr-steps", "fractions of the run within (0, 1)",
         list(o.lr_steps))
    need(o.lr_gamma > 0, "lr-gamma", "positive", o.lr_gamma)
    need(o.minutes is None or (math.isfinite(o.minutes) and o.minutes > 0), "minutes", "a positive number",
         o.minutes)
    need(o.iters is None or o.iters >= 1, "iters", "at least 1", o.iters)
    need(o.clip_grad is None or (math.isfinite(o.clip_grad) and o.clip_grad > 0), "clip-grad",
         "a positive gradient norm", o.clip_grad)
    need(0 <= o.flip_prob <= 1, "flip-prob", "within [0, 1]", o.flip_prob)
    need(o.threads >= 1, "threads", "at least 1", o.threads)
    need(o.log_every >= 1, "log-every", "at least 1", o.log_every)
    need(o.checkpoint_every >= 0, "checkpoint-every", "0 (off) or more", o.checkpoint_every)
    need(o.eval_every >= 0, "eval-every", "0 (off) or more", o.eval_every)
    need(o.loader in LOADER_CHOICES, "loader", f"one of {LOADER_CHOICES}", o.loader)
    need(o.workers >= 0, "workers", "0 or more", o.workers)
    need(o.image_size is None or o.image_size >= 32, "image-size", "at least 32 pixels", o.image_size)
    need(o.num_train_images is None or o.num_train_images >= 1, "num-train-images", "at least 1",
         o.num_train_images)
    need(o.augment is None or o.augment in AUGMENT_CHOICES, "augment", f"one of {AUGMENT_CHOICES}", o.augment)
    need(o.nonfinite in NONFINITE_CHOICES, "nonfinite", f"one of {NONFINITE_CHOICES}", o.nonfinite)
    need(o.amp in AMP_CHOICES, "amp", f"one of {AMP_CHOICES}", o.amp)
    need(o.device in DEVICE_CHOICES, "device", f"one of {DEVICE_CHOICES}", o.device)


def resolve_options(options: TrainOptions, preset: str | None = None) -> TrainOptions:
    """Fill the fields left at None that depend on the data: ``data``, ``image_size`` and ``augment``
    from the ``preset``'s ``PRESET_DATA`` when no data flag is given; ``digits`` (the preset's variant
    from ``PRESET_DIGITS``, else "default"), ``data_root`` (one folder per variant, so that switching
    variants never regenerates another variant's files), ``image_size`` (the variant's canvas, 96 for
    other data) and ``augment`` ("digits" on the default digits variant, "none" on other data).
    Idempotent."""
    from .digits import default_root, variant_params

    preset_data = {} if options.train_json or options.data else PRESET_DATA.get(preset, {})
    data = options.data or preset_data.get("data")
    digits = options.digits or PRESET_DIGITS.get(preset, "default")
    params = variant_params(digits)
    builtin = not (options.train_json or data)
    image_size = options.image_size or preset_data.get("image_size") or (params.image_size if builtin else 96)
    augment = options.augment or preset_data.get("augment") or (
        "digits" if builtin and digits == "default" else "none")
    return dataclasses.replace(options, data=data, digits=digits, data_root=options.data_root or default_root(digits),
                               image_size=image_size, augment=augment)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name in ("batch_size", "lr"):  # None: the preset's (PRESET_TRAINING), else f.default
            group.add_argument(flag, type=type(f.default), default=None,
                               help=f"{f.default}; " + ", ".join(f"{v[f.name]} with --preset {k}"
                                                                 for k, v in PRESET_TRAINING.items()))
        elif isinstance(f.default, tuple):
            group.add_argument(flag, type=float, nargs="+", default=f.default)
        elif f.default is None:
            kind = {"iters": int, "minutes": float, "clip_grad": float, "num_train_images": int,
                    "image_size": int}.get(f.name, str)
            group.add_argument(flag, type=kind, default=None, choices=train_choices().get(f.name))
        else:
            group.add_argument(flag, type=type(f.default), default=f.default,
                               choices=train_choices().get(f.name))


def train_choices() -> dict:
    from .digits import VARIANTS

    return {"digits": sorted(VARIANTS), "nonfinite": NONFINITE_CHOICES, "amp": AMP_CHOICES,
            "augment": AUGMENT_CHOICES, "device": DEVICE_CHOICES,
            "loader": LOADER_CHOICES}


def options_from_arguments(args: argparse.Namespace) -> TrainOptions:
    """The parsed flags as :class:`TrainOptions`, data-dependent defaults resolved for ``--preset``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)}
    values["lr_steps"] = tuple(values["lr_steps"])
    preset = getattr(args, "preset", None)
    for f in dataclasses.fields(TrainOptions):
        if f.name in ("batch_size", "lr") and values[f.name] is None:
            values[f.name] = PRESET_TRAINING.get(preset, {}).get(f.name, f.default)
    return resolve_options(TrainOptions(**values), preset)
