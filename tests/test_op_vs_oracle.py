"""The fused ops against the oracle: every loss of the family, every dtype, logits from -1e4 to 1e4
and the largest finite ones.

`focal.reference` in float64, itself checked against 50-digit values in tests/test_oracle.py, is the
exact value here. The op sees logits (and float targets) rounded to its dtype; the oracle is evaluated
at those same rounded values. Errors are relative, in ulps of the op's dtype at the exact value (its
subnormal spacing below the normal range), so that the saturated tails, where a loss or gradient is
e^-100 or a subnormal, count as much as the middle. The bounds are README.md's precision table
("Precision"):

* float64 and float32: "a few ulp" of the dtype: ``ULPS[dtype]`` (16 float32 ulps are README's 2e-6)
  plus the condition number ``kappa`` of the output in its inputs (logits, soft targets), which
  bounds what rounding the inputs once costs any evaluation in that precision (a soft target's
  gradient near ``p = t``; a saturated loss e^(-(1 + gamma)|x|), whose kappa is (1 + gamma)|x|; the
  softmax at large logits). For float64, twice that: the oracle's own error (tests/test_oracle.py)
  and the op's. The op's powers with a non-integer exponent, ``exp(gamma log q)``, use that
  allowance at saturated logits: up to 52 float32 ulps (6.2e-6) where README's table says 2e-6;
* bfloat16 and float16: "float32 math rounded once": within one ulp of the dtype (half an ulp for
  the rounding, the rest for a float32 result within a few float32 ulps of a rounding boundary),
  plus the float32 computation's own ``(ULPS + kappa)`` float32 ulps; on CUDA that computation is
  within ``2^-15 (1 + kappa)``, and bfloat16 results below 2^-126 may flush to 0.

The same runs on a GPU when there is one, and on the CUDA emulation (tests/cuda_emulation/oracle_checks.py).

``python tests/test_op_vs_oracle.py`` prints the largest error per loss, output and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import focal
from focal import reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ULPS = {torch.float64: 16, torch.float32: 16}
BFLOAT16_FLUSH = 2.0**-126  # CUDA's bfloat16 results below it may be 0

_MAGNITUDES = torch.cat([
    torch.logspace(-3, 4, 57, dtype=torch.float64),
    # 0; float32 softplus cut-overs; float32's and float64's underflow of e^-|x| (and of p^2 at 60, 400)
    torch.tensor([0.0, 15.0, 17.0, 20.0, 30.0, 36.0, 37.0, 40.0, 60.0, 88.0, 103.0, 104.0, 400.0, 700.0, 709.0,
                  720.0, 740.0, 745.0], dtype=torch.float64),
])
LOGITS = torch.cat([-_MAGNITUDES, _MAGNITUDES]).unique()  # sorted, both tails, 0 once
SOFT = [0.0, 1.0, 0.3, 0.9]  # float targets: each logit meets each


@dataclass(frozen=True)
class Row:
    """One loss at one setting: ``op(x, t)`` gives the loss (reduction "none") of logits ``x`` and
    targets ``t`` as the op takes them (float, class ids, or the pair (ids, scores)); ``make(x)`` the
    logits laid out for it and its targets; ``oracle(x, t)`` the loss in float64 with ``t`` as
    ``dense(x, t)`` makes it: the float targets the op's targets stand for (smoothed one-hot rows,
    scores at their class), whose rounding counts in the condition number; None for the softmax's
    class ids. ``raw`` calls the registered op of a namespace (torch.ops.focal, the emulated CUDA
    backend's torch.ops.focal_emu) directly."""

    name: str
    op: Callable
    oracle: Callable
    make: Callable
    dense: Callable | None = None
    raw: Callable | None = None  # raw(ops, x, t) -> (loss, grad): the op itself in namespace ops

    def __str__(self):
        return self.name


def _float(x, t):
    return t.double()


def _smoothed(x, ids):
    return reference.expand_targets(x, ids, label_smoothing=0.1)[0]


def _pair_dense(x, pair):
    return reference.quality_targets(x, (pair[0], pair[1].double()))[0]


def _dense(x):
    """Each logit with each of SOFT, as (x, t) of shape (len(SOFT) * N,)."""
    t = torch.tensor(SOFT, dtype=torch.float64).repeat_interleave(len(x))
    return x.repeat(len(SOFT)), t


def _ids(x):
    """Each logit as a positive (id 0) and a negative (id -1) of a one-class row: (2N, 1), ids (2N,)."""
    return x.repeat(2).unsqueeze(-1), torch.cat([torch.zeros(len(x)), -torch.ones(len(x))]).long()


def _pair(x):
    """Quality targets as (ids, scores): positives of score 0.7 and 0 (a missed box), and negatives."""
    ids = torch.cat([torch.zeros(2 * len(x)), -torch.ones(len(x))]).long()
    scores = torch.cat([torch.full((len(x),), 0.7), torch.zeros(len(x)), torch.full((len(x),), 0.7)])
    return x.repeat(3).unsqueeze(-1), (ids, scores.double())


SOFTMAX_OTHERS = (0.0, 2.0)


def _softmax_rows(x):
    """Rows (x, 0, 2) with target class 0 and 1."""
    rows = torch.stack([x, *(torch.full_like(x, v) for v in SOFTMAX_OTHERS)], dim=1)
    return rows.repeat(2, 1), torch.cat([torch.zeros(len(x)), torch.ones(len(x))]).long()


def _softmax_alpha(alpha, override):
    """The oracle's alpha, times the one-hot ``override`` that keeps one class's term."""
    alpha = None if alpha is None else alpha.double()
    if override is None:
        return alpha
    return override if alpha is None else alpha * override


def _split(t):
    """A quality target as the raw op takes it: (targets, scores or None)."""
    return t if isinstance(t, tuple) else (t, None)


def _focal_row(gamma, alpha, ids=False):
    smoothing = 0.1 if ids else 0.0
    a = -1.0 if alpha is None else alpha
    return Row(
        f"focal{' ids smoothed' if ids else ''} gamma={gamma} alpha={alpha}",
        lambda x, t: focal.sigmoid_focal_loss(x, t, alpha, gamma, label_smoothing=smoothing),
        lambda x, t: reference.sigmoid_focal_loss(x, t, alpha, gamma),
        _ids if ids else _dense, _smoothed if ids else _float,
        raw=lambda ops, x, t: ops.sigmoid_focal_loss(x, t, None, None, None, a, gamma, smoothing, -100, "none", 1.0,
                                                     True),
    )


def _star_row(gamma, beta, alpha, ids=False):
    smoothing = 0.1 if ids else 0.0
    a = -1.0 if alpha is None else alpha
    return Row(
        f"star{' ids smoothed' if ids else ''} gamma={gamma} beta={beta} alpha={alpha}",
        lambda x, t: focal.sigmoid_focal_loss_star(x, t, gamma, beta, alpha, label_smoothing=smoothing),
        lambda x, t: reference.sigmoid_focal_loss_star(x, t, gamma, beta, alpha),
        _ids if ids else _dense, _smoothed if ids else _float,
        raw=lambda ops, x, t: ops.sigmoid_focal_loss_star(x, t, None, None, None, a, gamma, beta, smoothing, -100,
                                                          "none", 1.0, True),
    )


def _quality_row(beta, pair=False):
    return Row(
        f"quality{' pair' if pair else ''} beta={beta}",
        lambda x, t: focal.quality_focal_loss(x, t, beta),
        lambda x, t: reference.quality_focal_loss(x, t, beta),
        _pair if pair else _dense, _pair_dense if pair else _float,
        raw=lambda ops, x, t: ops.quality_focal_loss(x, *_split(t), None, None, None, beta, -100, "none", 1.0, True),
    )


def _varifocal_row(gamma, pair=False):
    return Row(
        f"varifocal{' pair' if pair else ''} gamma={gamma}",
        lambda x, t: focal.varifocal_loss(x, t, 0.75, gamma),
        lambda x, t: reference.varifocal_loss(x, t, 0.75, gamma),
        _pair if pair else _dense, _pair_dense if pair else _float,
        raw=lambda ops, x, t: ops.varifocal_loss(x, *_split(t), None, None, None, 0.75, gamma, -100, "none", 1.0,
                                                 True),
    )


def _softmax_row(gamma, smoothing, alpha):
    return Row(
        f"softmax gamma={gamma} smoothing={smoothing} alpha={'per class' if alpha is not None else None}",
        lambda x, t: focal.softmax_focal_loss(x, t, None if alpha is None else alpha.to(x.dtype), gamma, "none",
                                              label_smoothing=smoothing),
        lambda x, t, alpha_override=None: reference.softmax_focal_loss(
            x, t, _softmax_alpha(alpha, alpha_override), gamma, "none", label_smoothing=smoothing),
        _softmax_rows,
        raw=lambda ops, x, t: ops.softmax_focal_loss(x, t, None, None if alpha is None else alpha.to(x.dtype), None,
                                                     1.0, gamma, smoothing, -100, "none", 1.0, True),
    )


def _rows():
    focal_settings = [(0.0, 0.25), (0.5, None), (1.0, 0.25), (2.0, 0.25), (3.7, None)]  # every gamma kernel
    exponents = [0.0, 0.5, 1.0, 2.0, 3.7]
    per_class = torch.tensor([0.25, 0.5, 0.75])
    return [
        *(_focal_row(g, a, ids) for g, a in focal_settings for ids in (False, True)),
        *(_star_row(g, b, a) for (g, b), a in [((2.0, 1.0), 0.25), ((4.0, 0.0), None), ((1.0, 0.0), None),
                                               ((0.5, -1.5), 0.25)]),
        _star_row(2.0, 1.0, None, ids=True),
        *(_quality_row(b) for b in exponents),
        _quality_row(2.0, pair=True),
        *(_varifocal_row(g) for g in exponents),
        _varifocal_row(2.0, pair=True),
        *(_softmax_row(g, s, a) for g in exponents for s, a in [(0.0, None), (0.1, per_class)]),
    ]


ROWS = _rows()


# ---- exact values, condition numbers, errors ----------------------------------------------------


def _as_dtype(t, dtype):
    if isinstance(t, tuple):
        return t[0], t[1].to(dtype)
    return t.to(dtype) if t.is_floating_point() else t


def _to_double(t):
    if isinstance(t, tuple):
        return t[0], t[1].double()
    return t.double() if t.is_floating_point() else t


def _to(t, device):
    return tuple(v.to(device) for v in t) if isinstance(t, tuple) else t.to(device)


def op_outputs(row: Row, dtype: torch.dtype, ops=None, device: str = "cpu"):
    """(logits as rounded, targets as rounded, {output: op's value}) on the CPU: the op run on
    ``device`` through the public function and autograd, or, given an op namespace ``ops``, the
    registered op itself."""
    # every finite logit gives a finite, exact loss and gradient; in float64 up to 1e300, where the
    # oracle's own chain rule (ce ~ |x| times gamma q^(gamma - 1), then times dq/dx = 0) does not overflow
    big = 1e300 if dtype == torch.float64 else torch.finfo(dtype).max
    x, t = row.make(torch.cat([LOGITS, torch.tensor([-big, big], dtype=torch.float64)]))
    x, t = x.to(dtype), _as_dtype(t, dtype)
    if ops is not None:
        loss, grad = row.raw(ops, x, t)
        return x, t, {"loss": loss, "grad": grad}
    xd = x.to(device).requires_grad_()
    loss = row.op(xd, _to(t, device))
    (grad,) = torch.autograd.grad(loss.sum(), xd)
    return x, t, {"loss": loss.detach().cpu(), "grad": grad.cpu()}


def oracle_outputs(row: Row, x: torch.Tensor, t):
    """{output: (exact value, condition number)} by the float64 oracle at the op's rounded inputs:
    kappa = (|x dF/dx| + |t dF/dt|) / |F| elementwise, over the logits and the float targets; for the
    softmax, summed over a row's logits and the class weights (F is linear in each: that class's
    term)."""
    x = x.double().requires_grad_()
    if row.dense is None:  # softmax
        return _softmax_oracle(row, x, t)
    dense = row.dense(x.detach(), _to_double(t)).clone().requires_grad_()
    loss = row.oracle(x, dense)
    dx, dt = torch.autograd.grad(loss.sum(), [x, dense], create_graph=True)
    second_x, second_t = torch.autograd.grad(dx.sum(), [x, dense], retain_graph=True)
    with torch.no_grad():
        soft = (dense != 0) & (dense != 1)  # a hard target is exact: no rounding of it to count
        kappa_loss = (x * dx).abs() + soft * (dense * dt).abs()
        kappa_grad = (x * second_x).abs() + soft * (dense * second_t).abs()
        return {"loss": (loss, _ratio(kappa_loss, loss)), "grad": (dx, _ratio(kappa_grad, dx))}


def _softmax_oracle(row: Row, x: torch.Tensor, t):
    loss = row.oracle(x, t)
    (dx,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    kappa_loss = (x * dx).abs().sum(-1)
    kappa_grad = torch.zeros_like(dx)
    for i in range(x.shape[-1]):
        (hessian_row,) = torch.autograd.grad(dx[:, i].sum(), x, retain_graph=True)
        kappa_grad[:, i] = (x * hessian_row).abs().sum(-1)
    for term_loss, term_grad in _softmax_class_terms(row, x, t):
        kappa_loss = kappa_loss + term_loss.abs()
        kappa_grad = kappa_grad + term_grad.abs()
    with torch.no_grad():
        return {"loss": (loss.detach(), _ratio(kappa_loss.detach(), loss)),
                "grad": (dx.detach(), _ratio(kappa_grad.detach(), dx))}


def _softmax_class_terms(row: Row, x: torch.Tensor, t):
    """(loss, gradient) of each class's term alone: the oracle with every other class's weight 0,
    through alpha (without smoothing, only the target's class has a term)."""
    for c in range(x.shape[-1]):
        alpha = torch.zeros(x.shape[-1], dtype=torch.float64)
        alpha[c] = 1.0
        term = row.oracle(x, t, alpha_override=alpha)
        (grad,) = torch.autograd.grad(term.sum(), x)
        yield term.detach(), grad


def _ratio(numerator, value):
    """numerator / |value|; 0 where the oracle's own second derivative overflowed (NaN: a power
    below 1 of an underflowed probability), which only makes the bound stricter."""
    kappa = torch.where(value != 0, numerator / value.abs(), torch.where(numerator != 0, torch.inf, 0.0))
    return kappa.nan_to_num(nan=0.0, posinf=torch.inf)


def ulps(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|got - exact| in ulps of dtype at |exact|; the subnormal spacing below the normal range."""
    info = torch.finfo(dtype)
    exponent = torch.frexp(exact.abs())[1].double() - 1  # |exact| in [2^e, 2^(e+1))
    spacing = torch.maximum(torch.exp2(exponent) * info.eps, torch.tensor(info.smallest_normal * info.eps,
                                                                          dtype=torch.float64))
    err = (got.double() - exact).abs()
    return torch.where(torch.isfinite(got.double()), err / spacing, torch.inf)


def allowed_ulps(kappa: torch.Tensor, dtype: torch.dtype, cuda: bool = False) -> torch.Tensor:
    """README's bound in ulps of dtype (see the module docstring); ``cuda``: its CUDA column, whose
    16-bit results come from float32 math within 2^-15 (instead of a few float32 ulps)."""
    if dtype == torch.float64:  # the oracle's own error (tests/test_oracle.py) and the op's
        return 2 * (ULPS[dtype] + kappa)
    if dtype == torch.float32:
        return ULPS[dtype] + kappa
    compute = 2.0**-15 * (1 + kappa) if cuda else torch.finfo(torch.float32).eps * (ULPS[torch.float32] + kappa)
    return 1.0 + compute / torch.finfo(dtype).eps


def errors(row: Row, dtype: torch.dtype, ops=None, cuda: bool = False):
    """(x, t, {output: (ulps, allowed ulps, got, exact)}) with flat tensors; ``ops`` and ``cuda`` as
    for :func:`op_outputs` and :func:`allowed_ulps` (without ``ops``, ``cuda`` runs the op on the GPU)."""
    x, t, got = op_outputs(row, dtype, ops, "cuda" if cuda and ops is None else "cpu")
    exact = oracle_outputs(row, x, t)
    out = {}
    for name, value in got.items():
        want, kappa = exact[name]
        out[name] = (ulps(value, want, dtype).flatten(), allowed_ulps(kappa, dtype, cuda).flatten(),
                     value.flatten(), want.flatten())
    return x, t, out


def failures(row: Row, dtype: torch.dtype, ops=None, cuda: bool = False, flush_below: float = 0.0) -> list[str]:
    """The elements beyond the bound, described (five per output at most); results whose exact value
    is below ``flush_below`` may also be 0."""
    x, t, out = errors(row, dtype, ops, cuda)
    found = []
    for name, (err, allowed, got, want) in out.items():
        bad = ~(err <= allowed) & ~((want.abs() < flush_below) & (got == 0))
        for i in bad.nonzero().flatten()[:5].tolist():
            found.append(f"{name} at {_where(x, t, i, name)}: got {got[i].item()!r}, exact {want[i].item()!r} "
                         f"({err[i].item():.3g} ulps, allowed {allowed[i].item():.3g})")
    return found


def _where(x, t, i, output):
    """The inputs of element i of an output: its logit row and target."""
    if x.dim() == 2 and x.shape[-1] > 1:  # softmax: (rows, 3), gradient elementwise
        r = i // x.shape[-1] if output == "grad" else i
        return f"row {x[r].tolist()}, target {t[r].item()}"
    if isinstance(t, tuple):
        return f"x = {x.flatten()[i].item()}, id {t[0][i].item()}, score {t[1][i].item()}"
    return f"x = {x.flatten()[i].item()}, target {t.flatten()[i].item()}"


def params():
    """Every row in every dtype, named "<row>-<dtype>"."""
    return [
        pytest.param(row, dtype, id=f"{row.name}-{str(dtype).replace('torch.', '')}") for row in ROWS for dtype in DTYPES
    ]


@pytest.mark.parametrize(("row", "dtype"), params())
def test_op_within_readme_precision_of_the_oracle(row, dtype, device):
    cuda = device == "cuda"
    found = failures(row, dtype, cuda=cuda, flush_below=BFLOAT16_FLUSH if cuda and dtype == torch.bfloat16 else 0.0)
    if found:  # no traceback: the message says it all, and rendering one costs seconds
        pytest.fail(f"{row} {dtype}:\n" + "\n".join(found), pytrace=False)


def worst_errors(ops=None, cuda: bool = False):
    """{(loss family, output, dtype): (largest ulps, largest fraction of the bound, where the largest
    error is)}."""
    worst = {}
    for row in ROWS:
        for dtype in DTYPES:
            x, t, out = errors(row, dtype, ops, cuda)
            for name, (err, allowed, got, want) in out.items():
                key = (row.name.split()[0], name, str(dtype).replace("torch.", ""))
                i = int(torch.nan_to_num(err, posinf=1e300).argmax())
                ratio = (err / allowed).nan_to_num(posinf=1e300).max().item()
                best = worst.get(key, (-1.0, 0.0, ""))
                if err[i].item() > best[0]:
                    best = (err[i].item(), best[1], f"{row.name}: {_where(x, t, i, name)}: got {got[i].item()!r}, "
                                                    f"exact {want[i].item()!r}")
                worst[key] = (best[0], max(best[1], ratio), best[2])
    return worst


def print_worst_errors(ops=None, cuda: bool = False):
    for (family, output, dtype), (err, ratio, what) in sorted(worst_errors(ops, cuda).items()):
        print(f"{family:10s} {output:5s} {dtype:9s} {err:10.3g} ulps ({ratio:.2f} of allowed)  {what}")


if __name__ == "__main__":
    print_worst_errors()
