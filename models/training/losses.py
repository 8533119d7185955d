"""The seeds' training losses and the SSIM/PSNR used for validation.

All functions take (N, C, H, W) float tensors in [0, 1] unless stated
otherwise; models working in [-1, 1] are mapped back before the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    ax = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004; Gaussian 11×11, σ=1.5, valid region) per image, shape (N,).

    Differentiable; inputs (N, C, H, W) with values spanning ``data_range``.
    Sides smaller than ``window`` use a window as large as the smaller side.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    size = min(window, x.shape[-1], x.shape[-2])
    c = x.shape[1]
    w = _gaussian_window(size, sigma, c, x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x = F.conv2d(x, w, groups=c)
    mu_y = F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(dim=1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image, shape (N,); ``inf`` where the images are identical."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def _reduce(per_pixel: torch.Tensor, reduction: str) -> torch.Tensor:
    per_sample = per_pixel.flatten(1).mean(dim=1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def sobel_loss(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean absolute difference of horizontal and vertical Sobel responses (seed 002).

    ``reduction='none'`` gives one value per image, shape (N,).
    """
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype) / 4
    k = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
    c = x.shape[1]
    k = k.repeat(c, 1, 1, 1)
    gx = F.conv2d(x, k, groups=c)
    gy = F.conv2d(y, k, groups=c)
    return _reduce((gx - gy).abs(), reduction)


def fourier_loss(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean absolute difference of the 2-D Fourier transforms (orthonormal; seed 002)."""
    fx = torch.fft.rfft2(x.float(), norm="ortho")
    fy = torch.fft.rfft2(y.float(), norm="ortho")
    return _reduce((fx - fy).abs(), reduction)


BALANCES = ("mean", "log")


def _aggregate(weighted: list[tuple[float, torch.Tensor]], balance: str) -> torch.Tensor:
    """Combine weighted per-image loss terms, each (N,): Σ λ·mean(term), or Σ λ·mean(log term).

    With ``balance='log'`` every image's *relative* improvement counts the same,
    as in a mean PSNR over images (the MSE term becomes −PSNR/10·ln 10); a plain
    mean is dominated by the most blurred images and lets the network
    over-sharpen mildly blurred ones.
    """
    if balance == "log":
        return sum(w * torch.log(t + 1e-8).mean() for w, t in weighted if w)  # type: ignore[return-value]
    if balance == "mean":
        return sum(w * t.mean() for w, t in weighted if w)  # type: ignore[return-value]
    raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")


@dataclass(frozen=True)
class Seed001Loss:
    """Seed 001's generator objective: λ_mse·MSE + λ_ssim·(1 − SSIM) + λ_adv·BCE(D(G(x)), real).

    Defaults are the seed's (1.0, 0.3, 0.01). With ``balance='log'`` the
    MSE and SSIM terms are averaged over images in the log domain (see
    :func:`_aggregate`); the adversarial term stays as it is. It is given the
    discriminator's logits on the restored images (``None`` skips it).
    """

    mse: float = 1.0
    ssim: float = 0.3
    adv: float = 0.01
    balance: str = "mean"

    def __call__(self, restored: torch.Tensor, sharp: torch.Tensor, fake_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        mse = (restored - sharp).pow(2).flatten(1).mean(dim=1)
        dssim = 1.0 - ssim(restored, sharp)
        terms = {"mse": mse.mean(), "ssim": dssim.mean()}
        total = _aggregate([(self.mse, mse), (self.ssim, dssim)], self.balance)
        if fake_logits is not None and self.adv > 0:
            terms["adv"] = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
            total = total + self.adv * terms["adv"]
        terms["total"] = total
        return terms


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Seed 001's discriminator objective: the mean of the BCE on real (→1) and fake (→0) patches."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)


@dataclass(frozen=True)
class Seed002Loss:
    """Seed 002's merged objective: λ_mae·MAE + λ_sobel·Sobel + λ_fourier·Fourier.

    The seed names the terms but not their weights; these defaults give the
    three terms similar magnitudes on blurred inputs. ``balance='log'``
    averages each term's logarithm over images (see :func:`_aggregate`).
    """

    mae: float = 1.0
    sobel: float = 0.5
    fourier: float = 0.5
    balance: str = "mean"

    def __call__(self, restored: torch.Tensor, sharp: torch.Tensor, fake_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        mae = (restored - sharp).abs().flatten(1).mean(dim=1)
        sob = sobel_loss(restored, sharp, reduction="none")
        fou = fourier_loss(restored, sharp, reduction="none")
        total = _aggregate([(self.mae, mae), (self.sobel, sob), (self.fourier, fou)], self.balance)
        return {"mae": mae.mean(), "sobel": sob.mean(), "fourier": fou.mean(), "total": total}
