"""Every bad input of the command-line tools ends with one line that names the problem (and the file),
before any long work, or gives a correct result."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import background

from examples.retinanet import evaluate, infer, train
from examples.retinanet.config import build_model, fast_config
from examples.retinanet.data import CocoDetection
from examples.retinanet.model import RetinaNet

from .tiny_coco import TINY_MODEL_FLAGS, write_coco


def run_main(main, argv, capsys) -> str:
    """Run a command-line ``main``; it must exit with status 2. Returns its one-line error."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    return lines[-1]


@pytest.mark.parametrize("flags, message", [
    (["--minutes", "0"], "--minutes must be a positive number, got 0.0"),
    (["--minutes", "-1"], "--minutes must be a positive number, got -1.0"),
    (["--iters", "0"], "--iters must be at least 1, got 0"),
    (["--iters", "-5"], "--iters must be at least 1, got -5"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    (["--clip-grad", "0"], "--clip-grad must be a positive gradient norm, got 0.0"),
    (["--image-size", "8"], "--image-size must be at least 32 pixels, got 8"),
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0 (off) or more, got -1"),
    (["--flip-prob", "2"], "--flip-prob must be within [0, 1], got 2.0"),
])
def test_train_rejects_bad_numbers_before_any_work(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "dataset_paths", lambda *a: pytest.fail("data touched before the flags were checked"))
    line = run_main(train.main, flags + ["--output", str(tmp_path / "run")], capsys)
    assert line.endswith(message)


def test_batch_larger_than_the_dataset_is_an_error_before_decoding(tmp_path, capsys, monkeypatch):
    path = write_coco(tmp_path, sizes=((48, 48),) * 3)
    monkeypatch.setattr(CocoDetection, "load_image", lambda *a: pytest.fail("decoded before the check"))
    line = run_main(train.main, ["--train-json", path, "--batch-size", "4", "--iters", "1", "--output",
                                 str(tmp_path / "run"), "--no-progress"], capsys)
    assert f"batch size 4 is larger than the 3 images of {path}" in line


def _checkpoint(path, num_classes: int, **extra) -> str:
    model = build_model(fast_config(num_classes=num_classes, backbone_width=0.25, fpn_channels=16, head_width=16))
    torch.save({"config": model.config.to_dict(), "model": model.state_dict(), "image_size": 48, **extra}, path)
    return str(path)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_evaluate_refuses_a_checkpoint_of_another_class_count(tmp_path, capsys, num_classes):
    val = write_coco(tmp_path, "val")  # 2 categories
    checkpoint = _checkpoint(tmp_path / "model.pth", num_classes)
    line = run_main(evaluate.main, ["--checkpoint", checkpoint, "--val-json", val], capsys)
    assert f"{checkpoint} predicts {num_classes} classes but {val} has 2 categories" in line


def test_evaluate_refuses_other_category_ids_of_the_same_count(tmp_path, capsys):
    val = write_coco(tmp_path, "val", categories=(5, 7))
    checkpoint = _checkpoint(tmp_path / "model.pth", 2, category_ids=[1, 2])
    line = run_main(evaluate.main, ["--checkpoint", checkpoint, "--val-json", val], capsys)
    assert "trained on category ids [1, 2]" in line and "has [5, 7]" in line


def test_checkpoint_files_that_are_not_training_checkpoints(tmp_path, capsys):
    val = write_coco(tmp_path, "val")
    real = _checkpoint(tmp_path / "model.pth", 2)
    bare = tmp_path / "bare.pth"
    torch.save(build_model(fast_config(num_classes=2, backbone_width=0.25)).state_dict(), bare)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(real, "rb").read()[:5000])
    pickled = tmp_path / "pickled.pth"
    torch.save({"config": {}, "model": {}, "payload": argparse_namespace()}, pickled)
    expected = {bare: "is a bare state dict", corrupt: "is corrupt", truncated: "is corrupt or truncated",
                pickled: "holds Python objects besides tensors", tmp_path: "is a directory, expected a file",
                tmp_path / "missing.pth": "does not exist"}
    for path, message in expected.items():
        line = run_main(evaluate.main, ["--checkpoint", str(path), "--val-json", val], capsys)
        assert str(path) in line and message in line, line


