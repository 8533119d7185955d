"""Image-quality metrics as pure NumPy functions, computed the way the papers do.

Layout and range conventions (every public function repeats the ones it uses):

* Images are ``HW`` (grey) or ``HWC`` (colour) NumPy arrays.
* Integer images are measured at their own range: uint8 -> 255,
  uint16 -> 65535 ("16-bit images at their own range"). Float images have no
  implied range, so the full-reference primitives ask for ``data_range``.
* Colour channel order does not matter for any metric here except the
  luminance used by the no-reference measures (``channel_order``).

Two SSIM variants are provided, both with the MATLAB protocol's constants
(11x11 Gaussian window, sigma = 1.5, K1 = 0.01, K2 = 0.03):

``"channel-mean"`` (:data:`SSIM_CHANNEL_MEAN`)
    Wang et al.'s reference ``ssim_index.m``: a 2-D Gaussian per channel, the
    SSIM map kept only where the window fits inside the image (the *valid*
    region), averaged per channel and then over channels. Identical to
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=R, channel_axis=-1)``
    and to BasicSR's ``calculate_ssim``. RealBlur's evaluation uses it.

``"3d"`` (:data:`SSIM_3D`)
    What MATLAB's ``ssim(A, ref)`` returns for an ``H x W x 3`` array, and so
    what the GoPro tables of MPRNet, Restormer, NAFNet, FFTformer report (their
    ``evaluate_GOPRO_HIDE.m`` calls ``ssim`` on the RGB images directly):
    MATLAB treats the image as a volume and filters it with a *3-D* Gaussian
    (sigma 1.5 along rows, columns **and channels**, 11 taps per axis), pads
    every axis by replicating the edge, and averages the full-size map over all
    ``H x W x C`` positions. On a grey image it reduces to MATLAB's 2-D
    ``ssim`` (replicate padding, full map). This is MATLAB's ``ssim.m``
    (``getGaussianWeightingFilter`` builds an 11x11x11 Gaussian for 3-D input,
    ``imfilter(..., 'conv', 'replicate')``, ``mean(ssimmap(:))``) and the
    ``_ssim_3d`` Python ports in NAFNet's and Restormer's code (a Conv3d with
    replicate padding, run in float32). We compute in float64; the float32
    port differs from it by about 4e-5 on a 640x360 photograph (cancellation
    in E[x^2] - E[x]^2), below the 3 decimals the tables print.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
from numpy.typing import NDArray

from jobs.errors import InputError
from models.alignment import REALBLUR, AlignOptions, align_to_reference
from models.tone import REC601_LUMA

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_CHANNEL_MEAN = "channel-mean"
SSIM_3D = "3d"
SSIM_VARIANTS: tuple[str, ...] = (SSIM_CHANNEL_MEAN, SSIM_3D)

# Rec. 601 luma weights, as in MATLAB's rgb2gray and OpenCV's cvtColor.
_LUMA_RGB = np.array(REC601_LUMA)

FloatArray = NDArray[np.float64]


class MetricInputError(InputError, ValueError):
    """An image (pair) that a metric cannot be computed on: wrong shape, size,
    dtype or range. The message names the bad value."""


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> FloatArray:
    """The normalised 1-D Gaussian whose outer product is MATLAB's
    ``fspecial('gaussian', size, sigma)`` (and ``cv2.getGaussianKernel``)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return w / w.sum()


def data_range_for(dtype: np.dtype | type) -> float:
    """The intensity range an unsigned-integer image is measured at
    (uint8 -> 255, uint16 -> 65535). Other dtypes have no implied range."""
    dt = np.dtype(dtype)
    if dt.kind == "u":
        return float(np.iinfo(dt).max)
    if dt == np.bool_:
        return 1.0
    raise MetricInputError(
        f"images of dtype {dt} have no implied intensity range; pass data_range "
        "explicitly (1.0 for float images in [0, 1])"
    )


