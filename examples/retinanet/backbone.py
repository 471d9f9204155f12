"""ResNet (torchvision's blocks and layout) + FPN (torchvision's building blocks), outputs P3..P7.

``ResNetBody`` is torchvision's ResNet without the classifier, with one extra knob: ``width`` scales the
channels of every stage (torchvision's ``BasicBlock`` only exists at 64 base channels). At
``width=1.0`` its parameter names equal torchvision's, so a local torchvision checkpoint loads as is.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

RESNET_LAYOUTS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, fewer for narrow layers (at least 4 channels per group)."""
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class ResNetBody(nn.Module):
    """torchvision's ResNet stem and four stages; ``forward`` returns C3, C4, C5.

    Input (N, 3, H, W); outputs (N, c3, H/8, W/8), (N, c4, H/16, W/16), (N, c5, H/32, W/32) where
    ``out_channels == (c3, c4, c5)``.
    """

    def __init__(self, depth: int = 50, width: float = 1.0, norm: str = "bn"):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        block, layers = RESNET_LAYOUTS[depth]
        self.depth = depth
        self.norm_layer = nn.BatchNorm2d if norm == "bn" else group_norm
        planes = [max(8, int(round(p * width))) for p in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self.norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, planes[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.out_channels = tuple(p * block.expansion for p in planes[1:])
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                self.norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, norm_layer=self.norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, norm_layer=self.norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

    def load_torchvision_checkpoint(self, path: str) -> None:
        """Load a torchvision ``resnetXX`` state dict (the classifier ``fc.*`` is dropped)."""
        from .checkpoint import load_file
        from .errors import InputError

        state = load_file(path, "--weights file")  # weights_only=True: a file from elsewhere cannot run code
        if not isinstance(state, dict):
            raise InputError(f"--weights file {path} is not a state dict (got {type(state).__name__})")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            self.load_state_dict(state)
        except RuntimeError as error:
            raise InputError(f"--weights file {path} does not fit this backbone (a torchvision resnet{self.depth} "
                             f"checkpoint at --backbone-width 1 is expected): {str(error).splitlines()[0]}") from None


class ResNetFPN(nn.Module):
    """ResNet body + FPN; returns the requested pyramid levels, finest first.

    P3-P5: 1x1 lateral + top-down nearest upsampling + 3x3 output conv (torchvision's FPN).
    P6 = 3x3 stride-2 conv on C5, P7 = 3x3 stride-2 conv on ReLU(P6) (torchvision's LastLevelP6P7 with
    in_channels != out_channels, i.e. the paper's variant that reads C5).
    Input (N, 3, H, W); output list of (N, fpn_channels, H / 2**l, W / 2**l) for l in ``levels``.
    """

    def __init__(self, depth: int = 50, width: float = 1.0, levels=(3, 4, 5, 6, 7), fpn_channels: int = 256,
                 norm: str = "bn"):
        super().__init__()
        self.body = ResNetBody(depth, width, norm)
        self.levels = tuple(levels)
        self.strides = tuple(2**level for level in self.levels)
        c5_channels = self.body.out_channels[-1]
        extra = None
        if max(self.levels) > 5:
            # LastLevelP6P7 reads C5 when its channel count differs from the FPN's; force that branch
            # even when they happen to match, as the paper builds P6 from C5.
            extra = LastLevelP6P7(c5_channels, fpn_channels)
            extra.use_P5 = False
        self.fpn = FeaturePyramidNetwork(list(self.body.out_channels), fpn_channels, extra_blocks=extra)
        self.out_channels = fpn_channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        c3, c4, c5 = self.body(images)
        pyramid = self.fpn(OrderedDict([("c3", c3), ("c4", c4), ("c5", c5)]))
        by_level = dict(zip(range(3, 3 + len(pyramid)), pyramid.values()))
        return [by_level[level] for level in self.levels]
