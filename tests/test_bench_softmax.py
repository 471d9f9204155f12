"""benchmarks/bench_softmax.py: a quick run times every row, and checks each against the exact loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_softmax  # noqa: E402


def test_quick_run(tmp_path):
    out = tmp_path / "q.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_softmax.py"), "--quick", "--threads", "1",
                             "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    assert {"softmax", "focal", "cross_entropy", "reference"} <= set(case["median_s"])
    assert case["x_floor"]["softmax"] == 1.0 and case["x_cross_entropy"]["cross_entropy"] == 1.0
    assert all(check["ok"] for check in case["agreement"].values())
    assert "focal" in case["agreement"] and "cross_entropy" not in case["agreement"]


def test_agreement_check_catches_a_different_loss():
    x, t = bench_softmax.make_problem((500, 21), torch.bfloat16)
    want = bench_softmax.exact(x, t)
    rows = bench_softmax.loss_rows(t)
    assert bench_softmax.agreement(rows["focal"], x, t, want, 1e-2)["ok"]  # ties included: bf16 logits
    assert not bench_softmax.agreement(rows["cross_entropy"], x, t, want, 1e-2)["ok"]  # gamma 0: another loss
