"""Users can see the run: training curves as PNG (losses, learning rate, AP per evaluation), a final
summary table, and a TensorBoard log when the package is installed (one note line when it is not)."""

from __future__ import annotations

import builtins
import json
import os

import pytest
from PIL import Image

from examples.retinanet import train
from examples.retinanet.config import fast_config
from examples.retinanet.plots import summary_table

from .tiny_coco import write_coco

CONFIG = dict(backbone_width=0.25, fpn_channels=16, head_width=16)


def _options(tmp_path, **overrides):
    write_coco(tmp_path / "d", "train", sizes=((40, 40),) * 4)
    write_coco(tmp_path / "d", "val", sizes=((40, 40),) * 2)
    values = dict(output=str(tmp_path / "run"), data=str(tmp_path / "d"), image_size=32, batch_size=2, iters=4,
                  warmup_iters=0, log_every=2, eval_every=2, checkpoint_every=0, progress=False)
    values.update(overrides)
    return train.TrainOptions(**values)


def _without_tensorboard(monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.startswith("tensorboard") or name == "torch.utils.tensorboard":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


def test_curves_summary_and_ap_over_evaluations_without_tensorboard(tmp_path, monkeypatch, capsys):
    _without_tensorboard(monkeypatch)
    result = train.train(fast_config(**CONFIG), _options(tmp_path))
    out = capsys.readouterr().out
    assert out.count("note: TensorBoard log off (pip install tensorboard") == 1
    assert [e["iter"] for e in result["evaluations"]] == [2, 4]  # every 2 iterations, the last the final one
    run = tmp_path / "run"
    with Image.open(run / "training_curves.png") as image:
        assert image.size[0] > 600 and image.size[1] > 200
    table = (run / "summary.md").read_text()
    assert "| iterations | 4 |" in table and "| AP |" in table and table.strip() in out
    assert not (run / "tensorboard").exists()


def test_summary_table_lists_what_is_known():
    table = summary_table({"iterations": 3, "train_seconds": 1.5, "AP": 0.25, "world_size": 2})
    assert table.splitlines()[:2] == ["| metric | value |", "| --- | ---: |"]
    assert "| processes | 2 |" in table and "| AP | 0.2500 |" in table and "AP50" not in table


def test_tensorboard_log_when_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.train(fast_config(**CONFIG), _options(tmp_path))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_cls", "train/lr", "val/AP", "val/AP50"} <= tags
    assert [e.step for e in events.Scalars("val/AP")] == [2, 4]
    assert json.load(open(os.path.join(tmp_path, "run", "metrics.json")))["summary"]["iterations"] == 4
