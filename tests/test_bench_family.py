"""Smoke test of benchmarks/bench_family.py: the quick run completes for every loss, each row agreed
with the float64 reference before it was timed, and the JSON and plot are written. Timings are not
asserted: they depend on the machine and its load."""

from __future__ import annotations

import json

import pytest
import torch

import benchmark_scripts


@pytest.fixture(scope="module")
def bench_family():
    return benchmark_scripts.load("bench_family")


def test_quick_run_checks_every_row_and_writes_json_and_plot(bench_family, tmp_path):
    out, png = tmp_path / "family.json", tmp_path / "family.png"
    assert bench_family.main(["--quick", "--threads", "1", "--budget", "0", "--json", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    assert [c["loss"] for c in result["cases"]] == list(bench_family.LOSSES)
    for case in result["cases"]:
        keys = [r["key"] for r in case["rows"]]
        assert keys[:4] == ["floor", "fused_ids", "fused_dense", "reference"]
        for row in case["rows"]:
            assert row["median_s"] > 0 and row["floor_ratio"] > 0
            if row["key"] != "floor":
                assert row["agreement"]["ok"], row
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("loss", ["star", "quality", "varifocal"])
def test_problem_forms_describe_the_same_targets(bench_family, loss):
    """The class-id form and the dense form of a problem are the same loss (the fused op on each)."""
    p = bench_family.make_problem(500, torch.float64, torch.device("cpu"))
    rows = bench_family.rows_for(loss, compile_reference=False)
    ids_loss = rows["fused_ids"][1](p)(p.logits)
    dense_loss = rows["fused_dense"][1](p)(p.logits)
    ref_loss = rows["reference"][1](p)(p.logits)
    torch.testing.assert_close(ids_loss, dense_loss)
    torch.testing.assert_close(ids_loss, ref_loss)
    assert int(p.normalizer) == int((p.ids >= 0).sum())


def test_goals_are_judged_on_the_headline_class_id_row(bench_family):
    case = {"loss": "quality", "dtype": "float32", "shape": {"name": "headline"},
            "rows": [{"key": "fused_ids", "floor_ratio": 1.1}]}
    slow = {**case, "dtype": "bfloat16", "rows": [{"key": "fused_ids", "floor_ratio": 1.4}]}
    other_shape = {**case, "shape": {"name": "small"}}
    goals = bench_family.evaluate_goals([case, slow, other_shape], "cpu", 2)
    assert [g["status"] for g in goals] == ["PASS", "FAIL"]
    assert bench_family.evaluate_goals([case], "cuda", 2) == []


def test_bench_py_family_flag_runs_both_family_benchmarks(capsys):
    """`bench.py --family` follows its own cases with bench_family.py and, on the CPU, bench_softmax.py."""
    import argparse

    bench = benchmark_scripts.load("bench")
    status = bench.run_family(argparse.Namespace(device="cpu", threads=1, quick=True))
    out = capsys.readouterr().out
    assert status == 0
    assert "FL* (gamma 2, beta 1)" in out and "varifocal loss" in out and "softmax focal loss" in out
