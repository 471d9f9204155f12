"""ablate over several seeds and the report that merges ablation results: per-arm spread, table, plot."""

import json
import math
import os

import pytest

from examples.retinanet import ablate, ablation_report
from examples.retinanet.digits import DigitsParams, ensure_digits_dataset
from examples.retinanet.errors import InputError

TINY = DigitsParams(seed=3, num_train=16, num_val=4, image_size=48, min_digit_height=12, max_digit_height=20,
                    min_digits=1, max_digits=2)


def _row(arm, seed, ap, label=None):
    return {"arm": arm, "label": label or arm, "seed": seed, "AP": ap, "AP50": ap + 0.1, "AP75": ap / 2,
            "diverged": False, "iterations": 10}


def _write(path, rows, options=None):
    with open(path, "w") as f:
        json.dump({"rows": rows, "options": options or {}}, f)
    return str(path)


def test_summary_is_mean_and_sample_sd_per_arm():
    rows = [_row("fl", 1, 0.3), _row("alpha_ce", 0, 0.5), _row("fl", 0, 0.1), _row("alpha_ce", 1, 0.5)]
    summary = ablation_report.summarise(rows)
    assert [e["arm"] for e in summary] == ["fl", "alpha_ce"]
    fl, ce = summary
    assert fl["seeds"] == [0, 1] and fl["AP"] == [0.1, 0.3]
    assert fl["AP_mean"] == pytest.approx(0.2)
    assert fl["AP_sd"] == pytest.approx(math.sqrt(((0.1 - 0.2) ** 2 + (0.3 - 0.2) ** 2) / 1))
    assert fl["AP50_mean"] == pytest.approx(0.3)
    assert ce["AP_sd"] == 0.0
    one = ablation_report.summarise([_row("fl", 0, 0.4)])[0]
    assert one["AP_sd"] == 0.0 and one["AP_mean"] == 0.4
    table = ablation_report.markdown_table(summary)
    assert "| fl | 0, 1 | 0.100 / 0.300 | 0.200 ± 0.141 | 0.300 |" in table


def test_load_rows_merges_files_and_takes_the_seed_from_old_options(tmp_path):
    old = _write(tmp_path / "a.json", [{k: v for k, v in _row("fl", None, 0.2).items() if k != "seed"}], {"seed": 2})
    new = _write(tmp_path / "b.json", [_row("fl", 0, 0.3), _row("fl_g1", 0, 0.25)])
    rows = ablation_report.load_rows([old, new])
    assert [(r["arm"], r["seed"]) for r in rows] == [("fl", 2), ("fl", 0), ("fl_g1", 0)]


def test_load_rows_refuses_a_seed_counted_twice_and_bad_files(tmp_path):
    a = _write(tmp_path / "a.json", [_row("fl", 0, 0.3)])
    b = _write(tmp_path / "b.json", [_row("fl", 0, 0.3)])
    with pytest.raises(InputError, match="arm fl seed 0 is also in"):
        ablation_report.load_rows([a, b])
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(InputError, match="not an ablation.json"):
        ablation_report.load_rows([str(broken)])
    with pytest.raises(InputError, match="not an ablation.json"):
        ablation_report.load_rows([str(tmp_path / "missing.json")])


def test_report_command_writes_json_table_and_plot(tmp_path, capsys):
    rows = [_row(arm, seed, 0.1 * seed + 0.05 * i) for i, arm in enumerate(ablate.TABLE1_ARMS) for seed in (0, 1)]
    path = _write(tmp_path / "all.json", rows)
    out = tmp_path / "report" / "sweep"
    ablation_report.main([path, "--output", str(out), "--title", "test"])
    with open(f"{out}.json") as f:
        data = json.load(f)
    assert len(data["rows"]) == 18 and [e["arm"] for e in data["summary"]] == ablate.TABLE1_ARMS
    assert os.path.getsize(f"{out}.png") > 10_000
    assert "| fl_g5 | 0, 1 |" in open(f"{out}.md").read()
    assert "fl_g5" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        ablation_report.main([str(tmp_path / "nothing.json"), "--output", str(out)])
    assert exit_info.value.code == 2


def test_every_sweep_arm_is_an_ablate_arm_with_its_alpha_and_gamma():
    for arm, alpha in ablation_report.ALPHA_SWEEP.items():
        assert ablate.ARMS[arm][1]["focal_gamma"] == 0.0 and ablate.ARMS[arm][1]["focal_alpha"] == alpha
    for arm, (gamma, alpha) in ablation_report.GAMMA_SWEEP.items():
        assert ablate.ARMS[arm][1]["focal_gamma"] == gamma and ablate.ARMS[arm][1]["focal_alpha"] == alpha
    assert set(ablation_report.ALPHA_SWEEP) | set(ablation_report.GAMMA_SWEEP) | {"ce_no_prior"} == set(
        ablate.TABLE1_ARMS)


def test_ablate_runs_every_arm_for_every_seed(tmp_path):
    paths = ensure_digits_dataset(str(tmp_path / "data"), TINY)
    out = tmp_path / "abl"
    ablate.main(["--image-root", paths["train"][0], "--train-json", paths["train"][1], "--val-json",
                 paths["val"][1], "--image-size", "48", "--batch-size", "4", "--iters", "2", "--warmup-iters", "1",
                 "--backbone-width", "0.25", "--fpn-channels", "16", "--head-width", "16", "--no-progress",
                 "--threads", "1", "--arms", "fl", "ce_no_prior", "--seeds", "0", "1", "--output", str(out)])
    with open(out / "ablation.json") as f:
        data = json.load(f)
    assert [(r["arm"], r["seed"], r["iterations"]) for r in data["rows"]] == [
        ("fl", 0, 2), ("ce_no_prior", 0, 2), ("fl", 1, 2), ("ce_no_prior", 1, 2)]
    assert [e["seeds"] for e in data["summary"]] == [[0, 1], [0, 1]]
    for name in ("ablation.md", "ablation.png", "loss_curves.png", "seed1/fl/log.jsonl"):
        assert (out / name).exists(), name


def test_ablate_seeds_default_to_two_and_follow_seed_or_seeds(capsys):
    assert ablate.parse_arguments([]).seeds == [0, 1]
    assert ablate.parse_arguments(["--seed", "3"]).seeds == [3]
    args = ablate.parse_arguments(["--seeds", "4", "2", "--preset", "imbalance"])
    assert args.seeds == [4, 2] and args.seed == 4 and args.arms == ablate.TABLE1_ARMS
    with pytest.raises(SystemExit):
        ablate.parse_arguments(["--seed", "1", "--seeds", "1", "2"])
    assert "--seed and --seeds both" in capsys.readouterr().err


def test_ablate_refuses_repeated_seeds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--seeds", "0", "0"])
    assert exit_info.value.code == 2
    assert "--seeds must be distinct" in capsys.readouterr().err


def test_ablate_refuses_an_arm_named_twice(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--arms", "fl", "fl"])
    assert exit_info.value.code == 2
    assert "names an arm twice" in capsys.readouterr().err
