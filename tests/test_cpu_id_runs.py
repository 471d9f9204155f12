"""The CPU kernel takes plain class ids in runs of rows (csrc/cpu/id_runs.h): rows that follow each
other, are not ignored and weigh alike form one flat stretch of elements, computed two vectors at
a time across row boundaries, with only the vector that holds a row's positive taking the binary
math. These cases put row boundaries, positives, ignored rows and changes of the row weight at
every offset a vector can meet them, for rows of one vector and more, and check loss and gradient
against the float64 reference and against the one-hot float targets, which never take runs.
"""

from __future__ import annotations

import pytest
import torch

import focal
from family_cases import assert_close
from focal import reference

IGNORE = -100
# Rows of one AVX-512 vector (16 floats) and around it, of AVX2's (8), and detection's 80 and 91.
CLASSES = [8, 9, 15, 16, 17, 33, 80, 91]
TOLERANCE = {torch.float64: (1e-12, 1e-300), torch.float32: (2e-5, 1e-30), torch.bfloat16: (2e-2, 1e-30)}


def run_ids(rows: int, classes: int, background_index: int = -1, seed: int = 0) -> torch.Tensor:
    """Every kind of row in an irregular order: positives at the first and last class and at each
    vector boundary, background, ignored rows alone and in a row."""
    g = torch.Generator().manual_seed(seed)
    kinds = [0, classes - 1, 7, 8, 15, 16, 31, 32, background_index, IGNORE, IGNORE]
    kinds = [k for k in kinds if k < classes or k in (background_index, IGNORE)]
    ids = torch.randint(0, classes, (rows,), generator=g)
    picks = torch.randint(0, len(kinds) + 3, (rows,), generator=g)  # + 3: random classes too
    for r in range(rows):
        if picks[r] < len(kinds):
            ids[r] = kinds[picks[r]]
    return ids


def row_weights(rows: int, seed: int = 1) -> torch.Tensor:
    """Runs of equal weights (as a per-image weight gives), of random lengths, including a run of
    -0, of 0 and a weight that changes at every row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(rows, dtype=torch.float64)
    r = 0
    values = [0.5, -0.0, 0.0, 2.0, 0.125]
    while r < rows:
        length = int(torch.randint(1, 9, (1,), generator=g))
        w[r:r + length] = values[(r // 3) % len(values)] if length > 2 else torch.rand(1, generator=g).item()
        r += length
    return w


def fused_and_reference(x, ids, reduction, weight, background_index):
    kwargs = dict(alpha=0.25, gamma=2.0, reduction=reduction, ignore_index=IGNORE, background_index=background_index)
    xg = x.clone().requires_grad_()
    loss = focal.sigmoid_focal_loss(xg, ids, weight=weight, **kwargs)
    loss.backward(torch.ones_like(loss))
    xr = x.double().requires_grad_()
    want = reference.sigmoid_focal_loss(xr, ids, weight=None if weight is None else weight.double(), **kwargs)
    want.backward(torch.ones_like(want))
    return loss.detach(), xg.grad, want.detach(), xr.grad


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "row weights"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_runs_of_rows_match_the_reference(classes, dtype, weighted, reduction):
    rows = 203
    x = (torch.randn(rows, classes, generator=torch.Generator().manual_seed(classes), dtype=torch.float64) * 4)
    x = x.to(dtype)
    ids = run_ids(rows, classes)
    weight = row_weights(rows).to(dtype)[:, None] if weighted else None
    loss, grad, want_loss, want_grad = fused_and_reference(x, ids, reduction, weight, -1)
    rtol, atol = TOLERANCE[dtype]
    assert_close(loss, want_loss, rtol, atol, "loss")
    assert_close(grad, want_grad, rtol, atol, "gradient")


@pytest.mark.parametrize("classes", [9, 91])
@pytest.mark.parametrize("background", ["C", "1000"])
def test_background_marked_otherwise(classes, background):
    """Background marked C (mmdetection, detectron2) or any other id outside the classes: a row of
    negatives inside a run, as -1 is."""
    rows = 97
    background_index = classes if background == "C" else 1000
    x = torch.randn(rows, classes, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    ids = run_ids(rows, classes, background_index=background_index)
    loss, grad, want_loss, want_grad = fused_and_reference(x, ids, "sum", None, background_index)
    assert_close(loss, want_loss, 2e-5, 0, "loss")
    assert_close(grad, want_grad, 2e-5, 1e-30, "gradient")


@pytest.mark.parametrize("classes", [16, 91])
def test_runs_agree_with_one_hot_float_targets(classes):
    """The same problem as class ids (runs) and as a one-hot float target (flat spans, no ids):
    float32 results within a few ulp, over blocks of many rows (several parallel work items)."""
    rows = 4000
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, classes, generator=g) * 3 - 2
    ids = torch.randint(0, classes, (rows,), generator=g)
    ids[torch.rand(rows, generator=g) < 0.9] = -1
    one_hot = torch.zeros(rows, classes)
    positive = ids >= 0
    one_hot[positive.nonzero()[:, 0], ids[positive]] = 1
    results = []
    for targets in (ids, one_hot):
        xg = x.clone().requires_grad_()
        loss = focal.sigmoid_focal_loss(xg, targets, alpha=0.25, gamma=2.0, reduction="sum")
        loss.backward()
        results.append((loss.detach(), xg.grad))
    (loss_ids, grad_ids), (loss_float, grad_float) = results
    assert_close(loss_ids, loss_float, 1e-6, 0, "loss")
    assert_close(grad_ids, grad_float, 1e-6, 1e-30, "gradient")
