"""Smoke run on tiny images: training reduces the loss, evaluation runs, inference writes a PNG."""

import dataclasses
import json
import os

import pytest
import torch
from PIL import Image

from examples.retinanet import evaluate, infer
from examples.retinanet.config import fast_config
from examples.retinanet.batches import InMemoryBatches, StreamingBatches, build_batches
from examples.retinanet.data import CocoDetection, build_transform
from examples.retinanet.digits import DigitsParams, ensure_digits_dataset
from examples.retinanet.train import TrainOptions, lr_factor, train

TINY = DigitsParams(seed=1, num_train=32, num_val=4, image_size=48, min_digit_height=12, max_digit_height=20,
                    min_digits=1, max_digits=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    paths = ensure_digits_dataset(str(root / "data"), TINY)
    options = TrainOptions(output=str(root / "run"), train_json=paths["train"][1], val_json=paths["val"][1],
                           image_root=paths["train"][0], image_size=48, batch_size=8, iters=30, lr=0.01,
                           warmup_iters=5, log_every=5, checkpoint_every=0, progress=False)
    config = fast_config(backbone_width=0.25, fpn_channels=16, head_width=16)
    torch.manual_seed(0)
    result = train(config, options)
    return root, paths, options, result


def test_training_reduces_the_loss(trained):
    _, _, options, result = trained
    history = result["history"]
    assert result["iterations"] == 30 and len(history) == 6
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    with open(os.path.join(options.output, "log.jsonl")) as f:
        assert len(f.readlines()) == 6


def test_evaluation_runs_and_reports_coco_stats(trained):
    root, paths, options, result = trained
    stats = result["stats"]
    assert set(evaluate.STAT_NAMES) <= set(stats)
    assert all(-1.0 <= stats[name] <= 1.0 for name in evaluate.STAT_NAMES)
    model, checkpoint = evaluate.load_checkpoint(os.path.join(options.output, "model_final.pth"))
    assert checkpoint["iteration"] == 30 and checkpoint["image_size"] == 48
    again = evaluate.evaluate_model(model, *paths["val"], image_size=48)
    assert again["AP"] == pytest.approx(stats["AP"])


def test_inference_writes_json_and_png(trained, tmp_path):
    root, paths, options, _ = trained
    image = os.path.join(paths["val"][0], "val", "000000.png")
    out = tmp_path / "infer"
    infer.main([image, "--checkpoint", os.path.join(options.output, "model_final.pth"), "--output", str(out),
                "--score-threshold", "0.0", "--zoom", "2"])
    with Image.open(out / "000000.png") as drawn:
        assert drawn.size == (96, 96)
    with open(out / "detections.json") as f:
        (record,) = json.load(f)
    assert record["file"] == image and len(record["boxes"]) == len(record["scores"]) > 0
    category_ids = sorted(c["id"] for c in json.load(open(paths["val"][1]))["categories"])
    assert category_ids == list(range(1, 11))  # the digits' ids: label 0 is category 1
    assert record["category_ids"] == [category_ids[label] for label in record["labels"]]


def test_evaluate_reports_the_held_out_style_beside_the_val_split(trained, tmp_path):
    root, _, options, _ = trained
    checkpoint = torch.load(os.path.join(options.output, "model_final.pth"), weights_only=True)
    # As if trained on the built-in digits: the generator's parameters and folder are recorded.
    checkpoint.update(digits_params=dataclasses.asdict(TINY), options={"data_root": str(root / "data")})
    path = str(tmp_path / "digits.pth")
    torch.save(checkpoint, path)
    out = tmp_path / "stats.json"
    evaluate.main(["--checkpoint", path, "--held-out-style", "--threads", "1", "--output", str(out)])
    with open(out) as f:
        stats = json.load(f)
    assert set(stats) == {"val", "held_out_style", "held_out_over_val"}
    with open(root / "data-heldout" / "params.json") as f:
        assert json.load(f) == {**dataclasses.asdict(TINY), "style": "heldout", "num_train": 0}
    assert stats["val"]["AP"] == pytest.approx(evaluate.evaluate_model(
        evaluate.load_checkpoint(path)[0], str(root / "data"), str(root / "data" / "val.json"), 48)["AP"])
    with pytest.raises(SystemExit):  # a checkpoint of other data has no held-out style
        evaluate.main(["--checkpoint", os.path.join(options.output, "model_final.pth"), "--held-out-style"])


def test_in_memory_batches_cover_an_epoch_and_flip_boxes(trained):
    _, paths, _, _ = trained
    dataset = CocoDetection(*paths["train"], build_transform(48, train=False))
    batches = InMemoryBatches(dataset, batch_size=8)
    seen = set()
    for _ in range(4):
        images, targets = batches.next_batch()
        assert images.shape == (8, 3, 48, 48) and images.dtype == torch.uint8
        seen.update(t["image_id"] for t in targets)
    assert len(seen) == 32
    flipped = InMemoryBatches(dataset, batch_size=32, flip_prob=1.0)
    images, targets = flipped.next_batch()
    position = {t["image_id"]: i for i, t in enumerate(batches.targets)}
    for image, target in zip(images, targets):
        i = position[target["image_id"]]
        torch.testing.assert_close(target["boxes"][:, 0], 48 - batches.targets[i]["boxes"][:, 2])
        torch.testing.assert_close(target["boxes"][:, 1::2], batches.targets[i]["boxes"][:, 1::2])
        assert torch.equal(image, batches.images[i].flip(-1))


def test_learning_rate_schedule():
    options = TrainOptions(warmup_iters=100, warmup_factor=0.001, lr_steps=(2 / 3, 8 / 9), warmup_max_fraction=0.1)
    assert lr_factor(0.0, 0, options) == pytest.approx(0.001)
    assert lr_factor(0.01, 50, options) == pytest.approx(0.5005)
    assert lr_factor(0.5, 1000, options) == 1.0
    assert lr_factor(0.7, 1000, options) == pytest.approx(0.1)
    assert lr_factor(0.9, 1000, options) == pytest.approx(0.01)
    # a short run ends its warm-up at warmup_max_fraction of the run at the latest
    assert lr_factor(0.1, 10, options) == 1.0


def test_in_memory_batches_shard_the_global_batch_like_distributed_sampler(trained):
    _, paths, _, _ = trained
    dataset = CocoDetection(*paths["train"], build_transform(48, train=False))
    one = InMemoryBatches(dataset, batch_size=12, seed=3)
    shards = [InMemoryBatches(dataset, batch_size=4, seed=3, rank=r, world_size=3) for r in range(3)]
    assert one.batches_per_epoch == shards[0].batches_per_epoch == 2  # 32 images, drop_last
    for _ in range(5):  # across epoch boundaries
        whole = sorted(t["image_id"] for t in one.next_batch()[1])
        parts = [t["image_id"] for shard in shards for t in shard.next_batch()[1]]
        assert sorted(parts) == whole and len(set(parts)) == 12
    assert one.state_dict() == {"epoch": 2, "position": 1} == shards[2].state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_batches_are_the_in_memory_batches_and_resume_alike(trained, workers):
    _, paths, _, _ = trained
    dataset = CocoDetection(*paths["train"], build_transform(48, train=False))
    memory = InMemoryBatches(dataset, batch_size=6, flip_prob=0.5, seed=2, augment="digits")
    stream = StreamingBatches(dataset, batch_size=6, flip_prob=0.5, seed=2, workers=workers, augment="digits")
    for step in range(7):  # 5 batches per epoch: crosses an epoch boundary
        (a, ta), (b, tb) = memory.next_batch(), stream.next_batch()
        assert torch.equal(a, b), step
        assert [t["image_id"] for t in ta] == [t["image_id"] for t in tb]
        for x, y in zip(ta, tb):
            torch.testing.assert_close(x["boxes"], y["boxes"], rtol=0, atol=0)
        if step == 2:
            state = stream.state_dict()
    resumed = StreamingBatches(dataset, batch_size=6, flip_prob=0.5, seed=2, workers=workers, augment="digits")
    resumed.load_state_dict(state)
    replay = InMemoryBatches(dataset, batch_size=6, flip_prob=0.5, seed=2, augment="digits")
    replay.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(resumed.next_batch()[0], replay.next_batch()[0])
    assert stream.state_dict() == memory.state_dict() == {"epoch": 1, "position": 2}


def test_streaming_workers_stop_when_their_batches_are_dropped_or_training_ends(trained):
    """No reference cycle keeps a loader's workers: they stop when the last reference to its batches
    goes, and when a training run that streams ends (even if plotting left its frame in a cycle),
    not at a later garbage collection that would wait 5 s for each of them."""
    import gc
    import multiprocessing
    import time

    root, paths, options, _ = trained
    dataset = CocoDetection(*paths["train"], build_transform(48, train=False))
    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        stream = StreamingBatches(dataset, batch_size=6, seed=2, workers=2)
        stream.next_batch()
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == 2
        start = time.perf_counter()
        del stream
        for worker in workers:
            worker.join(timeout=10)
        assert not any(worker.is_alive() for worker in workers)
        assert time.perf_counter() - start < 4.0
        streamed = dataclasses.replace(options, output=str(root / "streamed"), iters=2, warmup_iters=1, log_every=1,
                                       loader="stream", evaluate=False)
        train(fast_config(backbone_width=0.25, fpn_channels=16, head_width=16), streamed)
        assert set(multiprocessing.active_children()) <= before
    finally:
        gc.enable()


def test_build_batches_picks_memory_for_small_datasets(trained):
    _, paths, _, _ = trained
    dataset = CocoDetection(*paths["train"], build_transform(48, train=False))
    assert isinstance(build_batches(dataset, 4, 0.0, 0, "auto", image_size=48), InMemoryBatches)
    assert isinstance(build_batches(dataset, 4, 0.0, 0, "stream", image_size=48), StreamingBatches)
    assert isinstance(build_batches(dataset, 4, 0.0, 0, "auto", image_size=48 * 1000), StreamingBatches)
