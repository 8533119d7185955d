"""Synthetic blur for demos, benchmarks and training (NumPy/SciPy, no torch).

Kernels are float64 arrays that sum to 1 with odd sides. Images are float
arrays in [0, 1], HxW or HxWxC.

The camera-shake model follows the random-trajectory generator widely used for
motion-blur benchmarks (Boracchi & Foi 2012 style): a 2-D random walk with
inertia, impulsive jerks and a drift towards the centre, sampled over the
exposure and rasterised with sub-pixel bilinear splatting.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.signal import fftconvolve

from models.tone import LIGHT_CHOICES, REC601_LUMA, linear_to_srgb, srgb_to_linear


def luminance(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luminance (HxW) of an HxWx3 (or HxWx4: alpha ignored) image, in its own value range."""
    return image[..., :3] @ np.array(REC601_LUMA, dtype=image.dtype if image.dtype.kind == "f" else np.float64)


def black_and_white(image: np.ndarray) -> np.ndarray:
    """``image`` (HxWx3) as a black-and-white photograph stored as RGB: its luminance in all three channels."""
    return np.repeat(luminance(image)[..., None], 3, axis=2)


def gaussian_kernel(sigma: float, size: int | None = None) -> np.ndarray:
    """Isotropic Gaussian PSF with standard deviation ``sigma`` pixels."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    radius = int(np.ceil(3.0 * sigma)) if size is None else size // 2
    ax = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(ax**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return k / k.sum()


def disk_kernel(radius: float) -> np.ndarray:
    """Defocus PSF: a uniform disc of ``radius`` pixels, anti-aliased at its rim."""
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    r = int(np.ceil(radius))
    supersample = 8
    ax = (np.arange(-r * supersample, (r + 1) * supersample) + 0.5) / supersample - 0.5
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    inside = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    k = inside.reshape(2 * r + 1, supersample, 2 * r + 1, supersample).mean(axis=(1, 3))
    return k / k.sum()


def linear_motion_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Uniform straight-line motion of ``length`` pixels at ``angle_deg`` (counter-clockwise)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    size = int(np.ceil(length)) | 1
    theta = np.deg2rad(angle_deg)
    steps = max(2, int(np.ceil(length * 8)))
    t = np.linspace(-0.5, 0.5, steps) * (length - 1)
    xs = t * np.cos(theta)
    ys = -t * np.sin(theta)
    return _rasterise(xs, ys, size)


def _rasterise(xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """Bilinear splat of a centred trajectory into a ``size``×``size`` kernel."""
    k = np.zeros((size, size), dtype=np.float64)
    c = size // 2
    for x, y in zip(xs + c, ys + c, strict=True):
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                yy, xx = y0 + dy, x0 + dx
                if 0 <= yy < size and 0 <= xx < size:
                    k[yy, xx] += wy * wx
    total = k.sum()
    if total <= 0:
        k[c, c] = 1.0
        return k
    return k / total


def random_motion_kernel(size: int, rng: np.random.Generator, intensity: float | None = None) -> np.ndarray:
    """A random camera-shake kernel whose trajectory fits in ``size``×``size`` (odd).

    ``intensity`` in [0, 1] controls how erratic the path is (default: random).
    """
    path = shake_path(size, rng, intensity)
    return _rasterise(path.real, path.imag, size | 1)


def shake_path(size: int, rng: np.random.Generator, intensity: float | None = None) -> np.ndarray:
    """The camera-shake trajectory behind :func:`random_motion_kernel`: complex positions (x + iy) in pixels.

    2,000 samples over the exposure, their bounding box centred on 0 and
    fitting in ``size``×``size``; it draws from ``rng`` exactly what
    :func:`random_motion_kernel` draws.
    """
    if size < 3:
        raise ValueError(f"kernel size must be >= 3, got {size}")
    size |= 1
    if intensity is None:
        intensity = float(rng.uniform(0.0, 1.0))
    n = 2000
    anxiety = 0.005 * intensity
    centripetal = 0.7 * rng.uniform(0, 1)
    gaussian_term = 10.0 * rng.uniform(0, 1)
    freq_big_shakes = 0.2 * intensity
    max_len = float(size - 1)
    v = complex(np.cos(rng.uniform(0, 2 * np.pi)), np.sin(rng.uniform(0, 2 * np.pi)))
    v = v * max_len / (n - 1) * rng.uniform(0.5, 1.0) * 2.5
    x = np.zeros(n, dtype=np.complex128)
    for t in range(n - 1):
        if rng.uniform() < freq_big_shakes * anxiety * 100 / n:
            nextdir = 2 * v * np.exp(1j * (np.pi + (rng.uniform() - 0.5)))
        else:
            nextdir = 0
        dv = nextdir + anxiety * (
            gaussian_term * complex(rng.standard_normal(), rng.standard_normal()) - centripetal * x[t]
        ) * (max_len / (n - 1))
        v = v + dv
        speed = abs(v)
        if speed > 0:
            v = (v / speed) * max_len / (n - 1) * 2.5
        x[t + 1] = x[t] + v
    x -= x.mean()
    span = max(np.ptp(x.real), np.ptp(x.imag), 1e-9)
    scale = min(1.0, (size - 2) / span) * rng.uniform(0.6, 1.0)
    x *= scale
    x -= (x.real.max() + x.real.min()) / 2 + 1j * (x.imag.max() + x.imag.min()) / 2
    return x


def roll_angles(count: int, rng: np.random.Generator, spread_deg: float) -> np.ndarray:
    """In-plane rotations (radians) of a shaking camera at ``count`` instants: a smooth random walk.

    A hand-held camera turns about its optical axis as well as panning, so
    the blur differs across the frame: a point far from the middle sweeps an
    arc that a point in the middle does not. The angles wander like a random
    walk with inertia, have zero mean and span ``spread_deg`` degrees from
    least to most.
    """
    velocity = np.cumsum(rng.standard_normal(count)) + rng.standard_normal() * np.sqrt(count)
    angles = np.cumsum(velocity)
    angles -= angles.mean()
    span = np.ptp(angles)
    return np.zeros(count) if span == 0 else angles * np.deg2rad(spread_deg) / span


def rotating_shake_blur(image: np.ndarray, path: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """``image`` (HxW or HxWxC, float) blurred by a camera that moves along ``path`` and turns by ``angles``.

    Each instant ``t`` sees the scene moved by ``path[t]`` (as
    :func:`random_motion_kernel`'s kernel moves it) and turned by
    ``angles[t]`` about the image's middle; the exposure is their mean, so
    the blur varies across the frame (see :func:`local_shake_kernel` for
    the kernel at one point). With zero angles this is a convolution with
    the path's kernel. Borders are reflected; bilinear sampling.
    """
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape[:2]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    out = np.zeros(img.shape, dtype=np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for shift, angle in zip(path, angles, strict=True):
        cos, sin = np.cos(angle), np.sin(angle)
        # output pixel p samples the scene at R (p - c) + c - shift
        matrix = np.array([[cos, -sin, cx - cos * cx + sin * cy - shift.real],
                           [sin, cos, cy - sin * cx - cos * cy - shift.imag]])
        warped = cv2.warpAffine(img, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_REFLECT_101)
        out += warped.reshape(img.shape)
    return out / len(path)


def local_shake_kernel(path: np.ndarray, angles: np.ndarray, offset: tuple[float, float], size: int) -> np.ndarray:
    """The kernel of :func:`rotating_shake_blur` at ``offset`` (rows, columns) from the image's middle.

    There a turn by θ adds ``(R(θ) - I) offset`` to the path's motion, so the
    kernel is the path's rasterised with that drift, in a ``size``×``size``
    window (odd).
    """
    dy, dx = offset
    cos, sin = np.cos(angles), np.sin(angles)
    drift = (cos * dx - sin * dy - dx) + 1j * (sin * dx + cos * dy - dy)
    moved = path - drift
    return _rasterise(moved.real, moved.imag, size | 1)


def add_light_sources(image: np.ndarray, count: int, rng: np.random.Generator, brightness: float = 15.0,
                      dim: float = 0.8) -> np.ndarray:
    """``image`` (float, [0, 1]) dimmed by ``dim`` with ``count`` small squares of over-bright light.

    Each light is 3 or 5 pixels wide and 0.5-1 x ``brightness`` times white,
    so once blurred and clipped to [0, 1] it leaves a saturated streak, as
    street lights and specular highlights do in a shaken night shot. The
    result is not clipped: blur it first, then clip.
    """
    out = np.asarray(image, dtype=np.float64) * dim
    h, w = out.shape[:2]
    for _ in range(count):
        cy, cx, rad = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(1, 3))
        out[max(0, cy - rad):cy + rad + 1, max(0, cx - rad):cx + rad + 1] = brightness * rng.uniform(0.5, 1.0)
    return out


def blur_image(
    image: np.ndarray,
    kernel: np.ndarray,
    noise_sigma: float = 0.0,
    rng: np.random.Generator | None = None,
    mode: str = "reflect",
    light: str = "encoded",
) -> np.ndarray:
    """Convolve ``image`` (HxW or HxWxC, float [0, 1]) with ``kernel`` and add noise.

    ``mode='reflect'`` pads by reflection so the output has the input's size
    and no dark frame; ``mode='valid'`` returns only fully-covered pixels.
    ``light='linear'`` blurs in linear light (the sRGB curve taken off first
    and put back after), as a shaking camera does; ``'encoded'`` blurs the
    stored values. The noise is added to the stored values either way.
    """
    if light not in LIGHT_CHOICES:
        raise ValueError(f"unknown light {light!r}; use one of {', '.join(LIGHT_CHOICES)}")
    img = np.asarray(image, dtype=np.float64)
    if light == "linear":
        img = srgb_to_linear(np.clip(img, 0.0, 1.0))
    kh, kw = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"the kernel must have odd sides (a centre pixel), got {kh}x{kw}")
    if mode == "valid" and (kh > img.shape[0] or kw > img.shape[1]):
        raise ValueError(f"a {kh}x{kw} kernel does not fit in a {img.shape[0]}x{img.shape[1]} image ('valid' mode)")
    ph, pw = kh // 2, kw // 2
    chans = img[..., None] if img.ndim == 2 else img
    out = []
    for c in range(chans.shape[2]):
        ch = chans[..., c]
        if mode == "reflect":
            padded = np.pad(ch, ((ph, ph), (pw, pw)), mode="reflect")
            out.append(fftconvolve(padded, kernel, mode="valid"))
        elif mode == "valid":
            out.append(fftconvolve(ch, kernel, mode="valid"))
        else:
            raise ValueError(f"unknown mode {mode!r}; use 'reflect' or 'valid'")
    result = np.stack(out, axis=2)
    if light == "linear":
        result = linear_to_srgb(np.clip(result, 0.0, 1.0))
    if noise_sigma > 0:
        rng = rng or np.random.default_rng()
        result = result + rng.normal(0.0, noise_sigma, result.shape)
    result = np.clip(result, 0.0, 1.0)
    return result[..., 0] if img.ndim == 2 else result


def sample_photographs() -> dict[str, np.ndarray]:
    """Natural photographs that ship inside installed packages, as uint8 arrays.

    Needs scikit-image (and scikit-learn for two more); missing packages just
    contribute nothing.
    """
    photos: dict[str, np.ndarray] = {}
    try:
        from skimage import data

        for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "immunohistochemistry",
                     "retina", "hubble_deep_field", "cat", "brick", "grass", "gravel"):
            loader = getattr(data, name, None)
            if loader is None:
                continue
            try:
                photos[name] = np.asarray(loader())
            except Exception:  # some need pooch downloads; skip them offline
                continue
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for fname, img in zip(bunch.filenames, bunch.images, strict=True):
            photos[fname.rsplit("/", 1)[-1].split(".")[0]] = np.asarray(img)
    except ImportError:
        pass
    return photos


# package_photographs() names of the photographs other_photographs() returns, and the names it gives them
_OTHER_PHOTOS = {"motorcycle_left": "motorcycle", "coins": "coins", "moon": "moon", "grace_hopper": "grace_hopper"}


def other_photographs() -> dict[str, np.ndarray]:
    """Four photographs from installed packages outside :func:`sample_photographs`, uint8 HxWx3.

    scikit-image's ``motorcycle`` (left view of its stereo pair), ``coins``
    and ``moon`` (grey, as three equal channels) and matplotlib's
    ``grace_hopper`` portrait, taken from the learned models' training set
    (:func:`models.training.data.package_photographs`), so they are *not*
    unseen by those models. The blind method's settings were tuned on
    :func:`sample_photographs`, so its benchmark can check them on these.
    """
    from models.training.data import package_photographs  # imports this module: not at the top

    photos = package_photographs()
    return {short: np.round(photos[name] * 255.0).astype(np.uint8)
            for name, short in _OTHER_PHOTOS.items() if name in photos}


def unseen_photographs() -> dict[str, np.ndarray]:
    """Photographs no model of this project has seen, uint8 HxWx3 (grey as three equal channels).

    PyWavelets' ``ascent`` (people on a stone staircase) and ``aero`` (an
    aerial view of a town), 512x512 grey. They are deliberately left out of
    the learned models' training photographs
    (:func:`models.training.data.package_photographs`) and out of the
    photographs the blind method was tuned on (:func:`sample_photographs`),
    so a benchmark on them is a held-out test for both. Empty without
    PyWavelets (``pip install PyWavelets``; the ``test`` extra has it).
    """
    try:
        from pywt import data
    except ImportError:
        return {}
    photos = {}
    for name in ("ascent", "aero"):
        grey = np.asarray(getattr(data, name)())
        photos[name] = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    return photos


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` in [0, 1], grey (H, W) or (H, W, 1) or RGB (H, W, 3), stored as a JPEG of ``quality`` and decoded.

    Returns float32 of the same shape. Colour is stored as JPEG usually is
    (YCbCr with 4:2:0 chroma), as cameras and most archives' files are.
    """
    u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colour = u8.ndim == 3 and u8.shape[2] == 3
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR) if colour else u8.reshape(u8.shape[:2]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed at quality {quality}")
    if colour:
        decoded = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    else:
        decoded = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return decoded.reshape(image.shape).astype(np.float32) / 255.0
