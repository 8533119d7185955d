"""Parametric blur kernels (defocus discs, Gaussians) chosen by their marginal likelihood.

A free-form blind estimate (:mod:`models.l0_blind`) fits any kernel shape, so
on a defocused photograph it returns a disc that is roughly right but
ragged: a few tenths of a pixel of error at its rim cost 0.5 dB to several dB. When the
blur belongs to a family with one parameter, the parameter can be found far
more precisely by asking which member of the family makes the observed image
most probable.

**The score.** Under a Gaussian image model whose power spectrum falls as
``A / |D(f)|²`` (``D`` the gradient's transfer function: natural images have
roughly ``1/f²`` spectra) and white noise of variance ``σ²``, a blurred image
``y = k * x + n`` has independent Fourier coefficients with variance
``v(f) = A |K(f)|² / |D(f)|² + σ²``, so

    -log p(y | k) = Σ_f |Y(f)|² / v(f) + log v(f)       (up to constants)

with ``A`` maximised out. This is the marginal likelihood of the kernel with
the image integrated out (Levin et al. 2011); unlike the joint fit of an image
and a kernel it is not biased towards sharp latents and wide kernels. The
image is made periodic first (Moisan's periodic + smooth decomposition), so
the frame's edges do not read as a cross in the spectrum.

On crops of photographs blurred by discs of radius 2 and 4 px with 0.5 %
noise, the best disc's radius was right to 0.1 px in 20 of 20 cases
(``bench/RESULTS.md``, 2026-12-05). Within one family the score is sharp;
*between* families it is not to be trusted: the image model is only roughly
right, and a Gaussian of σ 1.1 px explains a 1.5-px disc better than the disc
does at low noise. Callers choose the family by other evidence
(:func:`models.l0_blind.defocus_kernels` asks the free-form estimate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from models.deconv import psf2otf
from models.synthetic_blur import disk_kernel, gaussian_kernel

LOG_SCALES = torch.linspace(-9.0, 1.0, 21)  # log10 of the image model's scale A, searched per kernel
COARSE_STEP = 0.5  # px between the parameters of the coarse search ...
FINE_STEP = 0.1  # ... and of the fine search around the coarse optimum
MIN_PARAMETER = 0.5


@dataclass(frozen=True)
class ParametricFit:
    """The best member of a kernel family for each image of a batch."""

    family: str  # "disk" (parameter: radius) or "gaussian" (parameter: sigma)
    parameters: torch.Tensor  # (N,) radius or sigma in pixels
    scores: torch.Tensor  # (N,) negative log-likelihood per frequency (lower explains the image better)


def family_kernel(family: str, parameter: float) -> np.ndarray:
    """The kernel of ``family`` ("disk" or "gaussian") with this radius or sigma, odd sides, sum 1."""
    if family == "disk":
        return disk_kernel(parameter)
    if family == "gaussian":
        return gaussian_kernel(parameter)
    raise ValueError(f"unknown kernel family {family!r}; expected 'disk' or 'gaussian'")


def family_extent(family: str, parameter: float) -> int:
    """Side of the square :func:`family_kernel` returns for ``parameter``."""
    if family == "disk":
        return 2 * math.ceil(parameter) + 1
    return 2 * math.ceil(3.0 * parameter) + 1


def periodic_component(y: torch.Tensor) -> torch.Tensor:
    """Moisan's periodic component of images (N, 1, H, W): the image minus the smooth part its borders imply."""
    h, w = y.shape[-2:]
    v = torch.zeros_like(y)
    v[..., 0, :] += y[..., -1, :] - y[..., 0, :]
    v[..., -1, :] += y[..., 0, :] - y[..., -1, :]
    v[..., :, 0] += y[..., :, -1] - y[..., :, 0]
    v[..., :, -1] += y[..., :, 0] - y[..., :, -1]
    cy = torch.cos(2 * math.pi * torch.fft.fftfreq(h, dtype=y.dtype, device=y.device))[:, None]
    cx = torch.cos(2 * math.pi * torch.fft.rfftfreq(w, dtype=y.dtype, device=y.device))[None, :]
    denominator = 2 * cy + 2 * cx - 4
    denominator[0, 0] = 1.0
    smooth_hat = torch.fft.rfft2(v) / denominator
    smooth_hat[..., 0, 0] = 0.0
    return y - torch.fft.irfft2(smooth_hat, s=(h, w))


