"""Smoke test of benchmarks/bench.py: the quick run completes, its JSON has the documented structure
and every implementation agreed with the exact loss; without the compiled extension the fused rows
are skipped with a note; the goals are evaluated as documented. Timings are not asserted: they
depend on the machine and its load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmark_scripts

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "benchmarks" / "bench.py"


def _load_bench():
    return benchmark_scripts.load("bench")


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
    assert bench.SHAPES["paper"].rows == 8 * 120_000
    assert "paper" not in bench.DEFAULT_SHAPES["cpu"] and "paper" in bench.DEFAULT_SHAPES["cuda"]
    assert bench.parse_args([]).shapes == list(bench.DEFAULT_SHAPES["cpu"])


def test_agreement_check_catches_a_different_loss():
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
    assert result["schema"] == 1 and result["complete"] is True
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
        assert any("focal cannot run on cpu" in note for note in result["notes"])


# Runs bench.py as a script in a process where `import focal._C` fails, as in an unbuilt checkout,
# whether or not this checkout is built: the library itself is left as it is.
WITHOUT_EXTENSION = """
import importlib.abc, runpy, sys

class HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "focal._C":
            raise ImportError("focal._C hidden by the test")
        return None

sys.meta_path.insert(0, HideExtension())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_without_extension(*args, timeout=120):
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION, str(BENCH), *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_unbuilt_checkout_skips_fused_rows_with_a_note(tmp_path):
    json_path = tmp_path / "unbuilt.json"
    proc = _run_without_extension("--quick", "--impls", "fused_ids", "fused_float", "tv", "--modes", "fwdbwd",
                                  "--budget", "0.05", "--json", json_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(json_path.read_text())
    assert result["agreement_ok"]
    for key in ("fused_ids", "fused_float"):
        impl = result["implementations"][key]
        assert not impl["available"] and "focal._C could not be loaded" in impl["note"]
    assert sum("skipped focal" in line and "focal._C hidden by the test" in line for line in proc.stdout.splitlines()) == 2
    (case,) = result["cases"]
    rows = {r["key"]: r for r in case["rows"]}
    assert set(rows) == {"floor", "tv"} and rows["tv"]["median_s"] > 0 and rows["tv"]["agreement"]["ok"]

    required = _run_without_extension("--quick", "--impls", "fused_ids", "--modes", "fwd", "--budget", "0.05",
                                      "--require-fused")
    assert required.returncode == 1 and "--require-fused, but fused_ids could not run" in required.stderr


def _case(bench, shape, dtype, seconds: dict):
    """A measured case as run_case returns it, with the given median times and real byte counts."""
    problem = bench.make_problem(bench.Shape(shape, 16, ""), getattr(torch, dtype), torch.device("cpu"))
    rows = [{"key": k, "median_s": t, "bytes": bench.bytes_moved(bench.IMPLS[k], problem, "fwdbwd")} for k, t in seconds.items()]
    ratios = {a: {b: seconds[a] / seconds[b] for b in seconds} for a in seconds}
    return {"mode": "fwdbwd", "dtype": dtype, "shape": {"name": shape}, "rows": rows, "ratios": ratios}


def test_cuda_goals_use_the_bytes_ratio_and_both_shapes():
    bench = _load_bench()
    c = bench.NUM_CLASSES
    # Per row of 80 logits: torch.compile(torchvision) reads logits, one-hot targets and the keep mask
    # and writes the gradient; the fused op reads logits and one int64 class id and writes the gradient.
    fp32_ratio = (3 * c * 4 + 4) / (2 * c * 4 + 8)
    bf16_ratio = (3 * c * 2 + 2) / (2 * c * 2 + 8)
    cases = [
        _case(bench, "headline", "float32", {"floor": 1.0, "fused_ids": 1.2, "tv_compile": 1.2 * fp32_ratio * 1.01}),
        _case(bench, "headline", "bfloat16", {"floor": 1.0, "fused_ids": 1.3, "tv_compile": 1.3 * bf16_ratio * 0.99}),
        _case(bench, "paper", "float32", {"floor": 1.0, "fused_ids": 1.25, "tv_compile": 5.0}),
    ]
    goals = {(g["shape"], g["dtype"], g["metric"]): g for g in bench.evaluate_goals(cases, "cuda", threads=16)}
    assert set(goals) == {(s, d, m) for s in ("headline", "paper") for d in ("float32", "bfloat16")
                          for m in ("floor_ratio", "speedup")}
    assert goals["headline", "float32", "speedup"]["threshold"] == pytest.approx(fp32_ratio)
    assert goals["headline", "bfloat16", "speedup"]["threshold"] == pytest.approx(bf16_ratio)
    assert [goals["headline", "float32", m]["status"] for m in ("floor_ratio", "speedup")] == ["PASS", "PASS"]
    assert [goals["headline", "bfloat16", m]["status"] for m in ("floor_ratio", "speedup")] == ["FAIL", "FAIL"]
    assert goals["paper", "float32", "floor_ratio"]["status"] == "PASS"  # 1.25x is within "<= 1.25x"
    assert goals["paper", "bfloat16", "floor_ratio"]["status"] == "NOT RUN"
    assert all(not g.get("note", "").endswith("threads)") for g in goals.values())


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible GPU")


@requires_gpu
def test_bench_on_cuda_reports_device_and_host_time(tmp_path):
    json_path = tmp_path / "cuda.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cuda", "--shapes", "small", "--dtype", "float32", "bfloat16",
         "--modes", "fwdbwd", "--impls", "fused_ids", "tv", "--budget", "0.05", "--json", str(json_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(json_path.read_text())
    assert result["machine"]["gpu"] and result["machine"]["compute_capability"]
    for case in result["cases"]:
        for row in case["rows"]:
            if row.get("median_s"):
                assert row["peak_memory_bytes"] > 0 and row["host_median_s"] > 0
                assert 0.0 <= row["launch_hidden_fraction"] <= 1.0


# --------------------------------------------------------------------------------------------------
# benchmarks/sanitize_cases.py: the cases compute-sanitizer runs (make gpu-check)

SANITIZE = REPO_ROOT / "benchmarks" / "sanitize_cases.py"


def _load_sanitize_cases():
    return benchmark_scripts.load("sanitize_cases")


def test_sanitize_cases_reach_every_path():
    sc = _load_sanitize_cases()
    cases = list(sc.cases())
    assert {(d, t, r) for _, d, t, _, r, _, _ in cases} == {
        (d, t, r) for d in sc.DTYPES for t in sc.TARGETS for r in sc.REDUCTIONS}
    assert {g for *_, g, _ in cases} == set(sc.GAMMAS) and {w for _, _, _, w, *_ in cases} == set(sc.WEIGHTS)
    for dtype in sc.DTYPES:
        mine = [c for c in cases if c[1] == dtype]
        assert any(c[6] for c in mine), "an unaligned case"
        assert any(c[0][0] * c[0][1] == 0 for c in mine), "an empty case"
        # More 16-byte packs than 132 SMs x 4 blocks x 256 threads: a second trip round the loop.
        packs = max(c[0][0] * c[0][1] for c in mine) * dtype.itemsize // 16
        assert packs > 132 * 4 * 256
        assert any(c[0][0] * c[0][1] * dtype.itemsize % 16 for c in mine), "a partial last pack"
    x = torch.randn(37, 13)
    unaligned = sc.place(x, "cpu", unaligned=True)
    assert unaligned.data_ptr() % 16 != 0 and unaligned.is_contiguous() and unaligned.is_leaf
    assert torch.equal(unaligned.detach(), x) and unaligned.requires_grad


def test_sanitize_cases_compare_catches_a_difference():
    sc = _load_sanitize_cases()
    loss, grad = torch.rand(5, 3), torch.rand(5, 3)
    assert sc.compare("same", (loss, grad), (loss.clone(), grad.clone()), torch.float32) is None
    assert "grad differs" in sc.compare("off", (loss, grad), (loss, grad * 1.001), torch.float32)
    assert "loss is torch.float64" in sc.compare("dtype", (loss, grad), (loss.double(), grad), torch.float32)
    # bfloat16 outputs are compared at bfloat16's rounding, not float32's.
    assert sc.compare("bf16", (loss, grad), (loss * (1 + 2**-9), grad), torch.bfloat16) is None


@requires_gpu
def test_sanitize_cases_pass_on_cuda():
    proc = subprocess.run([sys.executable, str(SANITIZE)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    count = len(list(_load_sanitize_cases().cases()))
    assert f"{count} of {count} cases agree with the CPU op" in proc.stdout
