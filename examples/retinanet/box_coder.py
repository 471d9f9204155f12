"""Box <-> regression-target transform of R-CNN (dx, dy, dw, dh), as used by RetinaNet."""

from __future__ import annotations

import math

import torch


class BoxCoder:
    """``encode(boxes, anchors) -> deltas`` and its inverse ``decode(deltas, anchors) -> boxes``.

    Boxes are XYXY in pixels, shaped (..., 4); ``weights`` scale (dx, dy, dw, dh) (RetinaNet uses 1).
    ``decode`` clamps dw, dh at log(1000 / 16) so an untrained head cannot overflow exp().
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), scale_clamp: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    @staticmethod
    def _centre_size(boxes: torch.Tensor):
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._centre_size(anchors)
        bx, by, bw, bh = self._centre_size(boxes)
        return torch.stack(
            [wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah)],
            dim=-1,
        )

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._centre_size(anchors.to(deltas.dtype))
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        cx, cy = dx * aw + ax, dy * ah + ay
        w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