class SpectrumScorer:
    """Scores kernels for a batch of luminance images by :func:`negative log-likelihood <score>`."""

    def __init__(self, y: torch.Tensor, sigma: torch.Tensor) -> None:
        """``y`` (N, 1, H, W) luminance in [0, 1]; ``sigma`` (N,) its noise level."""
        y = y.double()
        h, w = y.shape[-2:]
        self.shape = (h, w)
        p = periodic_component(y)
        spectrum = torch.fft.rfft2(p - p.mean(dim=(-2, -1), keepdim=True))
        power = (spectrum.real**2 + spectrum.imag**2) / (h * w)
        # rfft2 keeps half the plane: the columns 1 .. w/2 - 1 stand for two coefficients each
        weight = torch.full((w // 2 + 1,), 2.0, dtype=y.dtype, device=y.device)
        weight[0] = 1.0
        if w % 2 == 0:
            weight[-1] = 1.0
        weight = weight.expand(h, -1).clone()
        weight[0, 0] = 0.0  # the mean carries no information about the blur
        self.weight = weight
        self.count = float(weight.sum())
        fy = torch.fft.fftfreq(h, dtype=y.dtype, device=y.device)[:, None]
        fx = torch.fft.rfftfreq(w, dtype=y.dtype, device=y.device)[None, :]
        gradient_power = 4 * torch.sin(math.pi * fy) ** 2 + 4 * torch.sin(math.pi * fx) ** 2
        gradient_power[0, 0] = 1.0
        self.inverse_gradient = 1.0 / gradient_power
        self.power = power[:, 0]  # (N, H, W/2+1)
        self.noise = (sigma.double().view(-1, 1, 1).to(y.device)) ** 2
        self.scales = (10.0 ** LOG_SCALES.to(y.device, y.dtype)).view(-1, 1, 1)

    def transfer_power(self, kernel: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``|K(f)|²`` of one kernel (kh, kw) on this scorer's frequency grid."""
        otf = psf2otf(torch.as_tensor(kernel, dtype=torch.float64, device=self.power.device), self.shape)
        return otf.real**2 + otf.imag**2

    def score(self, transfer_power: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Negative log-likelihood per frequency of images ``rows`` (default all) under one kernel -> (len(rows),).

        ``A`` is maximised out: searched on a log grid and refined by a
        parabola through the best grid point and its neighbours.
        """
        shape_term = transfer_power * self.inverse_gradient  # (H, W')
        out = []
        for i in range(self.power.shape[0]) if rows is None else rows:
            variance = self.scales * shape_term + self.noise[i]  # (S, H, W')
            values = ((self.power[i] / variance + torch.log(variance)) * self.weight).sum(dim=(-2, -1))
            out.append(_parabolic_minimum(values))
        return torch.stack(out) / self.count

    def best(self, family: str, max_side: int, upper: float | None = None) -> ParametricFit:
        """The member of ``family`` (no wider than ``max_side`` px) that explains each image best.

        ``upper`` caps the parameters searched (e.g. twice a rough estimate's):
        the coarse search's cost grows with the range.
        """
        cap = math.inf if upper is None else upper
        largest = MIN_PARAMETER
        while family_extent(family, largest + FINE_STEP) <= max_side and largest + FINE_STEP <= cap:
            largest += FINE_STEP
        powers: dict[float, torch.Tensor] = {}  # each parameter's |K|² once, shared by the images and both searches

        def power(parameter: float) -> torch.Tensor:
            key = round(parameter, 6)
            if key not in powers:
                powers[key] = self.transfer_power(family_kernel(family, parameter))
            return powers[key]

        coarse = np.arange(MIN_PARAMETER, largest + 1e-9, COARSE_STEP)
        n = self.power.shape[0]
        coarse_scores = torch.stack([self.score(power(float(p))) for p in coarse], dim=1)  # (N, P)
        best_param, best_score = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
        for i in range(n):
            centre = float(coarse[int(coarse_scores[i].argmin())])
            fine = np.arange(max(MIN_PARAMETER, centre - COARSE_STEP + FINE_STEP),
                             min(largest, centre + COARSE_STEP - FINE_STEP) + 1e-9, FINE_STEP)
            scores = torch.stack([self.score(power(float(p)), [i])[0] for p in fine])
            j = int(scores.argmin())
            best_param[i], best_score[i] = float(fine[j]), scores[j]
        return ParametricFit(family, best_param, best_score)


def _parabolic_minimum(values: torch.Tensor) -> torch.Tensor:
    """The minimum of a function sampled on an even grid, refined by a parabola through the best sample."""
    j = int(values.argmin())
    if j == 0 or j == values.numel() - 1:
        return values[j]
    a, b, c = values[j - 1], values[j], values[j + 1]
    curvature = a - 2 * b + c
    if curvature <= 0:
        return b
    return b - (a - c) ** 2 / (8 * curvature)
