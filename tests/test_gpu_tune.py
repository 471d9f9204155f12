"""benchmarks/gpu_tune.py without a GPU: the plan, the table it reads from the sources, and the
error it gives when no GPU is visible."""

from __future__ import annotations

import pytest
import torch

import benchmark_scripts

tune = benchmark_scripts.load("gpu_tune")


def test_plan_covers_every_shape_of_every_shaped_path():
    names = tune.launch_shape_names()
    assert len(names) >= 2 and "t256_f64_b4" in names
    cases = tune.plan()
    for rows, cols in tune.SHAPES:
        for dtype in ("float32", "bfloat16", "float16"):
            mine = [c for c in cases if (c["rows"], c["cols"], c["dtype"]) == (rows, cols, dtype)]
            assert sorted(c["shape"] for c in mine if c["path"] == "ids") == sorted(names)
            assert sorted(c["shape"] for c in mine if c["path"] == "float") == sorted(names)
            assert [c["shape"] for c in mine if c["path"] in ("row_weight", "floor")] == [None, None]


def test_arch_table_is_read_and_checked():
    names = tune.launch_shape_names()
    table = tune.arch_table(names=names)
    assert (9, 0) in table and all(0 <= s < len(names) for s in table.values())
    good = "constexpr ArchLaunchShapes kArchLaunchShapes[] = {\n    {9, 0, 1},  // x\n    {8, 0, 0},\n};"
    assert tune.arch_table(good, names=["a", "b"]) == {(9, 0): 1, (8, 0): 0}
    with pytest.raises(tune.TuneError, match="sm_90 takes shape 5, which does not exist"):
        tune.arch_table(good.replace("{9, 0, 1}", "{9, 0, 5}"), names=["a", "b"])
    with pytest.raises(tune.TuneError, match="sm_80 twice"):
        tune.arch_table(good.replace("{9, 0, 1}", "{8, 0, 1}"), names=["a", "b"])
    with pytest.raises(tune.TuneError, match="distinct"):
        tune.launch_shape_names('kLaunchShapeNames[2] = {"a", "a"};')
    entry = tune.table_entry(9, 0, 1, ["a", "b"], "NVIDIA H200, 1.10x the floor")
    assert tune.arch_table("kArchLaunchShapes[] = {\n" + entry + "\n};", names=["a", "b"]) == {(9, 0): 1}


def test_dry_run_and_the_error_without_a_gpu(capsys, tmp_path):
    assert tune.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan: 48 timings" in out and "sm_90 ->" in out
    if torch.cuda.is_available():
        return  # the real run is `make gpu-tune`'s, not a test's
    assert tune.main(["--no-build", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU is visible to torch" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
