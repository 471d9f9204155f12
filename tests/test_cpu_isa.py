"""Every instruction-set copy of the CPU kernel computes the same loss, and rounds 16-bit outputs alike.

The extension compiles its kernel once per ISA and picks the copy that matches ATen's CPU capability,
which ATEN_CPU_CAPABILITY overrides at start-up. Each capability runs in a fresh interpreter and
compares the op with the float64 reference over dtypes, target kinds, gamma fast paths and row
lengths that leave vector tails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

CAPABILITIES = ["default", "avx2", "avx512"]
RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}

CHECK = r"""
import json, sys
import torch
import focal
from focal import reference

report = {"capability": torch.backends.cpu.get_cpu_capability(), "failures": [], "checked": 0}
g = torch.Generator().manual_seed(0)
tolerances = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
for dtype, rtol in tolerances.items():
    for cols in (1, 7, 16, 37, 80):
        # |x| < ~25: the reference's autograd stays finite (saturation is test_numerics' business)
        x = (torch.randn(9, cols, generator=g, dtype=torch.float64) * 5).to(dtype)
        variants = {
            "hard": torch.randint(0, 2, (9, cols), generator=g).to(dtype),
            "soft": torch.rand(9, cols, generator=g, dtype=torch.float64).to(dtype),
            "ids": torch.tensor([0, cols - 1, -1, -100, 0, -1, cols // 2, -100, 1 % cols]),
        }
        for kind, t in variants.items():
            for gamma in (0.0, 1.0, 2.0, 0.5, 2.5):
                for smoothing in ((0.0, 0.125) if kind != "hard" else (0.0,)):
                    for reduction in ("none", "sum"):
                        kwargs = dict(gamma=gamma, reduction=reduction, label_smoothing=smoothing,
                                      weight=torch.linspace(0.5, 2, cols, dtype=torch.float64).to(dtype))
                        xr = x.double().requires_grad_()
                        ref = reference.sigmoid_focal_loss(xr, t.double() if t.is_floating_point() else t,
                                                           **dict(kwargs, weight=kwargs["weight"].double()))
                        (ref_grad,) = torch.autograd.grad(ref.sum(), xr)
                        xo = x.clone().requires_grad_()
                        out = focal.sigmoid_focal_loss(xo, t, **kwargs)
                        (grad,) = torch.autograd.grad(out.sum(), xo)
                        report["checked"] += 1
                        for what, got, want in (("loss", out, ref), ("grad", grad, ref_grad)):
                            if not torch.allclose(got.double(), want.detach(), rtol=rtol, atol=rtol * 1e-2):
                                error = (got.double() - want).abs().max().item()
                                report["failures"].append(f"{dtype} C={cols} {kind} gamma={gamma} eps={smoothing} "
                                                          f"{reduction} {what}: max abs error {error:.3g}")
print(json.dumps(report))
"""


def _available_rank() -> int:
    return RANK.get(torch.backends.cpu.get_cpu_capability(), 0)


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_kernel_copy_matches_reference(capability):
    if RANK[capability.upper()] > _available_rank():
        pytest.skip(f"this CPU supports up to {torch.backends.cpu.get_cpu_capability()}, not {capability.upper()}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["capability"] == capability.upper()  # ATen (and so the extension) took the override
    assert report["checked"] > 100
    assert report["failures"] == []


@pytest.mark.parametrize("test_file", ["test_reduced_precision.py"])
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_kernel_copy_passes_the_bitwise_tests(capability, test_file):
    """Tests that compare outputs bit for bit (16-bit rounding), run against each ISA copy of the
    kernels."""
    if RANK[capability.upper()] > _available_rank():
        pytest.skip(f"this CPU supports up to {torch.backends.cpu.get_cpu_capability()}, not {capability.upper()}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), test_file)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
