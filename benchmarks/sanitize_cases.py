"""Small CUDA cases of the fused ops for compute-sanitizer: forward and backward of the focal loss over
every dtype, target form, reduction and gamma path, and of FL*, QFL and VFL over every dtype and
target form (the pair (ids, scores) included), each compared with the CPU op.

    compute-sanitizer --tool memcheck --error-exitcode 3 python benchmarks/sanitize_cases.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 ...   # so that memcheck sees each tensor's own bounds

The shapes are small but chosen to reach every code path of a grid-stride kernel over 16-byte packs:
sizes that are not a multiple of a pack (the scalar tail), logits that do not start on a 16-byte
boundary (no vector accesses), more elements than one wave of blocks covers (a second trip round the
loop), and empty inputs. Exit status: 0 all agree, 1 a mismatch, 2 no GPU or no CUDA kernels.
Runs without the sanitizer too (a few seconds).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, when focal is not installed

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TARGETS = ("hard", "soft", "ids", "ids_smoothed")
REDUCTIONS = ("none", "sum", "mean")
GAMMAS = (2.0, 0.0, 1.0, 1.5)  # the three fast paths and the general one
WEIGHTS = (None, "class", "row", "full")
SHAPES = ((37, 13), (3, 80), (64, 80), (1, 1))
# Relative tolerances of CUDA against the CPU op: the math runs in float32 (float64) on both, in
# other orders; only the half-precision outputs are rounded.
TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# More elements than 132 SMs x 4 blocks x 256 threads x 8 bf16 take in one trip of the loop.
LARGE_ROWS = 14_000


def make_case(shape, dtype, target, weight, gen):
    """Logits, targets and keyword arguments of one case, on the CPU."""
    rows, cols = shape
    x = (torch.randn(rows, cols, generator=gen) * 4).to(dtype)
    kwargs = {}
    if target in ("ids", "ids_smoothed"):
        t = torch.randint(-1, cols, (rows,), generator=gen)
        t[::5] = -100
        if target == "ids_smoothed":
            kwargs["label_smoothing"] = 0.1
    else:
        t = torch.rand(rows, cols, generator=gen).to(dtype)
        if target == "hard":
            t = t.round()
    if weight == "class":
        kwargs["weight"] = torch.rand(cols, generator=gen).to(dtype)
    elif weight == "row":
        kwargs["weight"] = torch.rand(rows, 1, generator=gen).to(dtype)
    elif weight == "full":
        kwargs["weight"] = torch.rand(rows, cols, generator=gen).to(dtype)
    return x, t, kwargs


def place(x: torch.Tensor, device: str, unaligned: bool) -> torch.Tensor:
    """A fresh leaf copy of ``x`` on ``device``; with ``unaligned``, contiguous but one element past
    a 16-byte boundary, so the kernel cannot use vector accesses."""
    if not unaligned:
        return x.detach().to(device, copy=True).requires_grad_(True)
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)
    storage[1:] = x.flatten()
    return storage[1:].view(x.shape).requires_grad_(True)


def run(loss_fn, x, t, kwargs, device, reduction, gamma, normalizer, unaligned=False):
    xd = place(x, device, unaligned)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    if normalizer is not None:
        kw["normalizer"] = normalizer.to(device)
    loss = loss_fn(xd, t.to(device), 0.25, gamma, reduction, **kw)
    loss.sum().backward()
    return loss.detach().cpu(), xd.grad.cpu()


def compare(name, cpu, cuda, dtype) -> str | None:
    tol = TOLERANCES[dtype]
    for what, a, b in (("loss", cpu[0], cuda[0]), ("grad", cpu[1], cuda[1])):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{name}: {what} is {b.dtype} {tuple(b.shape)} on cuda, {a.dtype} {tuple(a.shape)} on cpu"
        try:
            torch.testing.assert_close(b, a, rtol=tol, atol=tol * 1e-3, equal_nan=True)
        except AssertionError as exc:
            return f"{name}: {what} differs: " + " ".join(str(exc).split())[:300]
    return None


def cases():
    """(name, shape, dtype, target, weight, reduction, gamma, unaligned) of every case."""
    for dtype in DTYPES:
        for i, (target, reduction) in enumerate(itertools.product(TARGETS, REDUCTIONS)):
            yield (SHAPES[i % len(SHAPES)], dtype, target, WEIGHTS[i % len(WEIGHTS)], reduction,
                   GAMMAS[i % len(GAMMAS)], False)
        yield (37, 13), dtype, "ids", "class", "none", 2.0, True
        yield (37, 13), dtype, "soft", None, "sum", 1.5, True
        yield (LARGE_ROWS, 80), dtype, "ids", None, "sum", 2.0, False
        yield (LARGE_ROWS, 80), dtype, "hard", "row", "none", 2.0, False
        yield (0, 80), dtype, "ids", None, "sum", 2.0, False


# FL*, QFL and VFL: loss -> (call(x, targets, reduction, **kw), target forms)
FAMILY = {
    "star": (lambda f, x, t, r, **kw: f.sigmoid_focal_loss_star(x, t, 2.0, 1.0, 0.25, r, **kw), ("soft", "ids")),
    "quality": (lambda f, x, t, r, **kw: f.quality_focal_loss(x, t, 1.5, r, **kw), ("soft", "pair")),
    "varifocal": (lambda f, x, t, r, **kw: f.varifocal_loss(x, t, 0.75, 2.0, r, **kw), ("soft", "pair")),
}


def family_cases():
    """(name, loss, shape, dtype, target, weight, reduction, unaligned) of every family case."""
    for (loss, (_, targets)), dtype in itertools.product(FAMILY.items(), DTYPES):
        for i, (target, reduction) in enumerate(itertools.product(targets, REDUCTIONS)):
            yield loss, SHAPES[i % len(SHAPES)], dtype, target, WEIGHTS[i % len(WEIGHTS)], reduction, False
        yield loss, (37, 13), dtype, targets[-1], "row", "sum", True
        yield loss, (LARGE_ROWS, 80), dtype, targets[-1], None, "sum", False


def run_family(loss, x, t, kwargs, device, reduction, unaligned):
    import focal

    xd = place(x, device, unaligned)
    kw = {k: v.to(device) for k, v in kwargs.items()}
    targets = tuple(v.to(device) for v in t) if isinstance(t, tuple) else t.to(device)
    value = FAMILY[loss][0](focal, xd, targets, reduction, **kw)
    value.sum().backward()
    return value.detach().cpu(), xd.grad.cpu()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no GPU is visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    import focal

    try:
        focal.sigmoid_focal_loss(torch.zeros(1, 1, device="cuda"), torch.zeros(1, 1, device="cuda"))
    except RuntimeError as exc:
        print(f"error: focal cannot run on cuda: {exc}", file=sys.stderr)
        return 2

    gen = torch.Generator().manual_seed(args.seed)
    failures, count = [], 0
    for shape, dtype, target, weight, reduction, gamma, unaligned in cases():
        name = (f"{str(dtype).removeprefix('torch.'):8s} {target:12s} {reduction:4s} gamma={gamma:<3} "
                f"weight={weight} {shape[0]}x{shape[1]}{' unaligned' if unaligned else ''}")
        x, t, kwargs = make_case(shape, dtype, target, weight, gen)
        normalizer = torch.tensor(7.0) if reduction == "sum" and target.startswith("ids") else None
        results = [run(focal.sigmoid_focal_loss, x, t, kwargs, device, reduction, gamma, normalizer, unaligned)
                   for device in ("cpu", "cuda")]
        torch.cuda.synchronize()  # a kernel fault surfaces here, under this case's name
        problem = compare(name, *results, dtype)
        count += 1
        print(("MISMATCH " if problem else "ok       ") + name)
        if problem:
            failures.append(problem)
    for loss, shape, dtype, target, weight, reduction, unaligned in family_cases():
        name = (f"{loss:9s} {str(dtype).removeprefix('torch.'):8s} {target:5s} {reduction:4s} weight={weight} "
                f"{shape[0]}x{shape[1]}{' unaligned' if unaligned else ''}")
        x, t, kwargs = make_case(shape, dtype, "ids" if target == "pair" else target, weight, gen)
        kwargs.pop("label_smoothing", None)
        if target == "pair":
            t = (t, torch.rand(t.shape, generator=gen).to(dtype))
        if reduction == "sum":
            kwargs["normalizer"] = torch.tensor(7.0)
        results = [run_family(loss, x, t, kwargs, device, reduction, unaligned) for device in ("cpu", "cuda")]
        torch.cuda.synchronize()
        problem = compare(name, *results, dtype)
        count += 1
        print(("MISMATCH " if problem else "ok       ") + name)
        if problem:
            failures.append(problem)
    for problem in failures:
        print(problem, file=sys.stderr)
    print(f"{count - len(failures)} of {count} cases agree with the CPU op")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
