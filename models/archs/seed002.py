"""Seed 002: the U-Net/ResNet hybrid (955,715 parameters at the default width; the seed's table: 972,739).

Layout from the seed's layer table: a 3×3 conv (3→16), a 3×3 conv (16→64),
max-pool, a 3×3 conv (64→128), max-pool, two residual blocks at 128 channels
(conv-BN-ReLU-conv-BN), two 3×3 stride-2 transposed convs (128→128, 128→64)
and a 3×3 output conv (64→3).

What the table's counts say beyond its layout (Keras counts batch
normalisation as 4 parameters a channel): its convs also see earlier features
concatenated to their input (``conv2d_1`` takes 19 channels, ``conv2d_2`` 80,
the first residual block 144), and both residual blocks have a 1×1
projection shortcut, the first being larger only for its wider input. Here
the encoder keeps the plain widths (no such concatenations) and only the first
block has a projection.

Differences from the seed, for a small CPU training budget and the U-Net it
describes: the encoder features are brought back through U-Net skips (the
transposed conv's output is concatenated with the encoder feature of the same
scale and fused by a 1×1 conv), and the output is a residual added to the
blurred input. Values in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (identity or 1×1 projection), then ReLU."""

    def __init__(self, channels: int, projection: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1),
            nn.BatchNorm2d(channels),
        )
        self.shortcut: nn.Module = nn.Conv2d(channels, channels, 1) if projection else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Seed002UNet(nn.Module):
    """The seed's U-Net/ResNet hybrid. ``width`` is the first conv's channel count (16).

    ``in_channels=6`` makes it a refiner: the input is ``[blurred, prior]``
    and the residual is added to the prior (see :mod:`models.training.prior`).
    """

    value_range: tuple[float, float] = (0.0, 1.0)
    size_multiple: int = 4

    def __init__(self, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        if width < 2:
            raise ValueError(f"width must be >= 2, got {width}")
        w1, w2, w3 = width, 4 * width, 8 * width
        self.conv0 = nn.Sequential(nn.Conv2d(in_channels, w1, 3, 1, 1), nn.ReLU(inplace=True))
        self.conv1 = nn.Sequential(nn.Conv2d(w1, w2, 3, 1, 1), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Sequential(nn.Conv2d(w2, w3, 3, 1, 1), nn.ReLU(inplace=True))
        self.res1 = ResidualBlock(w3, projection=True)
        self.res2 = ResidualBlock(w3)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(w3, w3, 3, 2, 1, output_padding=1), nn.ReLU(inplace=True))
        self.fuse1 = nn.Sequential(nn.Conv2d(2 * w3, w3, 1), nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(w3, w2, 3, 2, 1, output_padding=1), nn.ReLU(inplace=True))
        self.fuse2 = nn.Sequential(nn.Conv2d(2 * w2, w2, 1), nn.ReLU(inplace=True))
        if in_channels not in (3, 6):
            raise ValueError(f"in_channels must be 3 (blurred image) or 6 (blurred image + prior), got {in_channels}")
        self.out = nn.Conv2d(w2, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"Seed002UNet needs sides that are multiples of 4, got {tuple(x.shape[-2:])}")
        f1 = self.conv1(self.conv0(x))
        f2 = self.conv2(self.pool(f1))
        f3 = self.res2(self.res1(self.pool(f2)))
        u1 = self.fuse1(torch.cat([self.up1(f3), f2], dim=1))
        u2 = self.fuse2(torch.cat([self.up2(u1), f1], dim=1))
        # the residual refines the last three channels: the image, or a refiner's prior
        return x[:, -3:] + self.out(u2)
