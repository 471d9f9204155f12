import math

import torch

from examples.retinanet.anchors import AnchorGenerator, cell_anchors

SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
RATIOS = (0.5, 1.0, 2.0)


def _wh(boxes):
    return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]


def test_cell_anchors_have_paper_areas_and_ratios():
    cell = cell_anchors(32.0, SCALES, RATIOS)
    assert cell.shape == (9, 4)
    w, h = _wh(cell)
    expected_area = torch.tensor([(32.0 * s) ** 2 for s in SCALES for _ in RATIOS])
    torch.testing.assert_close(w * h, expected_area, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(h / w, torch.tensor(list(RATIOS) * 3), rtol=1e-5, atol=1e-5)
    # centred on the origin
    torch.testing.assert_close((cell[:, 0] + cell[:, 2]) / 2, torch.zeros(9), atol=1e-5, rtol=0)


def test_grid_count_order_and_centres():
    generator = AnchorGenerator(strides=(8, 16), sizes=(32.0, 64.0), scales=SCALES, ratios=RATIOS)
    level3, level4 = generator([(4, 5), (2, 3)])
    assert generator.num_anchors == 9
    assert level3.shape == (4 * 5 * 9, 4) and level4.shape == (2 * 3 * 9, 4)
    centres = (level3[:, :2] + level3[:, 2:]) / 2
    # (y, x, a) order: the first 9 anchors share the first cell, centred at (0.5 * stride)
    torch.testing.assert_close(centres[:9], torch.full((9, 2), 4.0))
    # next cell is one stride to the right
    torch.testing.assert_close(centres[9:18], torch.tensor([[12.0, 4.0]]).expand(9, 2))
    # start of the second row: one stride down
    torch.testing.assert_close(centres[5 * 9], torch.tensor([4.0, 12.0]))
    # the last anchor of level 4 sits at cell (1, 2)
    last_centre = (level4[-1, :2] + level4[-1, 2:]) / 2
    torch.testing.assert_close(last_centre, torch.tensor([2.5 * 16, 1.5 * 16]))
    w, h = _wh(level4[:9])
    torch.testing.assert_close(torch.sqrt(w * h)[::3], torch.tensor([64.0 * s for s in SCALES]))


def test_paper_sizes_per_level():
    sizes = (32.0, 64.0, 128.0, 256.0, 512.0)
    generator = AnchorGenerator(strides=(8, 16, 32, 64, 128), sizes=sizes)
    anchors = generator([(1, 1)] * 5)
    for level_anchors, size in zip(anchors, sizes):
        w, h = _wh(level_anchors)
        areas = (w * h).sqrt()
        assert math.isclose(areas.min().item(), size, rel_tol=1e-5)
        assert math.isclose(areas.max().item(), size * 2 ** (2 / 3), rel_tol=1e-5)
