"""Multi-process training with ``torchrun``: the process group, and the few collective operations the
trainer needs.

``torchrun`` starts one process per device and tells each its ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` (and the rendezvous address) through the environment. :func:`process_group` joins the
group with NCCL when training on CUDA and gloo on the CPU, and pins each process to its GPU. Outside
``torchrun`` (no ``WORLD_SIZE``, or 1) nothing is initialised and every helper below is the
single-process identity, so the same training code runs both ways.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError


@dataclass(frozen=True)
class Context:
    """This process's place in the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, draws the progress bar, and writes checkpoints and other files."""
        return self.rank == 0


def context() -> Context:
    """The current process group's :class:`Context` (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def process_group(device: str = "auto", timeout: datetime.timedelta | None = None):
    """Join the ``torchrun`` process group for the duration of the block (NCCL on CUDA, gloo on the
    CPU; ``device`` as train's ``--device``), then leave it. A no-op in a single process. ``timeout``
    bounds every collective (PyTorch's default when None): a test sets a short one, so that a
    disagreement between processes fails rather than hangs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield context()
        return
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                             f"--nproc_per_node must not exceed the GPUs of a machine")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    try:
        yield context()
    finally:
        dist.destroy_process_group()


def global_normalizer(count: torch.Tensor) -> torch.Tensor:
    """The focal loss's normaliser under data parallelism: the positive anchors of *all* processes
    (at least 1), divided by the process count.

    Each process divides its summed loss by this, and DDP averages the gradients over the W
    processes, so the step is that of the summed loss of the global batch divided by its global
    positive count: the single-process step, as in the paper's multi-GPU training. Dividing by a
    per-process count instead would weight a process with few positives more.
    """
    total = count.detach().clone()
    dist.all_reduce(total)
    return total.clamp(min=1) / dist.get_world_size()


def any_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any process (every process gets the same answer)."""
    if context().world_size == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_gather(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (any picklable object)."""
    if context().world_size == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap(model: torch.nn.Module, sync_batchnorm: bool, device: torch.device) -> torch.nn.Module:
    """``model`` as a ``DistributedDataParallel`` module when there are several processes, with
    BatchNorm layers made SyncBatchNorm if asked (CUDA only: PyTorch implements it only there)."""
    ctx = context()
    if ctx.world_size == 1:
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise InputError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm runs only there); on the CPU "
                             "use --backbone-norm gn, which does not depend on the batch")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.normalizer_fn = global_normalizer
    # Pyramid levels left out of ``levels`` still have their FPN output convs, which get no gradient.
    unused = not {3, 4, 5} <= set(model.config.levels)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)


def mean_over_processes(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each 0-dim tensor of ``values`` averaged over the processes: the logged losses are then those
    of the global batch (each process's loss is its share, normalised by the global positive count
    times the process count)."""
    if context().world_size == 1 or not values:
        return values
    names = sorted(values)
    stacked = torch.stack([values[name].detach().float() for name in names])
    dist.all_reduce(stacked)
    return dict(zip(names, stacked / dist.get_world_size()))


def rank0_value(value: float) -> float:
    """Rank 0's ``value`` on every process: a wall-clock budget must end on the same iteration everywhere,
    or the processes would wait on each other's collectives for ever."""
    if context().world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def rank0_object(obj):
    """Rank 0's ``obj`` on every process (any picklable object): decisions such as which checkpoint to
    resume from are rank 0's, so that no process can see the file system in another state."""
    if context().world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
