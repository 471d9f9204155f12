"""Anchor generation: A = len(scales) * len(ratios) anchors at every position of every pyramid level."""

from __future__ import annotations

import math

import torch
from torch import nn


def cell_anchors(size: float, scales, ratios) -> torch.Tensor:
    """The (A, 4) XYXY anchors centred on (0, 0) for one level; A = len(scales) * len(ratios).

    ``ratios`` are height / width; every anchor of scale ``s`` has area ``(size * s) ** 2``.
    Order: scale-major, ratio-minor (the head's A axis follows the same order, but only consistency
    matters since the head learns it).
    """
    anchors = []
    for scale in scales:
        area = (size * scale) ** 2
        for ratio in ratios:
            w = math.sqrt(area / ratio)
            h = w * ratio
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(anchors, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors for feature maps of strides ``strides`` with one base ``sizes[i]`` per level.

    ``forward(feature_shapes)`` takes the (Hi, Wi) of each level and returns a list of (Hi*Wi*A, 4)
    XYXY tensors in image pixels, ordered (y, x, a), the order of the head's ``permute_to_N_HWA_K``.
    Anchor centres sit at ``(x + offset) * stride``; ``offset=0.5`` centres them on their cell.
    """

    def __init__(self, strides, sizes, scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)), ratios=(0.5, 1.0, 2.0),
                 offset: float = 0.5):
        super().__init__()
        if len(strides) != len(sizes):
            raise ValueError("need one anchor size per stride")
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)
        self.num_anchors = len(scales) * len(ratios)
        for i, size in enumerate(sizes):
            self.register_buffer(f"cell_{i}", cell_anchors(size, scales, ratios), persistent=False)
        self._cache: dict = {}

    def _cell(self, i: int) -> torch.Tensor:
        return getattr(self, f"cell_{i}")

    def grid_anchors(self, i: int, height: int, width: int) -> torch.Tensor:
        """(height*width*A, 4) anchors of level ``i``."""
        stride, cell = self.strides[i], self._cell(i)
        ys = (torch.arange(height, dtype=torch.float32, device=cell.device) + self.offset) * stride
        xs = (torch.arange(width, dtype=torch.float32, device=cell.device) + self.offset) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        return (centres + cell.view(1, -1, 4)).reshape(-1, 4)

    def forward(self, feature_shapes) -> list[torch.Tensor]:
        key = (tuple(tuple(int(v) for v in s) for s in feature_shapes), self._cell(0).device)
        if key not in self._cache:
            self._cache[key] = [self.grid_anchors(i, h, w) for i, (h, w) in enumerate(feature_shapes)]
        return self._cache[key]