def argparse_namespace():
    import argparse

    return argparse.Namespace(a=1)


def _write_json(path, data) -> str:
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def test_evaluate_refuses_a_val_json_without_annotations_or_images(tmp_path, capsys):
    val = write_coco(tmp_path, "val")
    checkpoint = _checkpoint(tmp_path / "model.pth", 2)
    data = json.load(open(val))
    no_key = _write_json(tmp_path / "no_key.json", {k: v for k, v in data.items() if k != "annotations"})
    empty = _write_json(tmp_path / "empty.json", {**data, "annotations": []})
    no_images = _write_json(tmp_path / "no_images.json", {**data, "images": [], "annotations": []})
    expected = {no_key: "has no 'annotations' list", empty: "has no usable annotations",
                no_images: "lists no images"}
    for path, message in expected.items():
        line = run_main(evaluate.main, ["--checkpoint", checkpoint, "--val-json", path,
                                        "--image-root", str(tmp_path)], capsys)
        assert path in line and message in line, line


def test_bad_files_named_in_one_line(tmp_path, capsys):
    good = write_coco(tmp_path, "train")
    data = json.load(open(good))
    missing = _write_json(tmp_path / "missing_image.json",
                          {**data, "images": data["images"] + [{"id": 99, "file_name": "train/nope.png"}]})
    (tmp_path / "train" / "text.png").write_text("not an image")
    unreadable = _write_json(tmp_path / "unreadable.json",
                             {**data, "images": data["images"] + [{"id": 99, "file_name": "train/text.png"}]})
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"images": [}')
    not_coco = _write_json(tmp_path / "list.json", [1, 2])
    unknown_image = _write_json(tmp_path / "unknown.json", {**data, "annotations": [
        {"image_id": 42, "category_id": 1, "bbox": [0, 0, 4, 4]}]})
    expected = {
        missing: f"image {tmp_path}/train/nope.png (id 99 in {missing}) does not exist",
        unreadable: f"image {tmp_path}/train/text.png (id 99 in {unreadable}) is not a readable image",
        str(malformed): f"annotation file {malformed} is not valid JSON (line 1, column 13",
        not_coco: "must hold a JSON object",
        unknown_image: "refers to image id 42, which is not in 'images'",
        str(tmp_path / "train"): "is a directory, expected a file",
        str(tmp_path / "nothing.json"): "does not exist",
    }
    for path, message in expected.items():
        line = run_main(train.main, ["--train-json", path, "--image-root", str(tmp_path), "--iters", "1",
                                     "--output", str(tmp_path / "run"), "--no-progress"], capsys)
        assert message in line, line


def test_infer_checks_every_image_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "load_checkpoint", lambda *a: pytest.fail("model loaded before the images"))
    (tmp_path / "text.png").write_text("hello")
    line = run_main(infer.main, [str(tmp_path / "text.png"), "--output", str(tmp_path / "out")], capsys)
    assert f"image {tmp_path / 'text.png'} is not a readable image" in line
    line = run_main(infer.main, [str(tmp_path / "none.png"), "--output", str(tmp_path / "out")], capsys)
    assert f"image {tmp_path / 'none.png'} does not exist" in line


def _tiny_train_args(tmp_path, *extra) -> list[str]:
    path = write_coco(tmp_path, sizes=((40, 40),) * 4)
    return ["--train-json", path, "--image-size", "32", "--batch-size", "2", "--warmup-iters", "0",
            "--output", str(tmp_path / "run"), "--no-progress", "--no-evaluate", "--checkpoint-every", "0",
            *TINY_MODEL_FLAGS, *extra]


