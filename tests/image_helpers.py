"""Small helpers the model tests share: PSNR and NumPy HWC <-> torch NCHW conversion."""

from __future__ import annotations

import numpy as np
import torch


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """PSNR in dB of float images in [0, 1] (any layout, same shape)."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(1.0 / np.mean((a64 - b64) ** 2)))


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """A float32 (1, C, H, W) batch from an HxW or HxWxC image."""
    arr = img[..., None] if img.ndim == 2 else img
    return torch.from_numpy(arr.transpose(2, 0, 1)[None].copy()).float()


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """The first image of a (N, C, H, W) batch as HxW (one channel) or HxWxC."""
    arr = x[0].detach().cpu().numpy().transpose(1, 2, 0)
    return arr[..., 0] if arr.shape[2] == 1 else arr
