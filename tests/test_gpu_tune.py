"""benchmarks/gpu_tune.py without a GPU: the plan, the table it reads from the sources, and the
error it gives when no GPU is visible."""

from __future__ import annotations

import pytest
import torch

import benchmark_scripts
import focal  # noqa: F401  (registers torch.ops.focal, which the script calls)

tune = benchmark_scripts.load("gpu_tune")


def test_plan_covers_every_variant_of_every_path():
    shapes, softmax = tune.variant_names("shape"), tune.variant_names("softmax")
    row_variants = tune.variant_names("softmax_rows")
    assert len(shapes) >= 2 and "t256_f64_b4" in shapes and softmax[:2] == ["c1", "c16"]
    assert row_variants == ["registers", "ring"]
    cases = tune.plan()
    for rows, cols in tune.SHAPES:
        for dtype in ("float32", "bfloat16", "float16"):
            mine = [c for c in cases if (c["rows"], c["cols"], c["dtype"]) == (rows, cols, dtype)]
            for path in ("ids", "float", "row_weight"):
                assert sorted(c["variant"] for c in mine if c["path"] == path) == sorted(shapes)
            # The softmax's thread-per-element kernel in each of its variants and both its layouts,
            # the row kernels in each of theirs.
            for path in ("softmax_pixels", "softmax_straddling_pixels", "softmax_short_rows"):
                assert sorted(c["variant"] for c in mine if c["path"] == path) == sorted(softmax)
            for path in ("softmax_rows", "softmax_long_rows"):
                assert [c["variant"] for c in mine if c["path"] == path] == row_variants
            # Each path has its floor at the same size and dtype.
            assert {c["path"] for c in mine if c["variant"] is None} >= set(tune.FLOOR_OF.values())


def test_best_variant_of_each_family_by_its_paths_geometric_mean():
    names = {"shape": ["a", "b"], "softmax": ["c1", "c16"], "softmax_rows": ["registers", "ring"]}
    results = [{"path": "ids", "variant": "a", "x_floor": 2.0}, {"path": "float", "variant": "a", "x_floor": 2.0},
               {"path": "ids", "variant": "b", "x_floor": 1.0}, {"path": "float", "variant": "b", "x_floor": 3.0},
               {"path": "softmax_pixels", "variant": "c1", "x_floor": 1.5},
               {"path": "softmax_pixels", "variant": "c16", "x_floor": 1.2},
               {"path": "softmax_short_rows", "variant": "c1", "x_floor": 1.2},
               {"path": "softmax_short_rows", "variant": "c16", "x_floor": 1.6},
               {"path": "softmax_rows", "variant": "registers", "x_floor": 1.4},
               {"path": "softmax_rows", "variant": "ring", "x_floor": 1.1},
               {"path": "softmax_long_rows", "variant": "registers", "x_floor": 0.5},
               {"path": "softmax_long_rows", "variant": "ring", "x_floor": 0.6}]
    scores, best = tune.pick_best(results, names)
    # c16 is faster on pixels, c1 on short rows, by more: c1 wins both layouts together.
    assert scores["shape"] == pytest.approx({"a": 2.0, "b": 3 ** 0.5})
    assert best == {"shape": 1, "softmax": 0, "softmax_rows": 1}
    assert scores["softmax"] == pytest.approx({"c1": 1.8 ** 0.5, "c16": 1.92 ** 0.5})
    assert scores["softmax_rows"] == pytest.approx({"registers": 0.7 ** 0.5, "ring": 0.66 ** 0.5})
    entry = tune.table_entry(9, 0, best, names, "NVIDIA H200")
    assert entry == "    {9, 0, 1, 0, 1},  // NVIDIA H200: b, c1, ring"
    assert tune.pick_best([], names) == ({"shape": {}, "softmax": {}, "softmax_rows": {}},
                                         {"shape": 0, "softmax": 0, "softmax_rows": 0})