def _nan_on_call(monkeypatch, bad_call: int, loss: str = "loss_cls"):
    original, calls = RetinaNet.losses, {"n": 0}

    def losses(self, *args):
        out = original(self, *args)
        calls["n"] += 1
        if calls["n"] == bad_call:
            out[loss] = out[loss] * float("nan")
        return out

    monkeypatch.setattr(RetinaNet, "losses", losses)


def test_nonfinite_loss_stops_naming_the_loss_and_iteration(tmp_path, monkeypatch, capsys):
    _nan_on_call(monkeypatch, 3, "loss_box")
    with pytest.raises(SystemExit) as exit_info:
        train.main(_tiny_train_args(tmp_path, "--iters", "5"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: loss_box is nan at iteration 3 (a diverging run" in err[0]
    _nan_on_call(monkeypatch, 3, "loss_box")  # a fresh count for train() called directly: it raises
    with pytest.raises(train.NonFiniteLossError, match="loss_box is nan at iteration 3"):
        options = train.options_from_arguments(_parse(_tiny_train_args(tmp_path, "--iters", "5")))
        train.train(fast_config(backbone_width=0.25, fpn_channels=16, head_width=16), options)


def test_nonfinite_loss_skip_drops_the_batch_and_keeps_the_weights_finite(tmp_path, monkeypatch, capsys):
    _nan_on_call(monkeypatch, 2)
    options = train.options_from_arguments(_parse(_tiny_train_args(tmp_path, "--iters", "4", "--nonfinite", "skip")))
    config = fast_config(backbone_width=0.25, fpn_channels=16, head_width=16)
    result = train.train(config, options)
    assert result["skipped"] == 1 and result["iterations"] == 4
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())
    assert "loss_cls is nan at iteration 2; batch skipped" in capsys.readouterr().out


def _parse(argv):
    import argparse

    from examples.retinanet.config import add_config_arguments

    parser = argparse.ArgumentParser()
    train.add_train_arguments(parser)
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_clip_grad_bounds_the_gradient_norm():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(3, 3))]
    for p in params:
        p.grad = 100 * torch.randn_like(p)
    before = torch.cat([p.grad.flatten() for p in params]).norm()
    optimizer = torch.optim.SGD(params, lr=1.0)
    old = [p.detach().clone() for p in params]
    norm = train.clipped_step(optimizer, params, clip_grad=0.5)
    assert norm == pytest.approx(before.item())
    step = torch.cat([(o - p.detach()).flatten() for o, p in zip(old, params)])
    assert step.norm().item() == pytest.approx(0.5, rel=1e-5)  # lr 1: the step is the clipped gradient
    assert train.options_from_arguments(_parse(["--clip-grad", "2.5"])).clip_grad == 2.5


# One interpreter (one import of torch): every module imported, then an entry point run as a command.
IMPORT_EVERYTHING = ("import json, os, runpy, sys\nbefore = dict(os.environ)\n"
                     "import examples.retinanet, examples.retinanet.train, examples.retinanet.evaluate, "
                     "examples.retinanet.infer, examples.retinanet.ablate, examples.retinanet.loss_cdf, "
                     "examples.retinanet.step_time, examples.retinanet.imbalance_stats\n"
                     "changed = {k: v for k, v in os.environ.items() if before.get(k) != v}\n"
                     "sys.argv = ['x', '--help']\ntry:\n"
                     "    runpy.run_module('examples.retinanet.evaluate', run_name='__main__')\n"
                     "except SystemExit as done:\n"
                     "    print(json.dumps([changed, done.code, os.environ.get('OMP_WAIT_POLICY')]))")
IMPORTS = background.Job(lambda folder: [sys.executable, "-c", IMPORT_EVERYTHING],
                         env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})


