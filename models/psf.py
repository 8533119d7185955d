"""Point-spread functions as torch kernels.

A PSF described as text (``gaussian:sigma=2``, ``disk:radius=4``,
``motion:length=15,angle=30``; see :mod:`models.psf_spec`) becomes a 2-D float
kernel with odd sides that sums to 1. The pixels come from the NumPy
generators in :mod:`models.synthetic_blur`, so the same description yields the
same kernel in the models, the benchmarks and the synthetic test data.
"""

from __future__ import annotations

import numpy as np
import torch

from models.psf_spec import parse_psf
from models.synthetic_blur import disk_kernel, gaussian_kernel, linear_motion_kernel


def psf_array(text: str) -> np.ndarray:
    """The kernel described by ``text`` as a float64 NumPy array (odd sides, sum 1).

    Raises ``ValueError`` naming the bad part of the description.
    """
    kind, values = parse_psf(text)
    if kind == "gaussian":
        kernel = gaussian_kernel(values["sigma"])
    elif kind == "disk":
        kernel = disk_kernel(values["radius"])
    else:
        kernel = linear_motion_kernel(values["length"], values["angle"])
    return _odd_sides(kernel)


def psf_kernel(text: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernel described by ``text`` as a float32 (kh, kw) tensor on ``device``."""
    return torch.from_numpy(psf_array(text)).to(device=device, dtype=torch.float32)


def _odd_sides(kernel: np.ndarray) -> np.ndarray:
    """Zero-pad a kernel to odd sides so it has a well-defined centre pixel."""
    kh, kw = kernel.shape
    if kh % 2 and kw % 2:
        return kernel
    return np.pad(kernel, ((0, 1 - kh % 2), (0, 1 - kw % 2)))
