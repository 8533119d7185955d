"""Seed 001: the two-stage CNN deblurring generator and its PatchGAN discriminator.

The generator follows the seed's listing: two conv-BN-ReLU stems (``l1``,
``l2``), the ``t1`` block (input plus its 3×3 stride-1 max-pool), the ``t2``
block (a 1×1 bottleneck then four parallel 3×3 convolutions concatenated; one
set of weights shared by its three uses, as in the listing), the ``t4`` block
(input concatenated with its max-pool, then ReLU), the skip concatenations
``l6 = [l5, l4]``, ``l8 = [l7, l3]``, ``l9 = [l8, l2]`` (reduced by the same
conv as ``l8``), ``l11 = [l10, l1]``, and a global residual output
``tanh(final_conv(l12)) + x`` in the seed's [-1, 1] value range.

Two changes make it learn within a CPU budget (both default to the values
used for the shipped weights; ``scale=1, reduce_activation=False`` gives the
listing exactly):

* ``scale``: the body runs on a pixel-unshuffled image (``scale``² × 3
  channels at 1/``scale`` resolution) and the residual is pixel-shuffled
  back. At ``scale=2`` this quarters the compute and doubles the receptive
  field, which camera-shake blur of 5–25 px needs.
* ``reduce_activation``: a ReLU after each ``t3`` reduction conv; in the
  listing those convs are linear, so the body has almost no non-linearity.
  ``reduce_slope`` > 0 makes it a leaky ReLU: with a plain ReLU most of those
  units die early in training (3–9 % of them still fire in the first shipped
  weights, and a refiner's ``l11`` died completely within 500 steps, leaving
  an identity network).

``in_channels=6`` makes it a *refiner* conditioned on a blind method's
result: the input is the blurred image concatenated with that result
(``[blurred, prior]``), and the residual is added to the prior's channels
(the last three), so an untrained refiner returns the prior unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU())


class Seed001Generator(nn.Module):
    """The seed's ``NeuralNetwork`` generator; input and output in [-1, 1].

    ``width`` is the channel count of ``l1`` (32 in the seed); the other
    layers scale with it (``l2`` and the ``t2`` output have ``2·width``).
    """

    value_range: tuple[float, float] = (-1.0, 1.0)

    def __init__(
        self, width: int = 32, scale: int = 2, reduce_activation: bool = True, in_channels: int = 3,
        reduce_slope: float = 0.0,
    ) -> None:
        super().__init__()
        if width < 4 or width % 2:
            raise ValueError(f"width must be an even number >= 4, got {width}")
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        if in_channels not in (3, 6):
            raise ValueError(f"in_channels must be 3 (blurred image) or 6 (blurred image + prior), got {in_channels}")
        self.width = width
        self.scale = scale
        self.in_channels = in_channels
        w = width
        body_in = in_channels * scale * scale
        self.l1 = _conv_bn_relu(body_in, w)
        self.l2 = _conv_bn_relu(w, 2 * w)
        self.maxpool_t1_t4 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.bottleneck = nn.Conv2d(2 * w, w, kernel_size=1)
        self.t2_conv1 = nn.Conv2d(w, w // 2, 3, 1, 1)
        self.t2_conv2 = nn.Conv2d(w, w // 2, 3, 1, 1)
        self.t2_conv3 = nn.Conv2d(w, w // 2, 3, 1, 1)
        self.t2_conv4 = nn.Conv2d(w, w // 2, 3, 1, 1)
        self.t3_reduce_l6 = nn.Conv2d(6 * w, 2 * w, 3, 1, 1)
        self.t3_reduce_l8_l9 = nn.Conv2d(4 * w, 2 * w, 3, 1, 1)
        self.t3_reduce_l11 = nn.Conv2d(3 * w, w, 3, 1, 1)
        self.final_conv = nn.Conv2d(w, 3 * scale * scale, 3, 1, 1)
        self.reduce_activation = reduce_activation
        if not 0.0 <= reduce_slope < 1.0:
            raise ValueError(f"reduce_slope must be in [0, 1), got {reduce_slope}")
        self.reduce_slope = reduce_slope

    @property
    def size_multiple(self) -> int:
        return self.scale

    def t1(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.maxpool_t1_t4(x)

    def t2(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bottleneck(x)
        return torch.cat([self.t2_conv1(b), self.t2_conv2(b), self.t2_conv3(b), self.t2_conv4(b)], dim=1)

    def t4(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(torch.cat([x, self.maxpool_t1_t4(x)], dim=1))

    def _reduce(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        y = conv(x)
        if not self.reduce_activation:
            return y
        return F.leaky_relu(y, self.reduce_slope) if self.reduce_slope else F.relu(y)

    def forward(self, x_input: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(x_input, self.scale) if self.scale > 1 else x_input
        l1_out = self.l1(x)
        l2_out = self.l2(l1_out)
        l3_out = self.t1(l2_out)
        l4_out = self.t2(l3_out)
        l5_out = self.t4(l4_out)
        l6_out = self._reduce(self.t3_reduce_l6, torch.cat([l5_out, l4_out], dim=1))
        l7_out = self.t2(l6_out)
        l8_out = self._reduce(self.t3_reduce_l8_l9, torch.cat([l7_out, l3_out], dim=1))
        l9_out = self._reduce(self.t3_reduce_l8_l9, torch.cat([l8_out, l2_out], dim=1))
        l10_out = self.t2(l9_out)
        l11_out = self._reduce(self.t3_reduce_l11, torch.cat([l10_out, l1_out], dim=1))
        l12_out = self.t1(l11_out)
        residual = self.final_conv(l12_out)
        if self.scale > 1:
            residual = F.pixel_shuffle(residual, self.scale)
        # the residual refines the image in the last three channels (the prior's, for a refiner)
        return torch.tanh(residual) + x_input[:, -3:]


class PatchDiscriminator(nn.Module):
    """The seed's PatchGAN discriminator: four stride-2 4×4 convs, then a 4×4 conv to one map.

    :meth:`logits` gives the pre-sigmoid scores (used by the losses, which is
    numerically safer); :meth:`forward` applies the seed's final sigmoid.
    ``width`` is the first layer's channel count (64 in the seed). Inputs
    need sides of at least 64 pixels.
    """

    value_range: tuple[float, float] = (-1.0, 1.0)

    def __init__(self, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        w = width
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, w, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, 2 * w, 4, 2, 1),
            nn.BatchNorm2d(2 * w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1),
            nn.BatchNorm2d(4 * w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * w, 8 * w, 4, 2, 1),
            nn.BatchNorm2d(8 * w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(8 * w, 1, 4, 1, 0),
        )

    def logits(self, img: torch.Tensor) -> torch.Tensor:
        if min(img.shape[-2:]) < 64:
            raise ValueError(f"PatchDiscriminator needs sides >= 64 pixels, got {tuple(img.shape[-2:])}")
        return self.model(img)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(img))
