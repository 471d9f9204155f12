"""benchmarks/gpu_tune.py without a GPU: the plan, the table it reads from the sources, and the
error it gives when no GPU is visible."""

from __future__ import annotations

import pytest
import torch

import benchmark_scripts
import focal  # noqa: F401  (registers torch.ops.focal, which the script calls)

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
            assert sorted(c["shape"] for c in mine if c["path"] == "row_weight") == sorted(names)
            # The softmax focal loss has no shapes; each path has its floor at the same size and dtype.
            assert [c["shape"] for c in mine if c["path"].startswith("softmax")] == [None] * 4
            assert {c["path"] for c in mine if c["shape"] is None} >= set(tune.FLOOR_OF.values())


def test_softmax_problems_run_on_the_cpu_op_and_are_measured_against_their_own_floor():
    x, ids, weight = tune.make_inputs("softmax_pixels", 2000, 80, torch.float32, torch.device("cpu"))
    side, classes = tune.SEGMENTATION_SIDE, tune.SEGMENTATION_CLASSES
    assert x.shape == (1, classes, side, side) and ids.shape == (1, side, side) and weight is None
    assert (ids == -100).any() and ids.max() < classes
    loss, grad = tune.op_call(x, ids, weight, softmax=True)
    assert loss.dim() == 0 and grad.shape == x.shape and torch.isfinite(grad).all()
    x, ids, _ = tune.make_inputs("softmax_rows", 64, 80, torch.float32, torch.device("cpu"))
    assert x.shape == (64, 80) and ids.shape == (64,)
    probabilities, written = tune.floor_step("softmax_floor_rows", x)()
    assert torch.allclose(probabilities.sum(1), torch.ones(64)) and written.shape == x.shape
    results = [{"path": "floor", "rows": 8, "dtype": "float32", "median_s": 2.0},
               {"path": "softmax_floor_rows", "rows": 8, "dtype": "float32", "median_s": 4.0},
               {"path": "ids", "rows": 8, "dtype": "float32", "median_s": 3.0},
               {"path": "softmax_rows", "rows": 8, "dtype": "float32", "median_s": 5.0},
               {"path": "softmax_pixels", "rows": 8, "dtype": "float32", "median_s": 5.0}]
    tune.add_floor_ratios(results)
    assert [r["x_floor"] for r in results] == [1.0, 1.0, 1.5, 1.25, None]  # no pixel floor timed


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
    assert "plan: 84 timings" in out and "sm_90 ->" in out
    if torch.cuda.is_available():
        return  # the real run is `make gpu-tune`'s, not a test's
    assert tune.main(["--no-build", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU is visible to torch" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
