import argparse

import pytest

from examples.retinanet.config import (FAST_DEVIATIONS, RetinaNetConfig, add_config_arguments,
                                       config_from_arguments, fast_config, paper_config)


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_arguments(parser.parse_args(list(argv)))


def test_paper_defaults():
    config = paper_config()
    assert (config.depth, config.fpn_channels, config.head_width, config.head_convs) == (50, 256, 256, 4)
    assert config.levels == (3, 4, 5, 6, 7) and config.anchor_sizes == (32.0, 64.0, 128.0, 256.0, 512.0)
    assert (config.focal_alpha, config.focal_gamma, config.prior_prob) == (0.25, 2.0, 0.01)
    assert (config.fg_iou_threshold, config.bg_iou_threshold) == (0.5, 0.4)
    assert (config.score_threshold, config.topk_candidates, config.nms_threshold,
            config.detections_per_image) == (0.05, 1000, 0.5, 100)


def test_fast_preset_differs_only_where_documented():
    fast, paper = fast_config().to_dict(), paper_config().to_dict()
    changed = {name for name in fast if fast[name] != paper[name]}
    assert changed == set(FAST_DEVIATIONS)


def test_command_line_overrides_and_derived_anchor_sizes():
    assert _parse().to_dict() == fast_config().to_dict()
    config = _parse("--preset", "paper", "--depth", "18", "--loss-impl", "torchvision",
                    "--allow-low-quality-matches", "false")
    assert (config.depth, config.loss_impl, config.allow_low_quality_matches) == (18, "torchvision", False)
    assert _parse("--levels", "3", "4", "5", "6", "7").anchor_sizes == (16.0, 32.0, 64.0, 128.0, 256.0)
    assert _parse("--levels", "3", "5", "--anchor-sizes", "20", "80").anchor_sizes == (20.0, 80.0)


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="one anchor size per level"):
        RetinaNetConfig(levels=(3, 4), anchor_sizes=(32.0,))
    with pytest.raises(ValueError, match="levels"):
        RetinaNetConfig(levels=(2, 3), anchor_sizes=(16.0, 32.0))
    with pytest.raises(SystemExit):
        _parse("--loss-impl", "nonsense")
