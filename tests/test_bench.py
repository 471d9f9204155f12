"""Smoke test of benchmarks/bench.py: the quick run completes, its JSON has the documented structure
and every implementation agreed with the exact loss. Timings are not asserted: they depend on the
machine and its load."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _focal_importable() -> bool:
    try:
        from focal import sigmoid_focal_loss  # noqa: F401
    except ImportError:
        return False
    return True


def test_retinanet_anchor_counts():
    bench = _load_bench()
    # P3-P7 cells at 512 px: 64^2 + 32^2 + 16^2 + 8^2 + 4^2 = 5456; at 800 px: 100^2 + 50^2 + 25^2 + 13^2 + 7^2.
    assert bench.retinanet_anchor_count(512, 512) == 5456 * 9
    assert bench.retinanet_anchor_count(800, 800, images=2) == 2 * 13343 * 9
    assert bench.SHAPES["headline"].rows == 200_000


def test_agreement_check_catches_a_different_loss():
    import torch

    bench = _load_bench()
    problem = bench.make_problem(bench.Shape("tiny", 64, ""), torch.float32, torch.device("cpu"))
    exact = bench.exact_loss_and_grad(problem)
    torchvision_loss = bench.build_torchvision(problem)
    assert bench.check_agreement(torchvision_loss, problem, "fwdbwd", exact, fused=False)["ok"]

    def off_by_one_percent(x):
        return torchvision_loss(x) * 1.01

    check = bench.check_agreement(off_by_one_percent, problem, "fwdbwd", exact, fused=False)
    assert not check["ok"] and check["value_error"] > check["tolerance"] and check["grad_error"] > check["tolerance"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "quick.json", out / "quick.png"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(json_path), "--plot", str(png_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(json_path.read_text()), png_path


def test_quick_run_structure(quick_run):
    stdout, result, png_path = quick_run
    assert result["schema"] == 1
    assert {"cpu", "threads", "torch", "git_commit", "thp", "command"} <= set(result["machine"])
    assert result["loss"]["reduction"] == "sum"
    assert result["cases"], "no case was run"
    assert {c["mode"] for c in result["cases"]} == {"fwd", "fwdbwd"}
    for case in result["cases"]:
        rows = {r["key"]: r for r in case["rows"]}
        floor = rows["floor"]
        assert floor["median_s"] > 0 and floor["floor_ratio"] == pytest.approx(1.0)
        timed = {k for k, r in rows.items() if r.get("median_s")}
        assert set(case["ratios"]) == timed
        for key, row in rows.items():
            if row.get("median_s"):
                assert len(row["times_s"]) == case["rounds"]
                assert row["elements_per_s"] > 0 and row["gb_per_s"] > 0 and row["floor_ratio"] > 0
                assert case["ratios"][key][key] == pytest.approx(1.0)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "goals" in stdout
    for goal in result["goals"]:
        assert goal["status"] in {"PASS", "FAIL", "NOT RUN"}


def test_quick_run_agreement(quick_run):
    _, result, _ = quick_run
    assert result["agreement_ok"]
    for case in result["cases"]:
        for row in case["rows"]:
            if row["key"].startswith("floor") or not row["available"]:
                continue
            check = row["agreement"]
            assert check["ok"], (case["mode"], row["key"], check)
            assert check["value_error"] <= check["tolerance"]
            if case["mode"] == "fwdbwd":
                assert check["grad_error"] <= check["tolerance"]
            assert row["median_s"] > 0


def test_quick_run_covers_peers(quick_run):
    _, result, _ = quick_run
    available = {k for k, v in result["implementations"].items() if v["available"]}
    assert {"floor", "floor_out", "tv", "tv_compile", "reference"} <= available
    if _focal_importable():
        assert {"fused_ids", "fused_float"} <= available
    else:
        assert not {"fused_ids", "fused_float"} & available
        assert any("focal not importable" in note for note in result["notes"])
