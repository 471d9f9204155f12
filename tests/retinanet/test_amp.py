"""Mixed precision: bf16 autocast steps on the CPU train (finite, decreasing loss) and hand the fused
loss 16-bit logits as they are; fp16 is refused on the CPU; fp16 with a gradient scaler on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

import focal
from examples.retinanet import train
from examples.retinanet.config import fast_config
from examples.retinanet.errors import InputError

from .tiny_coco import write_coco

CONFIG = dict(backbone_width=0.25, fpn_channels=16, head_width=16)


def _options(tmp_path, **overrides):
    path = write_coco(tmp_path, sizes=((40, 40),) * 8)
    values = dict(output=str(tmp_path / "run"), train_json=path, image_size=32, batch_size=4, iters=12, lr=0.02,
                  warmup_iters=0, log_every=4, checkpoint_every=0, evaluate=False, progress=False)
    values.update(overrides)
    return train.TrainOptions(**values)


def _spy_on_the_fused_loss(monkeypatch) -> list:
    seen, original = [], focal.sigmoid_focal_loss

    def spy(logits, *args, **kwargs):
        seen.append(logits.dtype)
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(focal, "sigmoid_focal_loss", spy)
    return seen


def test_bf16_autocast_on_cpu_trains_with_16_bit_logits(tmp_path, monkeypatch):
    seen = _spy_on_the_fused_loss(monkeypatch)
    result = train.train(fast_config(**CONFIG), _options(tmp_path, amp="bf16", device="cpu"))
    assert seen and set(seen) == {torch.bfloat16}  # no upcast copy before the fused op
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in result["model"].parameters())  # float32 master weights


def test_fp16_is_refused_on_cpu_with_the_alternative(tmp_path):
    with pytest.raises(InputError, match="--amp fp16 needs a CUDA device .*use --amp bf16"):
        train.train(fast_config(**CONFIG), _options(tmp_path, amp="fp16", device="cpu"))
    with pytest.raises(InputError, match="--amp must be one of"):
        _options(tmp_path, amp="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a gradient scaler needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_amp_trains_with_16_bit_logits(tmp_path, monkeypatch, amp):
    seen = _spy_on_the_fused_loss(monkeypatch)
    result = train.train(fast_config(**CONFIG), _options(tmp_path, amp=amp, device="cuda", clip_grad=10.0))
    assert set(seen) == {torch.float16 if amp == "fp16" else torch.bfloat16}
    losses = [h["loss"] for h in result["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert next(result["model"].parameters()).is_cuda
