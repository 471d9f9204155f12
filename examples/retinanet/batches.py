"""The batches a training run draws: one order (``torch.utils.data.DistributedSampler``'s, per epoch),
served either from memory or streamed from disk.

``BatchOrder`` is the order and the position in it. The order is ``DistributedSampler``'s
(``shuffle``, ``drop_last``, ``set_epoch``): epoch ``e`` shuffles with a generator seeded ``seed + e``
and process ``rank`` takes every ``world_size``-th image; its step-k batch is the k-th run of
``batch_size`` of those. So the union of the processes' step-k batches is the step-k batch of one
process with ``batch_size * world_size`` images, whatever the process count, and the position in the
data is two integers (``state_dict``): resuming is exact. ``flip_prob`` flips an image left-right with a
decision drawn per (epoch, image), likewise independent of the process count, and so are the draws of
``augment`` (``augment.Augmentation``), applied after the flip.

* ``InMemoryBatches`` decodes the whole letterboxed dataset once into one (N, 3, S, S) uint8 tensor
  and serves batches by indexing: no per-step decoding, no worker processes; what the built-in
  benchmark uses (6000 images of 96 px are 166 MB).
* ``StreamingBatches`` decodes each batch when needed, in ``DataLoader`` worker processes that run
  ahead of the training loop: for datasets that do not fit in memory. Same batches, same state.

``build_batches`` picks one (``--loader auto``: memory up to ``MEMORY_LIMIT_BYTES`` of decoded images).
"""

from __future__ import annotations

import weakref

import torch

from .augment import Augmentation
from .data import CocoDetection, collate, flip_target
from .errors import InputError

MEMORY_LIMIT_BYTES = 4 << 30  # --loader auto keeps a dataset in memory up to 4 GiB of decoded uint8 images
LOADER_CHOICES = ("auto", "memory", "stream")


class BatchOrder:
    """The per-process batch order described in the module docstring, and the position in it."""

    def __init__(self, dataset: CocoDetection, batch_size: int, flip_prob: float = 0.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, augment: str = "none"):
        global_batch = batch_size * world_size
        if global_batch > len(dataset):
            raise InputError(f"batch size {global_batch} is larger than the {len(dataset)} images of "
                             f"{dataset.data.path}: lower --batch-size")
        self.num_images = len(dataset)
        self.class_names = list(dataset.class_names)
        self.category_ids = list(dataset.category_ids)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.flip_prob = flip_prob
        self.seed = seed
        self.augmentation = Augmentation(augment, seed)
        self.batches_per_epoch = self.num_images // global_batch
        self.epoch, self.position = 0, 0
        self._epoch_order: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def state_dict(self) -> dict:
        """The position in the data: ``{"epoch", "position"}`` (batches already served this epoch)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def close(self) -> None:
        """Releases what serving the batches holds beyond the order (``StreamingBatches``: its worker
        processes); the next batch, if any, starts afresh from the position."""

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's indices for ``epoch`` (from the sampler) and flip decisions per dataset index (N,)."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            sampler = torch.utils.data.DistributedSampler(range(self.num_images), num_replicas=self.world_size,
                                                          rank=self.rank, shuffle=True, seed=self.seed,
                                                          drop_last=True)
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), dtype=torch.int64)
            # Flips from the same per-epoch generator, past the sampler's permutation: identical on
            # every process, a function of (seed, epoch, image).
            generator = torch.Generator().manual_seed(self.seed + epoch)
            torch.randperm(self.num_images, generator=generator)
            flips = torch.rand(self.num_images, generator=generator) < self.flip_prob
            self._epoch_order = (epoch, order, flips)
        return self._epoch_order[1], self._epoch_order[2]

    def batch_at(self, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dataset indices (B,), flip decisions (B,))`` of the batch at (epoch, position)."""
        order, flips = self.order(epoch)
        index = order[position * self.batch_size: (position + 1) * self.batch_size]
        return index, flips[index]

    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch's ``(indices, flips)``; moves the position past it."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.batch_at(self.epoch, self.position)
        self.position += 1
        return batch

    def finish(self, images: torch.Tensor, targets: list[dict], index: torch.Tensor, flip: torch.Tensor):
        """The batch of dataset ``index`` (B,) as trained on: flipped where ``flip`` (B,), then augmented."""
        images, targets = self.apply_flips(images, targets, flip)
        return self.augmentation(images, targets, index.tolist(), self.epoch)

    @staticmethod
    def apply_flips(images: torch.Tensor, targets: list[dict], flip: torch.Tensor):
        """Flip the images (B, 3, S, S) and targets where ``flip`` (B,) is true."""
        if not flip.any():
            return images, targets
        images = images.clone()
        images[flip] = images[flip].flip(-1)
        width = images.shape[-1]
        return images, [flip_target(t, width) if f else t for t, f in zip(targets, flip.tolist())]


