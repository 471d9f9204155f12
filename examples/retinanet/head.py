"""The two RetinaNet subnets: classification (K*A sigmoid outputs) and class-agnostic box regression
(4*A outputs), each shared across pyramid levels and not shared with each other."""

from __future__ import annotations

import math

import torch
from torch import nn


def permute_to_N_HWA_K(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, A*K, H, W) -> (N, H*W*A, K), the layout of the anchors of that level."""
    n, _, h, w = x.shape
    return x.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)


def _subnet_tower(in_channels: int, width: int, num_convs: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers.append(nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1))
        if norm == "gn":
            layers.append(nn.GroupNorm(min(32, width // 4) or 1, width))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RetinaNetHead(nn.Module):
    """Paper section 4, "Classification Subnet" and "Box Regression Subnet".

    Each subnet: ``num_convs`` 3x3 convs of ``width`` channels + ReLU (optionally GroupNorm before the
    ReLU), then a 3x3 conv to K*A (class) or 4*A (box) outputs. Weights ~ N(0, 0.01), biases 0, except
    the final classification bias, -log((1 - pi) / pi), so every anchor starts at foreground
    probability pi (``prior_prob``; 0 keeps the bias at 0).

    ``forward(features)`` takes a list of (N, C, Hi, Wi) and returns
    ``cls_logits`` (N, sum_i Hi*Wi*A, K) and ``box_deltas`` (N, sum_i Hi*Wi*A, 4).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, width: int = 256,
                 num_convs: int = 4, norm: str = "none", prior_prob: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        self.cls_subnet = _subnet_tower(in_channels, width, num_convs, norm)
        self.box_subnet = _subnet_tower(in_channels, width, num_convs, norm)
        self.cls_score = nn.Conv2d(width, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(width, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if prior_prob > 0:
            nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, deltas = self.forward_per_level(features)
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)

    def forward_per_level(self, features: list[torch.Tensor]):
        """Lists of (N, Hi*Wi*A, K) logits and (N, Hi*Wi*A, 4) deltas, one entry per level."""
        logits = [permute_to_N_HWA_K(self.cls_score(self.cls_subnet(f)), self.num_classes) for f in features]
        deltas = [permute_to_N_HWA_K(self.bbox_pred(self.box_subnet(f)), 4) for f in features]
        return logits, deltas