@pytest.mark.background(IMPORTS)
def test_importing_the_example_leaves_the_environment_alone():
    done = IMPORTS.result(timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    changed, exit_code, policy = json.loads(done.stdout.strip().splitlines()[-1])
    assert changed == {}
    # The entry point itself still sets it (under `python -m`, before torch loads).
    assert (exit_code, policy) == (0, "PASSIVE")


def test_two_labels_on_one_box_do_not_hide_each_other():
    sizes = [(30, 10), (30, 10), (30, 10)]
    corners = infer.place_labels([(20, 40, 60), (20, 40, 60), (21, 41, 60)], sizes, canvas_height=100)
    rectangles = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
    for i in range(3):
        for j in range(i):
            a, b = rectangles[i], rectangles[j]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    # Drawn: both classes' label colours are visible on one box.
    image = Image.new("RGB", (64, 64))
    detections = {"boxes": [[10, 20, 40, 50], [10, 20, 40, 50]], "scores": [0.9, 0.8], "labels": [0, 1]}
    drawn = infer.draw_detections(image, detections, ["a", "b"], zoom=2)
    pixels = np.asarray(drawn).reshape(-1, 3)
    label_pixels = [int((pixels == colour).all(axis=1).sum()) for colour in infer.PALETTE[:2]]
    assert min(label_pixels) > 100, label_pixels  # a filled label each, not just a box outline


def test_weights_file_is_loaded_safely_and_checked(tmp_path):
    from examples.retinanet.backbone import ResNetBody
    from examples.retinanet.errors import InputError

    body = ResNetBody(depth=18, width=1.0)
    good = tmp_path / "resnet18.pth"
    torch.save({**body.state_dict(), "fc.weight": torch.zeros(2, 2)}, good)
    ResNetBody(depth=18, width=1.0).load_torchvision_checkpoint(str(good))
    with pytest.raises(InputError, match="does not fit this backbone .*resnet34"):
        ResNetBody(depth=34, width=1.0).load_torchvision_checkpoint(str(good))
    pickled = tmp_path / "pickled.pth"
    torch.save({"x": argparse_namespace()}, pickled)
    with pytest.raises(InputError, match="--weights file .* holds Python objects"):
        body.load_torchvision_checkpoint(str(pickled))


@pytest.mark.parametrize("main, flags, message", [
    (evaluate.main, ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (evaluate.main, ["--threads", "-1"], "--threads must be at least 1, got -1"),
    (infer.main, ["x.png", "--zoom", "0"], "--zoom must be at least 1, got 0"),
    (infer.main, ["x.png", "--score-threshold", "1.5"], "--score-threshold must be within [0, 1], got 1.5"),
])
def test_evaluate_and_infer_reject_bad_numbers(main, flags, message, capsys):
    assert run_main(main, flags, capsys).endswith(message)


def test_evaluate_on_a_data_folder_without_val_split(tmp_path, capsys):
    write_coco(tmp_path / "d", "train")
    checkpoint = _checkpoint(tmp_path / "model.pth", 2)
    line = run_main(evaluate.main, ["--checkpoint", checkpoint, "--data", str(tmp_path / "d")], capsys)
    assert line.endswith(f"--data {tmp_path / 'd'} has no val split to evaluate on")


def test_train_refuses_a_val_set_of_other_classes_before_training(tmp_path, capsys, monkeypatch):
    train_json = write_coco(tmp_path, "train")
    val_json = write_coco(tmp_path, "val", categories=(1, 2, 3))
    monkeypatch.setattr(CocoDetection, "load_image", lambda *a: pytest.fail("decoded before the check"))
    line = run_main(train.main, ["--train-json", train_json, "--val-json", val_json, "--iters", "1",
                                 "--output", str(tmp_path / "run"), "--no-progress"], capsys)
    assert f"training set {train_json} predicts 2 classes but {val_json} has 3 categories" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is present")
def test_device_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "dataset_paths", lambda *a: pytest.fail("data touched before the device check"))
    line = run_main(train.main, ["--device", "cuda", "--output", str(tmp_path / "run")], capsys)
    assert line.endswith("--device cuda: no CUDA device is available")
