import torch

from examples.retinanet.loss import BACKGROUND, IGNORE_INDEX
from examples.retinanet.loss_cdf import normalised_loss_cdf


def test_cdfs_are_normalised_and_focusing_concentrates_the_negative_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 4, generator=g) * 2 - 3
    classes = torch.full((2000,), BACKGROUND)
    classes[:50] = torch.arange(50) % 4
    classes[50:80] = IGNORE_INDEX
    cdfs = {gamma: normalised_loss_cdf(logits, classes, gamma) for gamma in (0.0, 2.0)}
    for positive, negative in cdfs.values():
        assert len(positive) == 50 and len(negative) == 50 * 3 + 1920 * 4
        for cdf in (positive, negative):
            assert torch.all(cdf[1:] >= cdf[:-1])
            assert abs(cdf[-1].item() - 1.0) < 1e-5
    # with gamma = 2 the easy negatives carry far less of the loss: the CDF stays lower for longer
    half = len(cdfs[0.0][1]) // 2
    assert cdfs[2.0][1][half] < 0.5 * cdfs[0.0][1][half]


def test_checkpoint_digits_takes_the_first_images_of_the_checkpoints_split(tmp_path):
    import argparse
    from dataclasses import asdict

    from examples.retinanet.digits import DigitsParams
    from examples.retinanet.evaluate import checkpoint_digits

    params = DigitsParams(seed=2, num_train=6, num_val=3, image_size=32, min_digit_height=10, max_digit_height=14,
                          min_digits=1, max_digits=1)
    checkpoint = {"digits_params": asdict(params), "image_size": 32, "options": {"data_root": str(tmp_path)}}
    args = argparse.Namespace(data_root=None)
    assert len(checkpoint_digits(args, checkpoint, "train", 4)) == 4
    val = checkpoint_digits(args, checkpoint, "val", 100)
    assert len(val) == 3 and val[0][0].shape == (3, 32, 32)
