"""benchmarks/bench_detectors.py: a quick run writes its JSON and table, and a row that disagrees with
stock is refused before it is timed. Timings are never asserted (machine and load)."""

import json

import pytest
import torch

import benchmark_scripts

detectors = benchmark_scripts.load("bench_detectors")


def test_quick_run_writes_three_checked_rows(tmp_path, capsys):
    out_json, out_md = tmp_path / "run.json", tmp_path / "run.md"
    detectors.main(["--quick", "--models", "retinanet", "--rounds", "1", "--json", str(out_json),
                    "--markdown", str(out_md)])
    report = json.loads(out_json.read_text())
    (case,) = report["cases"]
    assert (case["model"], case["size"], case["batch"], case["part"]) == ("retinanet", 128, 1, "loss")
    assert set(case["rows"]) == {"stock", "swap", "fused"} and case["max_rel_diff"] <= 1e-4
    assert all(row["median_ms"] > 0 and row["rounds"] == 1 for row in case["rows"].values())
    assert report["machine"]["threads"] == torch.get_num_threads() and "command" in report["machine"]
    table = out_md.read_text()
    assert table.count("| retinanet | 128 | 1 | loss |") == 3 and "x swap" in table
    # on the CPU, the CPU time of each call beside its wall time, and the ratios of both
    assert all(row["cpu_ms"] > 0 for row in case["rows"].values()) and "x swap (CPU)" in table
    assert case["rows"]["fused"]["speedup_vs_swap_cpu"] == pytest.approx(
        case["rows"]["swap"]["cpu_ms"] / case["rows"]["fused"]["cpu_ms"])


def test_a_row_that_disagrees_is_refused():
    loss = torch.tensor(1.0)
    steps = {"stock": lambda: {"loss": loss}, "swap": lambda: {"loss": loss}, "fused": lambda: {"loss": loss * 1.01}}
    with pytest.raises(RuntimeError, match="rows disagree"):
        detectors.check_rows(steps)


def test_the_swap_is_torchvisions_module_level_name_and_is_undone():
    import torchvision.models.detection.retinanet as retinanet

    import focal

    stock = retinanet.sigmoid_focal_loss
    with detectors.swapped_focal_loss(True):
        assert retinanet.sigmoid_focal_loss is focal.sigmoid_focal_loss
    assert retinanet.sigmoid_focal_loss is stock


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        detectors.parse_args(["--sizes", "16"])
