"""Inputs, tolerances and the summation order of the CUDA backend, shared by the tests that run its
kernels: tests/test_cuda.py on a GPU, tests/cuda_emulation/emulated_checks.py on the CPU emulation.

The launch constants mirror csrc/cuda/focal_kernels.cuh, tile_sums.cuh and softmax_kernels.cuh:
change both together.
"""

from __future__ import annotations

import math

import torch

THREADS = 256  # kThreads
WARP = 32
LANE_PACKS = 16  # kLanePacks: a tile is WARP * LANE_PACKS packs
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
GAMMAS = [0.0, 1.0, 2.0, 1.5]  # the three fast paths and the general one
REDUCTIONS = ["none", "sum", "mean"]


def vector_width(dtype: torch.dtype) -> int:
    """Elements per 16-byte pack."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def blocks_per_sm(dtype: torch.dtype) -> int:
    """kBlocksPerSm: the grid's cap per SM (float64 kernels use more registers)."""
    return 3 if dtype == torch.float64 else 4


def grid_blocks(numel: int, dtype: torch.dtype, multiprocessors: int) -> int:
    """Blocks of the loss kernel for `numel` elements: one thread per pack, at most one wave."""
    packs = -(-numel // vector_width(dtype))
    return min(-(-packs // THREADS), multiprocessors * blocks_per_sm(dtype))


def tile_count(numel: int, dtype: torch.dtype) -> int:
    """Tiles of the roofline kernels (focal_ids_kernel, focal_float_kernel) for `numel` elements."""
    return -(-numel // (WARP * LANE_PACKS * vector_width(dtype)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_logits(shape, dtype: torch.dtype, generator: torch.Generator, spread: float = 4.0) -> torch.Tensor:
    """Standard normal logits times `spread`, drawn in float64 and rounded to `dtype`."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * spread).to(dtype)


def make_targets(kind: str, logits: torch.Tensor, generator: torch.Generator, ignore_index: int = -100) -> torch.Tensor:
    """'hard' (0/1) or 'soft' targets of the logits' shape and dtype, or 'ids': int64 class ids of
    shape logits.shape[:-1] with every kind of row (positive, background -1, ignored)."""
    if kind == "ids":
        classes = logits.shape[-1]
        ids = torch.randint(-1, classes, logits.shape[:-1], generator=generator)
        flat = ids.view(-1)
        flat[::7] = ignore_index
        return ids
    t = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
    return (t.round() if kind == "hard" else t).to(logits.dtype)


def assert_close_ulps(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, ulps: float, what: str,
                      normwise: bool = False) -> None:
    """|got - want| <= ulps * eps(dtype) * (|want| + (max|want| if normwise else 0)), elementwise, give
    or take one step of dtype's subnormals; NaN must match NaN.

    `normwise` bounds the error by the tensor's largest value as well: for a gradient of soft targets,
    (p - t) near its zero is a difference of terms of that size, whose own relative error is large.
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double(), want.double()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN at different positions"
    got, want = got[~nan], want[~nan]
    if want.numel() == 0:
        return
    info = torch.finfo(dtype)
    scale = want.abs() + (want.abs().max() if normwise else 0)
    bound = ulps * info.eps * scale + info.eps * info.tiny
    excess = (got - want).abs() - bound
    if (excess > 0).any():
        i = int(excess.argmax())
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {want.numel()} values beyond {ulps} ulps of {dtype}; "
            f"worst: got {got[i].item()!r}, want {want[i].item()!r}"
        )


def _block_reduce(x: torch.Tensor) -> torch.Tensor:
    """cub::BlockReduce<T, 256>::Sum (BLOCK_REDUCE_WARP_REDUCTIONS) of each row of x (blocks, 256):
    five shuffle-down steps per warp of 32 (offsets 1, 2, 4, 8, 16; a lane adds the value `offset`
    lanes up when that lane is in the warp), then the warp totals added in warp order."""
    v = x.reshape(x.shape[0], THREADS // WARP, WARP)
    offset = 1
    while offset < WARP:
        nxt = v.clone()
        nxt[..., : WARP - offset] = v[..., : WARP - offset] + v[..., offset:]
        v = nxt
        offset *= 2
    warp_totals = v[..., 0]
    total = warp_totals[:, 0]
    for w in range(1, warp_totals.shape[1]):
        total = total + warp_totals[:, w]
    return total


def _thread_sums(values: torch.Tensor, threads: int, per_step: int) -> torch.Tensor:
    """Each of `threads` threads adds, one at a time, the `per_step` values at a time it visits in a
    grid-stride loop (thread i: values [i*per_step, (i+1)*per_step), then one stride further)."""
    stride = threads * per_step
    steps = max(1, -(-values.numel() // stride))
    padded = torch.zeros(steps * stride, dtype=values.dtype)  # adding +0.0 leaves a sum unchanged
    padded[: values.numel()] = values
    per_thread = padded.view(steps, threads, per_step).permute(1, 0, 2).reshape(threads, -1)
    acc = torch.zeros(threads, dtype=values.dtype)
    for k in range(per_thread.shape[1]):
        acc = acc + per_thread[:, k]
    return acc


def cuda_reduced_sum(losses: torch.Tensor, dtype: torch.dtype, blocks: int | None = None) -> torch.Tensor:
    """The unscaled sum that focal_float_kernel and sum_blocks_kernel compute, in their order, of
    `losses` (every element's unscaled loss, in the accumulation dtype, in memory order) for logits
    of `dtype`: bitwise what the GPU (and the emulation) must return, on any grid and in any launch
    shape. Each pack's elements left to right; in each tile, lane l's packs l, l + 32, ... in turn;
    the 32 lanes' sums in the tree of store_tile_sum (lane l adds lane l + 16's, then l + 8's, ...);
    then the tiles' sums as sum_blocks_kernel adds them. `blocks` is not used (the grid does not
    change the order); callers written for focal_kernel's order may still pass it."""
    del blocks
    vec = vector_width(dtype)
    values = losses.reshape(-1).to(accumulation_dtype(dtype))
    tiles = tile_count(values.numel(), dtype)
    padded = torch.zeros(tiles * WARP * LANE_PACKS * vec, dtype=values.dtype)  # + 0.0 changes no sum
    padded[: values.numel()] = values
    packs = padded.view(tiles, LANE_PACKS, WARP, vec)  # pack lane + 32 k of a tile at [k, lane]
    pack_sums = packs[..., 0]
    for j in range(1, vec):
        pack_sums = pack_sums + packs[..., j]
    lanes = torch.zeros(tiles, WARP, dtype=values.dtype)
    for k in range(LANE_PACKS):
        lanes = lanes + pack_sums[:, k]
    offset = WARP // 2
    while offset:
        lanes[:, :offset] = lanes[:, :offset] + lanes[:, offset : 2 * offset]
        offset //= 2
    return _block_reduce(_thread_sums(lanes[:, 0], THREADS, 1).view(1, THREADS))[0]


SOFTMAX_MAX_TILES_EMULATED = 8  # kSoftmaxMaxTiles of csrc/cuda/softmax_kernels.cuh in the emulation


def softmax_tiles(items: int, per_unit: int, max_tiles: int = SOFTMAX_MAX_TILES_EMULATED) -> tuple[int, int]:
    """SoftmaxTiles::make: (per_tile, count) for `items` elements in units of a warp's 32
    (softmax_elements_kernel), or rows in units of a round of the rows a warp takes at a time (1 or
    2: softmax_warp_rows_kernel) or of 1 (softmax_rows_kernel)."""
    units = -(-items // per_unit)
    per_tile = -(-units // max_tiles) if units > max_tiles else 1
    return per_tile, -(-items // (per_unit * per_tile))


def softmax_reduced_sum(losses: torch.Tensor, per_thread: bool, round_rows: int = 1) -> torch.Tensor:
    """The unscaled sum that the softmax kernels and sum_blocks_kernel compute, in their order, of
    `losses` (each element's or row's unscaled loss, 0 where ignored, in the accumulation dtype, in
    memory order), as the emulation tiles them: per_thread, a tile is a warp's 32 x per_tile
    elements, lane l adding its elements l, l + 32, ... in turn, the lanes' sums in store_tile_sum's
    tree; else a tile is per_tile rounds of `round_rows` rows (2 where 16 lanes take a row), added
    in order. Then the tiles' sums as sum_blocks_kernel adds them, on any grid and in any variant."""
    values = losses.reshape(-1)
    unit = WARP if per_thread else round_rows
    per_tile, count = softmax_tiles(values.numel(), unit)
    span = unit * per_tile
    padded = torch.zeros(count * span, dtype=values.dtype)  # + 0.0 changes no sum
    padded[: values.numel()] = values
    if per_thread:
        steps = padded.view(count, per_tile, WARP)  # element lane + 32 k of a tile at [k, lane]
        lanes = steps[:, 0].clone()
        for k in range(1, per_tile):
            lanes = lanes + steps[:, k]
        offset = WARP // 2
        while offset:
            lanes[:, :offset] = lanes[:, :offset] + lanes[:, offset : 2 * offset]
            offset //= 2
        tile_sums = lanes[:, 0]
    else:
        rows = padded.view(count, span)
        tile_sums = rows[:, 0].clone()
        for k in range(1, span):
            tile_sums = tile_sums + rows[:, k]
    return _block_reduce(_thread_sums(tile_sums, THREADS, 1).view(1, THREADS))[0]


def summation_error_bound(numel: int, dtype: torch.dtype, blocks: int) -> float:
    """Relative error bound of the GPU's sum of `numel` non-negative terms: the longest chain of
    roundings times the accumulation dtype's unit roundoff, doubled for the terms' own error. The
    chain is the longer of focal_kernel's (a thread's sequential sum, the warp tree, the warps, then
    the same over the blocks) and the roofline kernels' (a pack, a lane's packs, the lanes' tree,
    then the tiles' sums as sum_blocks_kernel adds them)."""
    eps = torch.finfo(accumulation_dtype(dtype)).eps
    per_thread = math.ceil(numel / (blocks * THREADS))
    final = math.ceil(max(blocks, tile_count(numel, dtype)) / THREADS) + 5 + THREADS // WARP
    chain = max(per_thread + 5 + THREADS // WARP, vector_width(dtype) + LANE_PACKS + 5) + final
    return 2 * chain * eps