def to_dtype(image: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Quantise a float image in [0, 1] to an unsigned-integer dtype the way the
    papers' scripts save their outputs (clip, scale, round to nearest, as
    ``skimage.img_as_ubyte``). Integer images of that dtype pass unchanged."""
    dt = np.dtype(dtype)
    image = np.asarray(image)
    if image.dtype == dt:
        return image
    if image.dtype.kind != "f":
        raise MetricInputError(
            f"cannot convert a {image.dtype} image to {dt}: only float images in [0, 1] "
            "are quantised; decode both images to the same bit depth"
        )
    top = data_range_for(dt)
    return np.rint(np.clip(image, 0.0, 1.0) * top).astype(dt)


def _check_layout(image: np.ndarray, name: str) -> None:
    if image.ndim not in (2, 3):
        raise MetricInputError(
            f"{name} has shape {image.shape}; expected HW (grey) or HWC (colour)"
        )


def _pair(a: np.ndarray, b: np.ndarray, data_range: float | None) -> tuple[FloatArray, FloatArray, float]:
    """Validate a pair and return both as float64 plus the range to measure at."""
    a = np.asarray(a)
    b = np.asarray(b)
    _check_layout(a, "first image")
    _check_layout(b, "second image")
    if a.shape != b.shape:
        raise MetricInputError(f"image shapes differ: {a.shape} vs {b.shape}; compare images of the same size")
    if data_range is None:
        if a.dtype != b.dtype:
            raise MetricInputError(
                f"image dtypes differ ({a.dtype} vs {b.dtype}); convert them to one bit depth "
                "or pass data_range"
            )
        data_range = data_range_for(a.dtype)
    if not (math.isfinite(data_range) and data_range > 0):
        raise MetricInputError(f"data_range must be a positive number, got {data_range!r}")
    return a.astype(np.float64), b.astype(np.float64), float(data_range)


def _crop(image: FloatArray, border: int) -> FloatArray:
    if border < 0 or int(border) != border:
        raise MetricInputError(f"crop_border must be a non-negative integer, got {border!r}")
    if border == 0:
        return image
    h, w = image.shape[:2]
    if 2 * border >= min(h, w):
        raise MetricInputError(f"crop_border={border} leaves nothing of a {h}x{w} image")
    return image[border:-border, border:-border, ...]


def _mask_like(mask: np.ndarray | None, image: FloatArray) -> FloatArray | None:
    if mask is None:
        return None
    m = np.asarray(mask, dtype=np.float64)
    if m.ndim == 2 and image.ndim == 3:
        m = np.repeat(m[:, :, None], image.shape[2], axis=2)
    if m.shape != image.shape:
        raise MetricInputError(f"mask shape {np.shape(mask)} does not match image shape {image.shape}")
    return m


def psnr(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float | None = None,
    crop_border: int = 0,
    mask: np.ndarray | None = None,
) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(R^2 / MSE)``.

    ``a``, ``b``: HW or HWC arrays of the same shape; uint8 is measured at
    R = 255, uint16 at R = 65535, float needs an explicit ``data_range``. The
    MSE runs over every pixel and channel (MATLAB's ``psnr`` on RGB).
    ``crop_border`` drops that many pixels from each edge first. ``mask`` (HW
    or same shape, 0/1) restricts the MSE to valid pixels, as RealBlur's
    protocol does after alignment. Identical images give ``inf``.
    """
    x, y, r = _pair(a, b, data_range)
    m = _mask_like(mask, x)
    x, y = _crop(x, crop_border), _crop(y, crop_border)
    sq = (x - y) ** 2
    if m is None:
        mse = float(sq.mean())
    else:
        m = _crop(m, crop_border)
        count = float(m.sum())
        if count <= 0:
            raise MetricInputError("the mask selects no pixels; there is nothing to measure")
        mse = float((sq * m).sum() / count)
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(r * r / mse)


def _filter_2d(plane: FloatArray, border: int) -> FloatArray:
    w = gaussian_window_1d()
    return cv2.sepFilter2D(plane, cv2.CV_64F, w, w, borderType=border)


def _channel_mix_matrix(channels: int) -> FloatArray:
    """Matrix M with ``out[..., c] = sum_j M[c, j] * in[..., j]``: the 11-tap
    Gaussian along the channel axis with edge replication."""
    w = gaussian_window_1d()
    half = SSIM_WINDOW // 2
    mix = np.zeros((channels, channels))
    for c in range(channels):
        for k, wk in enumerate(w):
            mix[c, min(max(c + k - half, 0), channels - 1)] += wk
    return mix


def _smoother(variant: str, shape: tuple[int, ...]) -> Callable[[FloatArray], FloatArray]:
    """Local-mean operator of an SSIM variant, applied to an HW or HWC array."""
    half = SSIM_WINDOW // 2
    if variant == SSIM_CHANNEL_MEAN:
        def smooth(v: FloatArray) -> FloatArray:
            # Any border mode works: the cropped map only uses interior windows.
            if v.ndim == 2:
                return _filter_2d(v, cv2.BORDER_REFLECT)[half:-half, half:-half]
            planes = [_filter_2d(np.ascontiguousarray(v[..., c]), cv2.BORDER_REFLECT) for c in range(v.shape[2])]
            return np.stack(planes, axis=2)[half:-half, half:-half]
        return smooth
    if variant == SSIM_3D:
        mix = _channel_mix_matrix(shape[2]) if len(shape) == 3 else None

        def smooth(v: FloatArray) -> FloatArray:
            if v.ndim == 2:
                return _filter_2d(v, cv2.BORDER_REPLICATE)
            planes = [_filter_2d(np.ascontiguousarray(v[..., c]), cv2.BORDER_REPLICATE) for c in range(v.shape[2])]
            # A plain weighted sum of planes: matmul over a trailing axis of 3 is far slower.
            mixed = [sum(float(wt) * p for wt, p in zip(row, planes, strict=True)) for row in mix]  # type: ignore[union-attr]
            return np.stack(mixed, axis=2)
        return smooth
    raise MetricInputError(f"unknown SSIM variant {variant!r}; choose one of {', '.join(SSIM_VARIANTS)}")