class InMemoryBatches(BatchOrder):
    """Batches from the whole letterboxed dataset decoded once (see the module docstring)."""

    def __init__(self, dataset: CocoDetection, batch_size: int, flip_prob: float = 0.0, seed: int = 0,
                 progress: bool = False, rank: int = 0, world_size: int = 1, augment: str = "none"):
        super().__init__(dataset, batch_size, flip_prob, seed, rank, world_size, augment)  # checks before decoding
        items = range(len(dataset))
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc="loading images", leave=False)
        samples = [dataset[i] for i in items]
        self.images = torch.stack([s[0] for s in samples])
        self.targets = [s[1] for s in samples]

    def __len__(self) -> int:
        return len(self.targets)

    def next_batch(self):
        """``(images (B, 3, S, S) uint8, [targets])`` of this process; B is ``batch_size``."""
        index, flip = self.advance()
        return self.finish(self.images[index], [self.targets[i] for i in index.tolist()], index, flip)


class _IndexStream(torch.utils.data.Sampler):
    """The batch sampler of the streaming loader: the index lists of ``order`` from (epoch, position)
    on, for ever (the loader's workers run ahead of the training loop).

    It holds ``order`` weakly. ``order`` owns the loader's iterator, which owns this sampler: a strong
    reference would close a cycle that only the garbage collector frees, and then at a moment of its
    choosing and in an order in which each DataLoader worker takes 5 s to stop. Without the cycle, the
    workers stop as soon as the batches are dropped."""

    def __init__(self, order: BatchOrder, epoch: int, position: int):
        self.order, self.epoch, self.position = weakref.proxy(order), epoch, position

    def __iter__(self):
        epoch, position = self.epoch, self.position
        while True:
            if position >= self.order.batches_per_epoch:
                epoch, position = epoch + 1, 0
            yield self.order.batch_at(epoch, position)[0].tolist()
            position += 1


class StreamingBatches(BatchOrder):
    """The batches of :class:`InMemoryBatches`, decoded on demand by ``workers`` DataLoader processes."""

    def __init__(self, dataset: CocoDetection, batch_size: int, flip_prob: float = 0.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int = 2, augment: str = "none"):
        super().__init__(dataset, batch_size, flip_prob, seed, rank, world_size, augment)
        self.dataset, self.workers = dataset, workers
        self._batches = None

    def __len__(self) -> int:
        return self.num_images

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.close()  # the loader has run ahead from the old position

    def close(self) -> None:
        self._batches = None  # the loader's iterator, the last reference to it: its workers stop now

    def next_batch(self):
        """``(images (B, 3, S, S) uint8, [targets])`` of this process; B is ``batch_size``."""
        if self._batches is None:
            start = (self.epoch, self.position)
            if self.position >= self.batches_per_epoch:
                start = (self.epoch + 1, 0)
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=_IndexStream(self, *start),
                                                 num_workers=self.workers, collate_fn=collate,
                                                 persistent_workers=self.workers > 0)
            self._batches = iter(loader)
        index, flip = self.advance()
        images, targets = next(self._batches)
        assert [t["image_id"] for t in targets] == [self.dataset.image_ids[i] for i in index.tolist()]
        return self.finish(images, targets, index, flip)


def build_batches(dataset: CocoDetection, batch_size: int, flip_prob: float, seed: int, loader: str,
                  image_size: int, workers: int = 2, progress: bool = False, rank: int = 0,
                  world_size: int = 1, augment: str = "none") -> BatchOrder:
    """``InMemoryBatches`` or ``StreamingBatches`` for ``--loader`` (``auto``: in memory when the
    decoded images take at most ``MEMORY_LIMIT_BYTES``)."""
    if loader not in LOADER_CHOICES:
        raise InputError(f"--loader must be one of {LOADER_CHOICES}, got {loader!r}")
    if loader == "auto":
        loader = "memory" if len(dataset) * 3 * image_size**2 <= MEMORY_LIMIT_BYTES else "stream"
    if loader == "memory":
        return InMemoryBatches(dataset, batch_size, flip_prob, seed, progress, rank, world_size, augment)
    return StreamingBatches(dataset, batch_size, flip_prob, seed, rank, world_size, workers, augment)
