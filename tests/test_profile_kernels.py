"""benchmarks/profile_kernels.py: the per-kernel (on CPU, per-operator) breakdown of a step."""

from __future__ import annotations

import re

import pytest

import benchmark_scripts


@pytest.fixture(scope="module")
def profile_kernels():
    return benchmark_scripts.load("profile_kernels")


def _rows(text: str, impl_name: str) -> dict[str, tuple[int, float]]:
    """{operator: (calls per step, us per step)} of one implementation's table in the output."""
    block = text.split(f"\n{impl_name}: ", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines()[2:]:
        match = re.match(r"\s+([\d.]+)\s+(\d+)\s+(\S+)", line)
        if match:
            rows[match.group(3)] = (int(match.group(2)), float(match.group(1)))
    return rows


def test_cpu_breakdown_lists_the_fused_op_and_the_floor(profile_kernels, capsys):
    assert profile_kernels.main(["--device", "cpu", "--shape", "small", "--dtype", "float32", "--steps", "3",
                                 "--impls", "floor", "fused_ids"]) == 0
    out = capsys.readouterr().out
    floor = _rows(out, "torch.sigmoid(x)  [floor]")
    fused = _rows(out, "focal (class ids)")
    assert floor["aten::sigmoid"][0] == 1
    # One op call per step, and its gradient scaled in place by the backward (no pass when 1).
    assert fused["focal::sigmoid_focal_loss"][0] == 1 and fused["focal::scale_grad_"][0] == 1
    assert "aten::sigmoid" not in fused
    assert re.search(r"focal \(class ids\): [\d.]+ us per step, \d+ GB/s of the", out)


def test_plain_runs_the_steps_without_a_table(profile_kernels, capsys):
    assert profile_kernels.main(["--device", "cpu", "--shape", "small", "--dtype", "float32", "--steps", "2",
                                 "--impls", "fused_ids", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "focal (class ids): 5 steps run" in out and "us/step" not in out


def test_bad_arguments_are_refused(profile_kernels):
    with pytest.raises(SystemExit):
        profile_kernels.main(["--steps", "0"])
    with pytest.raises(SystemExit):
        profile_kernels.main(["--impls", "nope"])