def ssim_map(x: FloatArray, y: FloatArray, data_range: float, variant: str) -> FloatArray:
    """The local SSIM map of two float64 HW/HWC arrays measured at ``data_range``.

    For ``"channel-mean"`` the map covers the valid region only (H-10, W-10);
    for ``"3d"`` it has the input's full shape.
    """
    smooth = _smoother(variant, x.shape)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = smooth(x), smooth(y)
    var_x = smooth(x * x) - mu_x * mu_x
    var_y = smooth(y * y) - mu_y * mu_y
    cov = smooth(x * y) - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return num / den


def ssim(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float | None = None,
    variant: str = SSIM_CHANNEL_MEAN,
    crop_border: int = 0,
    mask: np.ndarray | None = None,
) -> float:
    """Structural similarity, MATLAB protocol (11x11 Gaussian, sigma 1.5,
    K1 = 0.01, K2 = 0.03, population covariances).

    ``a``, ``b``: HW or HWC arrays of the same shape; uint8 is measured at
    R = 255, uint16 at 65535, float needs ``data_range``. ``variant`` is
    ``"channel-mean"`` (Wang's valid-region SSIM averaged over channels,
    equal to skimage's Gaussian SSIM) or ``"3d"`` (MATLAB ``ssim`` on the
    array as a volume, as the GoPro papers report); see the module docstring.
    ``crop_border`` drops pixels from each edge first. ``mask`` (HW or same
    shape, 0/1) averages the map over valid pixels only, per channel and then
    over channels, as RealBlur's evaluation does. Both sides must be at least
    11 pixels after cropping. Identical images give exactly 1.
    """
    x, y, r = _pair(a, b, data_range)
    m = _mask_like(mask, x)
    x, y = _crop(x, crop_border), _crop(y, crop_border)
    h, w = x.shape[:2]
    if min(h, w) < SSIM_WINDOW:
        raise MetricInputError(
            f"image of {h}x{w} pixels (after crop_border={crop_border}) is smaller than "
            f"the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window"
        )
    smap = ssim_map(x, y, r, variant)
    if m is None:
        return float(smap.mean())
    m = _crop(m, crop_border)
    if variant == SSIM_CHANNEL_MEAN:
        half = SSIM_WINDOW // 2
        m = m[half:-half, half:-half]
    m3 = m if m.ndim == 3 else m[:, :, None]
    s3 = smap if smap.ndim == 3 else smap[:, :, None]
    counts = m3.sum(axis=(0, 1))
    if np.any(counts <= 0):
        raise MetricInputError("the mask selects no pixels inside the SSIM window's reach")
    return float(np.mean((s3 * m3).sum(axis=(0, 1)) / counts))


def _colour_planes(image: np.ndarray) -> np.ndarray:
    """Drop an alpha channel (HW2 grey+alpha, HWC4 colour+alpha) and a singleton
    channel axis: metrics describe the picture, not its transparency."""
    image = np.asarray(image)
    _check_layout(image, "image")
    if image.ndim == 3:
        channels = image.shape[2]
        if channels in (2, 4):
            image = image[..., : channels - 1]
        elif channels not in (1, 3):
            raise MetricInputError(f"image has {channels} channels; expected 1, 2, 3 or 4")
        if image.shape[2] == 1:
            image = image[..., 0]
    return image


