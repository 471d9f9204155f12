"""Data-parallel training on the CPU with gloo: 2 processes keep identical parameters that match one
process training on the same global batch; evaluation is gathered to rank 0; only rank 0 writes files;
the torchrun command of the README works."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

import background
from examples.retinanet import checkpoint as ckpt
from examples.retinanet.batches import InMemoryBatches
from examples.retinanet import distributed, train
from examples.retinanet.config import fast_config
from examples.retinanet.errors import InputError
from examples.retinanet.evaluate import evaluate_model

from .tiny_coco import TINY_MODEL_FLAGS, write_coco

# GroupNorm in the backbone: BatchNorm statistics would depend on how the batch is split.
CONFIG = dict(backbone_width=0.25, fpn_channels=16, head_width=16, backbone_norm="gn")
ITERS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _options(root, output: str) -> train.TrainOptions:
    return train.TrainOptions(output=output, train_json=os.path.join(root, "train.json"),
                              val_json=os.path.join(root, "val.json"), image_size=32, batch_size=4, iters=ITERS,
                              lr=0.05, warmup_iters=0, log_every=2, checkpoint_every=2, flip_prob=0.5,
                              augment="digits", progress=False, threads=1, device="cpu")


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    with distributed.process_group("cpu", timeout=datetime.timedelta(seconds=120)) as ctx:
        assert ctx.world_size == world_size and ctx.rank == rank
        result = train.train(fast_config(**CONFIG), _options(root, os.path.join(root, "ddp")))
        state = {name: p.detach().clone() for name, p in result["model"].state_dict().items()}
        torch.save({"state": state, "stats": result["stats"]}, os.path.join(root, f"rank{rank}.pt"))
        # Interrupted on every process at step 3 (after the iteration-2 checkpoint), then resumed.
        split = _options(root, os.path.join(root, "ddp_split"))
        original, calls = InMemoryBatches.next_batch, {"n": 0}

        def interrupted(self):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return original(self)

        InMemoryBatches.next_batch = interrupted
        try:
            train.train(fast_config(**CONFIG), split)
        except KeyboardInterrupt:
            pass
        InMemoryBatches.next_batch = original
        resumed = train.train(fast_config(**CONFIG), dataclasses.replace(split, resume="auto"))
        state = {name: p.detach().clone() for name, p in resumed["model"].state_dict().items()}
        torch.save({"state": state}, os.path.join(root, f"rank{rank}_resumed.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_coco(root, "train", sizes=((40, 40),) * 8, categories=(1, 2))
    write_coco(root, "val", sizes=((40, 40),) * 3, categories=(1, 2))
    mp.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    single = train.train(fast_config(**CONFIG), _options(str(root), str(root / "single")))
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return root, ranks, single


def test_ranks_stay_identical_and_match_one_process_on_the_global_batch(runs):
    _, ranks, single = runs
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    reference, initial = single["model"].state_dict(), build_initial_state()
    changed = 0
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5, msg=name)
        changed += not torch.equal(value, initial[name])
    assert changed > 10  # the comparison is of trained weights, not of the initialisation


def build_initial_state() -> dict:
    torch.manual_seed(0)
    from examples.retinanet.config import build_model

    return build_model(fast_config(**CONFIG, num_classes=2)).state_dict()


def test_interrupted_and_resumed_ranks_end_bitwise_as_the_uninterrupted_run(runs):
    root, ranks, _ = runs
    for rank in range(2):
        resumed = torch.load(root / f"rank{rank}_resumed.pt", weights_only=True)["state"]
        for name, value in ranks[rank]["state"].items():
            assert torch.equal(value, resumed[name]), (rank, name)
    assert json.load(open(root / "ddp_split" / "metrics.json"))["summary"]["iterations"] == ITERS


def test_logged_losses_are_the_global_batch_losses(runs):
    root, _, _ = runs
    history = [json.loads(line) for line in open(root / "ddp" / "log.jsonl")]
    single = [json.loads(line) for line in open(root / "single" / "log.jsonl")]
    assert [h["iter"] for h in history] == [s["iter"] for s in single] == [2, 4]
    for h, s in zip(history, single):
        assert h["loss_cls"] == pytest.approx(s["loss_cls"], rel=1e-4)
        assert h["loss_box"] == pytest.approx(s["loss_box"], rel=1e-4)


def test_global_normalizer_divides_the_global_count_by_the_process_count(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(0).add_(10.0))  # as if all ranks summed to 10
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert distributed.global_normalizer(torch.tensor(3.0)).item() == 5.0
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(0))
    assert distributed.global_normalizer(torch.tensor(0.0)).item() == 0.5  # at least one positive overall


def test_evaluation_is_gathered_to_rank_0_and_only_rank_0_writes(runs):
    root, ranks, _ = runs
    assert ranks[1]["stats"] is None and ranks[0]["stats"]["num_detections"] > 0
    model = ckpt.load_training_checkpoint(str(root / "ddp" / ckpt.FINAL))
    from examples.retinanet.evaluate import load_checkpoint

    trained, _ = load_checkpoint(str(root / "ddp" / ckpt.FINAL))
    whole = evaluate_model(trained, str(root), str(root / "val.json"), image_size=32)
    assert whole["num_detections"] == ranks[0]["stats"]["num_detections"]  # every val image, once
    assert whole["AP"] == pytest.approx(ranks[0]["stats"]["AP"])
    assert model["world_size"] == 2 and len(model["rng"]) == 2
    files = set(os.listdir(root / "ddp")) - {"tensorboard"}  # present when the package is installed
    assert files == {"log.jsonl", "metrics.json", "model_final.pth", "summary.md", "training_curves.png"}


def _torchrun(folder):
    """The README's torchrun command on two processes, over a tiny dataset written into ``folder``."""
    write_coco(folder / "d", "train", sizes=((40, 40),) * 4)
    write_coco(folder / "d", "val", sizes=((40, 40),) * 2)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            "-m", "examples.retinanet.train", "--data", str(folder / "d"), "--device", "cpu", "--threads", "1",
            "--image-size", "32", "--batch-size", "4", "--iters", "2", "--warmup-iters", "0", "--backbone-norm", "gn",
            "--output", str(folder / "run"), "--no-progress", *TINY_MODEL_FLAGS]


TORCHRUN = background.Job(_torchrun)


@pytest.mark.background(TORCHRUN)
def test_torchrun_command_line():
    done = TORCHRUN.result(timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.load(open(done.folder / "run" / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["summary"]["iterations"] == 2
    assert done.stdout.count('"iterations": 2') == 1  # the summary is printed by rank 0 only


def test_sync_bn_on_cpu_is_refused():
    assert distributed.context().world_size == 1
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, sync_batchnorm=True, device=torch.device("cpu")) is model  # one process
    with pytest.raises(InputError, match="--sync-bn needs CUDA"):
        _refuse_sync_bn_in_a_group()


def _refuse_sync_bn_in_a_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        # a world of 1 is not wrapped; call the check the way a real group of 2 would reach it
        from unittest import mock

        with mock.patch.object(distributed, "context", lambda: distributed.Context(0, 2, 0)):
            distributed.wrap(build_model_for_wrap(), True, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def build_model_for_wrap():
    from examples.retinanet.config import build_model

    return build_model(fast_config(**CONFIG))
