"""RealBlur's evaluation protocol: align a restored image to its reference
before measuring it.

Real blurred/sharp pairs (RealBlur, Köhler) are shot through a beam splitter or
in sequence, so the sharp reference and any restoration of the blurred image
differ by a small geometric and photometric change that PSNR would punish as
error. The protocol (RealBlur's ``evaluate_RealBlur.py``, after Köhler et al.'s
code) removes it before measuring:

1. intensity matching: ``z <- s * z`` with the least-squares scale
   ``s = <x, z> / <z, z>`` (``intensity="scale"``, the protocol as published),
   or ``z <- s * z + o`` with least-squares scale and offset
   (``intensity="affine"``, for exposures that also differ by an offset);
2. an ECC homography (``cv2.findTransformECC``, ``MOTION_HOMOGRAPHY``, 100
   iterations, Gaussian pre-filter of 5) from the grey reference to the grey
   matched restoration;
3. warping the restoration onto the reference's pixel grid (bicubic,
   reflected border) and warping an all-ones image the same way (nearest,
   zero border) to get the *valid mask*: pixels that came from inside the
   restored image;
4. metrics on the masked pair only (:func:`models.metrics.psnr` and
   :func:`models.metrics.ssim` with ``mask=``).

Everything here works on float images in [0, 1], HW or HWC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from jobs.errors import InputError

FloatArray = NDArray[np.float64]
INTENSITY_MODES: tuple[str, ...] = ("scale", "affine")


class AlignmentError(InputError, ValueError):
    """A pair that cannot be aligned (mismatched shapes, bad options)."""


@dataclass(frozen=True)
class Alignment:
    """The outcome of :func:`align_to_reference`.

    ``image``: the restoration after intensity matching and warping onto the
    reference grid, zero outside the mask. ``reference``: the reference, zero
    outside the mask. ``mask``: 1.0 where the warped pixel came from inside the
    restored image, else 0.0; all three share the input's shape (float64).
    ``homography``: 3x3 matrix mapping reference coordinates to restored-image
    coordinates. ``scale``/``offset``: the intensity correction applied.
    ``correlation``: ECC's final correlation coefficient (NaN if ECC failed).
    ``converged``: False when ECC failed and the identity warp was used.
    """

    image: FloatArray
    reference: FloatArray
    mask: FloatArray
    homography: FloatArray
    scale: float
    offset: float
    correlation: float
    converged: bool


def match_intensity(image: np.ndarray, reference: np.ndarray, mode: str = "scale") -> tuple[FloatArray, float, float]:
    """Least-squares intensity correction of ``image`` towards ``reference``.

    Both are float arrays of one shape (any layout, values in [0, 1]).
    ``mode="scale"`` fits ``s`` in ``reference ~ s * image`` (RealBlur);
    ``mode="affine"`` fits ``s, o`` in ``reference ~ s * image + o``.
    Returns the corrected image (not clipped) with ``s`` and ``o``. A flat
    image (nothing to fit against) is returned unchanged with ``s = 1``.
    """
    z = np.asarray(image, dtype=np.float64)
    x = np.asarray(reference, dtype=np.float64)
    if z.shape != x.shape:
        raise AlignmentError(f"image shapes differ: {z.shape} vs {x.shape}")
    if mode == "scale":
        zz = float(np.sum(z * z))
        scale = float(np.sum(x * z)) / zz if zz > 0 else 1.0
        return scale * z, scale, 0.0
    if mode == "affine":
        zc = z - z.mean()
        var = float(np.sum(zc * zc))
        if var <= 0:
            return z.copy(), 1.0, 0.0
        scale = float(np.sum(zc * (x - x.mean()))) / var
        offset = float(x.mean() - scale * z.mean())
        return scale * z + offset, scale, offset
    raise AlignmentError(f"unknown intensity matching mode {mode!r}; choose one of {', '.join(INTENSITY_MODES)}")


def _grey(image: np.ndarray) -> NDArray[np.float32]:
    img = np.ascontiguousarray(image, dtype=np.float32)
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def _improves(reference: NDArray[np.float32], image: NDArray[np.float32], warp: NDArray[np.float32]) -> bool:
    """Whether ``warp`` brings ``image`` closer to ``reference`` than leaving it where it is, over the pixels the
    warp keeps: ECC runs its iterations even from a pair already in register, and can drift away from it (an image
    compared with itself scored 26 dB on a 32-px crop)."""
    h, w = reference.shape
    warped = cv2.warpPerspective(image, warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    kept = cv2.warpPerspective(np.ones_like(image), warp, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0
    if not kept.any():
        return False
    return float(np.mean((warped[kept] - reference[kept]) ** 2)) < float(np.mean((image[kept] - reference[kept]) ** 2))


@dataclass(frozen=True)
class AlignOptions:
    """How :func:`align_to_reference` aligns.

    ``intensity``: ``"scale"`` (RealBlur as published) or ``"affine"``.
    ``refit``: after warping, fit the intensity correction again on the valid
    pixels. The published protocol fits once, *before* alignment, where a
    misregistration of a few pixels biases the fit (darkening the restoration
    by several percent on high-contrast pictures); off by default so figures
    stay comparable with RealBlur's tables. ``iterations`` and
    ``gauss_filter_size`` are ECC's (100 and 5 in the protocol).
    """

    intensity: str = "scale"
    refit: bool = False
    iterations: int = 100
    gauss_filter_size: int = 5

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise AlignmentError(
                f"unknown intensity matching mode {self.intensity!r}; choose one of {', '.join(INTENSITY_MODES)}"
            )
        if self.iterations < 1:
            raise AlignmentError(f"ECC iterations must be at least 1, got {self.iterations}")
        if self.gauss_filter_size < 1 or self.gauss_filter_size % 2 == 0:
            raise AlignmentError(f"gauss_filter_size must be a positive odd number, got {self.gauss_filter_size}")


REALBLUR = AlignOptions()


def align_to_reference(
    restored: np.ndarray,
    reference: np.ndarray,
    options: AlignOptions = REALBLUR,
) -> Alignment:
    """Align ``restored`` onto ``reference`` by RealBlur's protocol (see the
    module docstring) and return the masked pair ready for metrics.

    ``restored``, ``reference``: float arrays in [0, 1], same shape, HW or
    HWC with 1 or 3 channels. If ECC does not converge (e.g. a flat image) the
    identity warp is used and ``converged`` is False, so one odd image does not
    stop an evaluation job.
    """
    z = np.asarray(restored, dtype=np.float64)
    x = np.asarray(reference, dtype=np.float64)
    if z.shape != x.shape:
        raise AlignmentError(f"restored image has shape {z.shape} but the reference has {x.shape}")
    if z.ndim not in (2, 3) or (z.ndim == 3 and z.shape[2] not in (1, 3)):
        raise AlignmentError(f"expected HW or HWC images with 1 or 3 channels, got shape {z.shape}")
    matched, scale, offset = match_intensity(z, x, options.intensity)
    squeeze = z.ndim == 3 and z.shape[2] == 1
    if squeeze:
        matched, x = matched[..., 0], x[..., 0]

    warp = np.eye(3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, options.iterations, 0.0)
    try:
        correlation, warp = cv2.findTransformECC(
            _grey(x), _grey(matched), warp, cv2.MOTION_HOMOGRAPHY, criteria, None, options.gauss_filter_size
        )
        # a correlation above 1 is ECC's arithmetic breaking down (seen on tiny images), not a fit
        converged = math.isfinite(correlation) and correlation <= 1.0 + 1e-6 and bool(np.all(np.isfinite(warp)))
    except cv2.error:
        correlation, converged = math.nan, False
    if not converged or not _improves(_grey(x), _grey(matched), warp):
        # no fit, or ECC drifted from a pair already in register (then the identity is the fit: converged stays)
        warp = np.eye(3, dtype=np.float32)

    h, w = x.shape[:2]
    warped = cv2.warpPerspective(
        np.ascontiguousarray(matched, dtype=np.float32), warp, (w, h),
        flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT,
    ).astype(np.float64)
    mask = cv2.warpPerspective(
        np.ones(matched.shape, dtype=np.float32), warp, (w, h),
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    ).astype(np.float64)
    if options.refit and mask.any():
        valid = mask > 0
        _, rescale, reoffset = match_intensity(warped[valid], x[valid], options.intensity)
        warped = rescale * warped + reoffset
        scale, offset = rescale * scale, rescale * offset + reoffset
    image = warped * mask
    ref = x * mask
    if squeeze:
        image, ref, mask = image[..., None], ref[..., None], mask[..., None]
    return Alignment(
        image=image,
        reference=ref,
        mask=mask,
        homography=warp.astype(np.float64),
        scale=scale,
        offset=offset,
        correlation=float(correlation),
        converged=converged,
    )