def full_reference_metrics(
    restored: np.ndarray,
    sharp: np.ndarray,
    *,
    crop_border: int = 0,
    ssim_variant: str = SSIM_3D,
    align: AlignOptions | bool = False,
) -> dict[str, float]:
    """PSNR and SSIM of a restored image against its sharp reference, following
    the papers' protocol, for evaluation jobs.

    ``sharp``: HW or HWC (RGB/BGR, optional alpha which is ignored), uint8 or
    uint16 measured at its own range, or float in [0, 1]. ``restored``: the
    same shape, either the same dtype or float in [0, 1]; a float restored
    image is first quantised to the sharp image's bit depth, as the papers
    save their outputs to PNG before measuring.

    Returns ``psnr``, ``ssim_3d``, ``ssim_channel_mean`` and ``ssim`` (a copy
    of the variant chosen by ``ssim_variant``; the default ``"3d"`` is the
    GoPro tables' figure). ``align=True`` (RealBlur's published settings,
    :data:`models.alignment.REALBLUR`) or an :class:`AlignOptions` first
    applies RealBlur's protocol (intensity matching, ECC homography, metrics
    on the valid mask; see :mod:`models.alignment`) and adds
    ``alignment_valid_fraction`` and ``alignment_converged`` (1.0 or 0.0);
    RealBlur's tables report ``ssim_channel_mean``.
    """
    if ssim_variant not in SSIM_VARIANTS:
        raise MetricInputError(f"unknown SSIM variant {ssim_variant!r}; choose one of {', '.join(SSIM_VARIANTS)}")
    ref = _colour_planes(sharp)
    out = _colour_planes(restored)
    if out.shape != ref.shape:
        raise MetricInputError(
            f"restored image has shape {np.shape(restored)} but the sharp image has "
            f"{np.shape(sharp)}; they must match (same size and channels)"
        )
    if out.dtype.kind != "f" and out.dtype != ref.dtype:
        raise MetricInputError(
            f"restored image is {out.dtype} but the sharp image is {ref.dtype}: give the restoration as float in "
            "[0, 1] or in the sharp image's own sample type")
    if ref.dtype.kind == "f":
        data_range = 1.0
        out = out.astype(np.float64)
    else:
        data_range = data_range_for(ref.dtype)
        out = to_dtype(out, ref.dtype)
    result: dict[str, float] = {}
    mask = None
    if align is not False:
        options = REALBLUR if align is True else align
        ref = _crop(ref.astype(np.float64), crop_border) / data_range
        out = _crop(out.astype(np.float64), crop_border) / data_range
        aligned = align_to_reference(out, ref, options)
        out, ref, mask = aligned.image, aligned.reference, aligned.mask
        data_range, crop_border = 1.0, 0
        result["alignment_valid_fraction"] = float(mask.mean())
        result["alignment_converged"] = 1.0 if aligned.converged else 0.0
    result["psnr"] = psnr(out, ref, data_range, crop_border, mask)
    result["ssim_3d"] = ssim(out, ref, data_range, SSIM_3D, crop_border, mask)
    result["ssim_channel_mean"] = ssim(out, ref, data_range, SSIM_CHANNEL_MEAN, crop_border, mask)
    result["ssim"] = result["ssim_3d"] if ssim_variant == SSIM_3D else result["ssim_channel_mean"]
    return result


def luminance(image: np.ndarray, channel_order: str = "RGB") -> FloatArray:
    """Rec. 601 luma of an image, as float64 in [0, 1].

    ``image``: HW or HWC (1-4 channels; alpha ignored), uint8/uint16 scaled by
    their range, float assumed in [0, 1]. ``channel_order`` is ``"RGB"`` or
    ``"BGR"`` (what OpenCV decodes to).
    """
    if channel_order not in ("RGB", "BGR"):
        raise MetricInputError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    planes = _colour_planes(image)
    scale = 1.0 if planes.dtype.kind == "f" else data_range_for(planes.dtype)
    values = planes.astype(np.float64) / scale
    if values.ndim == 2:
        return values
    weights = _LUMA_RGB if channel_order == "RGB" else _LUMA_RGB[::-1]
    return values @ weights


def _luminance_at_least(image: np.ndarray, channel_order: str, side: int) -> FloatArray:
    luma = luminance(image, channel_order)
    if min(luma.shape) < side:
        raise MetricInputError(
            f"image of {luma.shape[0]}x{luma.shape[1]} pixels is too small for a sharpness measure "
            f"(needs at least {side}x{side})"
        )
    return luma


def laplacian_variance(image: np.ndarray, channel_order: str = "RGB") -> float:
    """Variance of the 4-neighbour Laplacian of the luminance in [0, 1] (so 8-
    and 16-bit versions of one picture score alike). Higher means sharper;
    only comparable between images of similar content and size.

    ``image``: HW or HWC, uint8/uint16 or float in [0, 1].
    """
    luma = _luminance_at_least(image, channel_order, 3)
    return float(cv2.Laplacian(luma, cv2.CV_64F, ksize=1, borderType=cv2.BORDER_REFLECT).var())


def no_reference_metrics(image: np.ndarray, channel_order: str = "RGB") -> dict[str, float]:
    """Sharpness measures needing no ground truth, for deblur jobs.

    ``image``: HW or HWC (alpha ignored), uint8/uint16 or float in [0, 1].
    Returns ``laplacian_variance`` (higher is sharper) and ``blur_effect``
    (Crete et al.'s perceptual blur via ``skimage.measure.blur_effect``, in
    [0, 1], higher is blurrier), both on the luminance in [0, 1]. Needs at
    least 4x4 pixels (blur_effect's border trim leaves nothing below that).
    """
    from skimage.measure import blur_effect

    luma = _luminance_at_least(image, channel_order, 4)
    return {
        "laplacian_variance": laplacian_variance(luma),
        "blur_effect": float(blur_effect(luma)),
    }
