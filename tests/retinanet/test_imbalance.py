import argparse

import pytest

from examples.retinanet.config import add_config_arguments, config_from_arguments, fast_config, imbalance_config
from examples.retinanet.digits import VARIANTS, DigitsParams, default_root, variant_params
from examples.retinanet.imbalance_stats import expected_anchors_per_image, imbalance_stats, main
from examples.retinanet.train import add_train_arguments, options_from_arguments

IMAGES = 40  # enough for a stable mean (the imbalance variant has 1-2 digits per image)


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    add_config_arguments(parser)
    args = parser.parse_args(list(argv))
    return options_from_arguments(args), config_from_arguments(args)


@pytest.fixture(scope="module")
def imbalance():
    return imbalance_stats("imbalance", IMAGES)


@pytest.fixture(scope="module")
def fast():
    return imbalance_stats("fast", IMAGES)


def test_imbalance_variant_is_the_256_px_one_to_two_digit_canvas():
    params = variant_params("imbalance")
    assert (params.image_size, params.min_digits, params.max_digits) == (256, 1, 2)
    assert (params.min_digit_height, params.max_digit_height) == (14, 40)
    assert VARIANTS["default"] == DigitsParams()
    assert default_root("default") == "data/digits" and default_root("imbalance") == "data/digits-imbalance"
    with pytest.raises(ValueError, match="unknown digits variant"):
        variant_params("huge")


def test_imbalance_model_is_fast_on_p3_p4():
    assert imbalance_config().to_dict() == fast_config().to_dict()
    assert imbalance_config().levels == (3, 4)


def test_one_flag_selects_model_data_and_size_and_defaults_are_unchanged():
    options, config = _parse()
    assert (options.digits, options.data_root, options.image_size) == ("default", "data/digits", 96)
    assert config.to_dict() == fast_config().to_dict()
    options, config = _parse("--preset", "imbalance")
    assert (options.digits, options.data_root, options.image_size) == ("imbalance", "data/digits-imbalance", 256)
    assert config.levels == (3, 4)
    options, _ = _parse("--preset", "imbalance", "--image-size", "128", "--data-root", "elsewhere")
    assert (options.image_size, options.data_root) == (128, "elsewhere")
    options, config = _parse("--preset", "paper", "--digits", "imbalance")
    assert (options.digits, options.image_size, config.levels) == ("imbalance", 256, (3, 4, 5, 6, 7))
    with pytest.raises(SystemExit):
        _parse("--digits", "huge")


def test_anchors_per_image_follow_levels_canvas_and_cell(imbalance, fast):
    # P3 and P4 of 256 px: 32x32 and 16x16 positions, 9 anchors each.
    assert imbalance["anchors_per_image"] == (32 * 32 + 16 * 16) * 9 == 11_520
    assert imbalance["anchors_per_image"] == expected_anchors_per_image((3, 4), 256, 9)
    assert fast["anchors_per_image"] == (12 * 12 + 6 * 6) * 9 == 1_620
    assert expected_anchors_per_image((3, 4, 5, 6, 7), 96, 9) == (144 + 36 + 9 + 4 + 1) * 9


def test_imbalance_positives_and_ratio(imbalance):
    assert imbalance["images"] == IMAGES
    assert 1.0 <= imbalance["objects_per_image"] <= 2.0
    positives = imbalance["positives_per_image"]
    assert 3 <= positives["mean"] <= 25
    assert positives["min"] >= 1  # low-quality matches give every digit at least one anchor
    assert imbalance["anchors_per_positive"] > 500
    assert imbalance["anchor_class_pairs_per_positive"] == pytest.approx(10 * imbalance["anchors_per_positive"])


def test_default_preset_numbers_unchanged(fast, imbalance):
    assert fast["image_size"] == 96 and 2.0 <= fast["objects_per_image"] <= 5.0
    assert 12 <= fast["positives_per_image"]["mean"] <= 30
    assert 50 <= fast["anchors_per_positive"] <= 130
    # The point of the variant: an order of magnitude more anchors per positive.
    assert imbalance["anchors_per_positive"] > 8 * fast["anchors_per_positive"]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        imbalance_stats("huge", 1)
    with pytest.raises(ValueError, match="at least one image"):
        imbalance_stats("fast", 0)
    with pytest.raises(SystemExit):
        main(["--images", "0"])


def test_script_prints_both_presets(capsys):
    main(["--images", "3"])
    out = capsys.readouterr().out
    assert "preset imbalance" in out and "preset fast" in out and "11,520" in out and "1,620" in out
