"""Checkpoints: a run interrupted and resumed ends bitwise equal to an uninterrupted one on the CPU;
writes are atomic; files load with weights_only=True; RNG states round-trip."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from examples.retinanet import checkpoint as ckpt
from examples.retinanet import train
from examples.retinanet.config import fast_config
from examples.retinanet.batches import InMemoryBatches
from examples.retinanet.errors import InputError

from .tiny_coco import write_coco

CONFIG = dict(backbone_width=0.25, fpn_channels=16, head_width=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return root, write_coco(root, sizes=((40, 40),) * 6)


def _options(root, name, **overrides):
    values = dict(output=str(root / name), train_json=data_path(root), image_size=32, batch_size=2, iters=7,
                  lr=0.02, warmup_iters=2, log_every=2, checkpoint_every=2, flip_prob=0.5, evaluate=False,
                  progress=False, threads=1, augment="digits")  # flips and augmentation resume exactly too
    values.update(overrides)
    return train.TrainOptions(**values)


def data_path(root) -> str:
    return os.path.join(str(root), "train.json")


class Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_is_bitwise_the_uninterrupted_one(data, monkeypatch):
    root, _ = data
    config = fast_config(**CONFIG)
    whole = train.train(config, _options(root, "whole"))

    original, calls = InMemoryBatches.next_batch, {"n": 0}

    def killed_at_step_6(self):  # like a kill after the iteration-4 checkpoint, mid-way through step 6
        calls["n"] += 1
        if calls["n"] == 6:
            raise Interrupt
        return original(self)

    monkeypatch.setattr(InMemoryBatches, "next_batch", killed_at_step_6)
    with pytest.raises(Interrupt):
        train.train(config, _options(root, "split"))
    monkeypatch.setattr(InMemoryBatches, "next_batch", original)
    latest = os.path.join(root, "split", ckpt.LATEST)
    assert torch.load(latest, weights_only=True)["iteration"] == 4
    # A different model config on the command line: the checkpoint's config wins.
    resumed = train.train(fast_config(**{**CONFIG, "head_width": 32}), _options(root, "split", resume="auto"))

    assert resumed["iterations"] == whole["iterations"] == 7
    for (name, a), b in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed["history"] == [{**h, "seconds": r["seconds"]} for h, r in zip(whole["history"], resumed["history"])]
    assert not os.path.exists(latest)  # the final checkpoint supersedes it
    final = ckpt.load_training_checkpoint(os.path.join(root, "split", ckpt.FINAL))
    assert final["schedule"]["iteration"] == 7 and final["data"] == whole_data_position(root)
    with open(os.path.join(root, "split", "log.jsonl")) as f:
        assert [eval_line(line)["iter"] for line in f] == [2, 4, 6, 7]


def whole_data_position(root) -> dict:
    return ckpt.load_training_checkpoint(os.path.join(root, "whole", ckpt.FINAL))["data"]


def eval_line(line: str) -> dict:
    import json

    return json.loads(line)


def test_resume_auto_without_a_checkpoint_starts_fresh_and_resume_path_must_exist(data, capsys):
    root, _ = data
    result = train.train(fast_config(**CONFIG), _options(root, "fresh", iters=1, resume="auto"))
    assert result["iterations"] == 1
    assert "no checkpoint in" in capsys.readouterr().out
    with pytest.raises(InputError, match="--resume checkpoint .*nothing.pth does not exist"):
        train.train(fast_config(**CONFIG), _options(root, "fresh", resume=str(root / "nothing.pth")))


def test_resume_refuses_another_batch_size_or_weights_only_file(data):
    root, _ = data
    train.train(fast_config(**CONFIG), _options(root, "short", iters=2))
    final = os.path.join(root, "short", ckpt.FINAL)
    with pytest.raises(InputError, match="trained with --batch-size 2, this run has 3"):
        train.train(fast_config(**CONFIG), _options(root, "short", iters=3, batch_size=3, resume=final))
    weights = os.path.join(root, "weights.pth")
    state = torch.load(final, weights_only=True)
    torch.save({"config": state["config"], "model": state["model"]}, weights)
    with pytest.raises(InputError, match="holds weights only"):
        train.train(fast_config(**CONFIG), _options(root, "short", iters=3, resume=weights))


def test_save_is_atomic_when_interrupted_mid_write(tmp_path, monkeypatch):
    path = str(tmp_path / "model_last.pth")
    ckpt.save_atomic({"iteration": 1, "w": torch.ones(3)}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"iteration": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert ckpt.load_file(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["model_last.pth"]  # no temporary file left behind


def test_training_checkpoint_loads_with_weights_only_and_rng_states_round_trip(data):
    root, _ = data
    train.train(fast_config(**CONFIG), _options(root, "rng", iters=1))
    state = torch.load(os.path.join(root, "rng", ckpt.FINAL), weights_only=True)  # would raise on any object
    assert {"model", "optimizer", "schedule", "data", "rng", "config", "category_ids"} <= set(state)
    assert isinstance(state["config"], dict) and state["category_ids"] == [1, 2]

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = ckpt.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.set_rng_state(torch.load(_saved(tmp := root / "rng.pth", saved), weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    assert tmp.exists()


def _saved(path, payload) -> str:
    torch.save(payload, path)
    return str(path)


def test_a_killed_process_resumes_bitwise(tmp_path):
    """SIGKILL, not an exception: the process dies wherever it is (possibly inside a checkpoint write)."""
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO_ROOT
    from .tiny_coco import TINY_MODEL_FLAGS

    path = write_coco(tmp_path / "d", "train", sizes=((40, 40),) * 6)
    flags = ["--train-json", path, "--image-size", "32", "--batch-size", "2", "--iters", "10", "--lr", "0.02",
             "--warmup-iters", "2", "--log-every", "2", "--checkpoint-every", "1", "--flip-prob", "0.5",
             "--threads", "1", "--no-evaluate", "--no-progress", "--no-tensorboard", *TINY_MODEL_FLAGS]
    killed = str(tmp_path / "killed")
    # The child sleeps in every batch so that the kill lands mid-run, and waits at its eighth batch
    # until killed, so that it cannot end first; the training code is untouched.
    child = ("import sys, time\nfrom examples.retinanet import train\nfrom examples.retinanet.batches import "
             "InMemoryBatches\nnext_batch, calls = InMemoryBatches.next_batch, []\n"
             "def slow(self):\n    calls.append(1)\n    time.sleep(0.3 if len(calls) < 8 else 3600)\n"
             "    return next_batch(self)\n"
             "InMemoryBatches.next_batch = slow\ntrain.main(sys.argv[1:])")
    latest = os.path.join(killed, ckpt.LATEST)
    process = subprocess.Popen([sys.executable, "-c", child, *flags, "--output", killed], cwd=REPO_ROOT)
    try:
        train.main(flags + ["--output", str(tmp_path / "whole")])  # while the child starts
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if os.path.exists(latest) and torch.load(latest, weights_only=True)["iteration"] >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    stopped_at = torch.load(latest, weights_only=True)["iteration"]  # the last complete write loads
    assert 3 <= stopped_at < 10
    assert not os.path.exists(os.path.join(killed, ckpt.FINAL))

    train.main(flags + ["--output", killed, "--resume", "auto"])
    resumed = torch.load(os.path.join(killed, ckpt.FINAL), weights_only=True)
    whole = torch.load(os.path.join(tmp_path, "whole", ckpt.FINAL), weights_only=True)
    assert resumed["iteration"] == whole["iteration"] == 10
    for name, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