def test_softmax_problems_run_on_the_cpu_op_and_are_measured_against_their_own_floor():
    x, ids, weight = tune.make_inputs("softmax_pixels", 2000, 80, torch.float32, torch.device("cpu"))
    side, classes = tune.SEGMENTATION_SIDE, tune.SEGMENTATION_CLASSES
    assert x.shape == (1, classes, side, side) and ids.shape == (1, side, side) and weight is None
    assert (ids == -100).any() and ids.max() < classes
    loss, grad = tune.op_call(x, ids, weight, softmax=True)
    assert loss.dim() == 0 and grad.shape == x.shape and torch.isfinite(grad).all()
    x, ids, _ = tune.make_inputs("softmax_straddling_pixels", 2000, 80, torch.float32, torch.device("cpu"))
    side = tune.STRADDLING_SIDE
    assert x.shape == (2, classes, side, side) and side * side % 32 != 0  # a warp's 32 pixels may straddle both
    x, ids, _ = tune.make_inputs("softmax_short_rows", 2000, 80, torch.float32, torch.device("cpu"))
    assert x.shape == (8000, tune.SHORT_ROW_CLASSES) and ids.shape == (8000,) and (ids == -100).any()
    assert torch.isfinite(tune.op_call(x, ids, None, softmax=True)[1]).all()
    x, ids, _ = tune.make_inputs("softmax_long_rows", 2000, 80, torch.float32, torch.device("cpu"))
    assert x.shape == (160, tune.LONG_ROW_CLASSES) and ids.shape == (160,)
    assert torch.isfinite(tune.op_call(x, ids, None, softmax=True)[1]).all()
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
    table = tune.arch_table()
    names = {f: tune.variant_names(f) for f in tune.FAMILIES}
    assert (9, 0) in table and all(0 <= row[f] < len(names[f]) for row in table.values() for f in names)
    names = {"shape": ["a", "b"], "softmax": ["c1", "c16"], "softmax_rows": ["registers", "ring"]}
    good = "constexpr ArchEntry kArchVariants[] = {\n    {9, 0, 1, 0, 1},  // x\n    {8, 0, 0, 1, 0},\n};"
    assert tune.arch_table(good, names=names) == {(9, 0): {"shape": 1, "softmax": 0, "softmax_rows": 1},
                                                  (8, 0): {"shape": 0, "softmax": 1, "softmax_rows": 0}}
    with pytest.raises(tune.TuneError, match="sm_90 takes shape 5, which does not exist"):
        tune.arch_table(good.replace("{9, 0, 1, 0, 1}", "{9, 0, 5, 0, 1}"), names=names)
    with pytest.raises(tune.TuneError, match="sm_90 takes softmax 2, which does not exist"):
        tune.arch_table(good.replace("{9, 0, 1, 0, 1}", "{9, 0, 1, 2, 1}"), names=names)
    with pytest.raises(tune.TuneError, match="sm_90 takes softmax_rows 2, which does not exist"):
        tune.arch_table(good.replace("{9, 0, 1, 0, 1}", "{9, 0, 1, 0, 2}"), names=names)
    with pytest.raises(tune.TuneError, match="sm_80 twice"):
        tune.arch_table(good.replace("{9, 0, 1, 0, 1}", "{8, 0, 1, 0, 1}"), names=names)
    with pytest.raises(tune.TuneError, match=r"\{9, 0, 1, 0\} is not \{major, minor, shape, softmax, softmax_rows\}"):
        tune.arch_table(good.replace("{9, 0, 1, 0, 1}", "{9, 0, 1, 0}"), names=names)
    with pytest.raises(tune.TuneError, match=r"\{9, 0, kT256, 0, 1\} is not a row of numbers"):
        tune.arch_table(good.replace("{9, 0, 1, 0, 1}", "{9, 0, kT256, 0, 1}"), names=names)
    with pytest.raises(tune.TuneError, match=r"\{9, 0, -1, 0, 1\} is not a row of numbers"):
        tune.arch_table(good.replace("{9, 0, 1, 0, 1}", "{9, 0, -1, 0, 1}"), names=names)
    with pytest.raises(tune.TuneError, match="distinct"):
        tune.variant_names("shape", 'kLaunchShapeNames[2] = {"a", "a"};')
    entry = tune.table_entry(9, 0, {"shape": 1, "softmax": 0, "softmax_rows": 1}, names, "NVIDIA H200, 1.10x the floor")
    assert tune.arch_table("kArchVariants[] = {\n" + entry + "\n};", names=names) == {
        (9, 0): {"shape": 1, "softmax": 0, "softmax_rows": 1}}


def test_dry_run_and_the_error_without_a_gpu(capsys, tmp_path):
    assert tune.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan: 168 timings" in out and "sm_90 -> t256_f64_b4 + c1 + registers" in out
    if torch.cuda.is_available():
        return  # the real run is `make gpu-tune`'s, not a test's
    assert tune.main(["--no-build", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU is visible to torch" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
