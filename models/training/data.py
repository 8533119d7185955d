"""Training pairs: synthetic blur of sharp photographs, or blurred/sharp pairs on disk or S3.

Everything here is NumPy (float32 HxWx3 in [0, 1]); :mod:`models.training.loop`
turns batches into tensors. Three sources produce ``(blurred, sharp)`` patch
pairs through the same :class:`PairSource` interface:

* :class:`SyntheticPairs` blurs sharp images on the fly with
  :class:`BlurSynthesizer` — random camera-shake trajectories, defocus discs,
  Gaussian blur, sensor noise and JPEG — from :mod:`models.synthetic_blur`.
  The blur is computed from a margin around each patch ("valid"
  convolution), so patches have no border artefacts.
* :class:`PairedImages` reads GoPro-style pairs: every file under a ``blur``
  directory matched with the file at the same relative path under the
  sibling ``sharp`` directory (``GOPRO_Large/train/SCENE/blur/000001.png`` ↔
  ``.../SCENE/sharp/000001.png``), from a local folder
  (:func:`pairs_from_folder`) or from two S3 prefixes (:func:`pairs_from_s3`).
  Their ``named_`` variants keep each pair's name and scene, report the files
  left unmatched, and refuse a pair whose two images differ in size, naming
  both files.

What is held out for validation is decided by a hash of each item's name
(:func:`held_out_names`), not by the seed or the number of files: adding files
never moves an existing one between training and validation. Pairs are held
out by whole scenes when there are several (:func:`split_pairs`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from scipy.signal import fftconvolve

from jobs.errors import InputError, StorageNotFoundError
from models.tone import linear_to_srgb, srgb_to_linear
from models.synthetic_blur import (
    black_and_white,
    disk_kernel,
    gaussian_kernel,
    jpeg_roundtrip,
    random_motion_kernel,
    sample_photographs,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

# Photographs held out of training for validation (``cat`` is the same picture
# as ``chelsea`` in scikit-image, so both are held out).
VALIDATION_PHOTOS: tuple[str, ...] = ("chelsea", "cat", "coffee")

# scikit-image images beyond those of sample_photographs() that are photographs
# (scans, micrographs, astronomy) rather than drawings or binary masks.
_EXTRA_SKIMAGE = ("clock", "coins", "moon", "page", "text", "cell")
_MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")


def to_float_rgb(image: np.ndarray) -> np.ndarray:
    """An image as float32 HxWx3 in [0, 1] (grey replicated, alpha dropped, 8/16-bit scaled)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise InputError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {img.shape}")
    img = img[..., :3]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    if img.dtype == bool:
        return img.astype(np.float32)
    return np.clip(img.astype(np.float32), 0.0, 1.0)


def package_photographs() -> dict[str, np.ndarray]:
    """Every natural photograph shipped inside installed packages, float32 HxWx3 in [0, 1].

    :func:`models.synthetic_blur.sample_photographs` plus more scikit-image
    photographs, both views of ``stereo_motorcycle`` and matplotlib's sample
    photographs, when present. Missing packages contribute nothing.
    """
    photos = {name: to_float_rgb(img) for name, img in sample_photographs().items()}
    try:
        from skimage import data

        for name in _EXTRA_SKIMAGE:
            loader = getattr(data, name, None)
            if loader is not None:
                try:
                    photos[name] = to_float_rgb(loader())
                except (ImportError, OSError, ValueError):  # some need a download; offline they are skipped
                    pass
        try:
            left, right, _ = data.stereo_motorcycle()
            photos["motorcycle_left"] = to_float_rgb(left)
            photos["motorcycle_right"] = to_float_rgb(right)
        except (ImportError, OSError, ValueError):
            pass
    except ImportError:
        pass
    try:
        import matplotlib

        folder = Path(matplotlib.get_data_path()) / "sample_data"
        for fname in _MATPLOTLIB_PHOTOS:
            path = folder / fname
            if path.is_file():
                photos[path.stem] = read_image(path)
    except ImportError:
        pass
    return photos


def split_photographs(
    photos: dict[str, np.ndarray], validation: Sequence[str] = VALIDATION_PHOTOS
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split into (training, validation) by name; unknown validation names are ignored."""
    held = set(validation)
    train = {k: v for k, v in photos.items() if k not in held}
    val = {k: v for k, v in photos.items() if k in held}
    return train, val


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as float32 HxWx3 RGB in [0, 1] (8- or 16-bit)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    return decode_image(data.tobytes(), str(path))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes to float32 HxWx3 RGB in [0, 1]; ``name`` is for errors."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"cannot decode image {name!r}; is it a PNG, JPEG, TIFF, BMP or WebP file?")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return to_float_rgb(img)


@dataclass(frozen=True)
class BlurSynthesizer:
    """The distribution of synthetic degradations used for training and validation.

    Each call to :meth:`sample_kernel` draws one of: a random camera-shake
    trajectory (side ``motion_size``), a defocus disc (radius
    ``defocus_radius``) or a Gaussian (``gaussian_sigma``), with the given
    probabilities (the rest of the mass goes to Gaussian). :meth:`degrade`
    then adds Gaussian noise with σ uniform in ``noise_sigma`` (with
    probability ``noise_prob``) and JPEG compression (probability
    ``jpeg_prob``, quality in ``jpeg_quality``). A share ``linear_prob``
    of the samples is blurred in linear light, the sRGB curve taken off
    before the blur and put back after, as real camera shake is; the rest
    blur the stored values, as synthetic benchmarks do. A share
    ``grey_prob`` of the scenes are made black and white first (their
    luminance in all three channels, :meth:`scene`): refiners whose only
    grey training photographs were textures and documents lost 0.2-0.3 dB
    to their prior on grey versions of ordinary scenes.
    """

    motion_prob: float = 0.6
    defocus_prob: float = 0.28
    motion_size: tuple[int, int] = (5, 25)
    defocus_radius: tuple[float, float] = (1.0, 6.0)
    gaussian_sigma: tuple[float, float] = (0.6, 3.0)
    noise_prob: float = 0.8
    noise_sigma: tuple[float, float] = (0.0, 0.02)
    jpeg_prob: float = 0.15
    jpeg_quality: tuple[int, int] = (60, 95)
    linear_prob: float = 0.0  # share of samples blurred in linear light (as a shaking camera blurs), not stored values
    grey_prob: float = 0.0  # share of scenes made black and white before the blur

    def __post_init__(self) -> None:
        if not 0.0 <= self.linear_prob <= 1.0:
            raise ValueError(f"linear_prob must be in [0, 1], got {self.linear_prob}")
        if not 0.0 <= self.grey_prob <= 1.0:
            raise ValueError(f"grey_prob must be in [0, 1], got {self.grey_prob}")
        if not 0 <= self.motion_prob + self.defocus_prob <= 1:
            raise ValueError(
                f"motion_prob + defocus_prob must be in [0, 1], got {self.motion_prob} + {self.defocus_prob}"
            )
        if self.motion_size[0] < 3 or self.motion_size[1] < self.motion_size[0]:
            raise ValueError(f"motion_size must be (low >= 3, high >= low), got {self.motion_size}")

    @property
    def light(self) -> str:
        """Where the blur happens, for logs and cache checks: "" (stored values) or "linear light N%"."""
        return f"linear light {self.linear_prob:.0%}" if self.linear_prob > 0 else ""

    @property
    def recipe(self) -> str:
        """What sets these samples apart from the defaults, for logs and cache checks: "" or e.g. "grey 30%"."""
        grey = f"grey {self.grey_prob:.0%}" if self.grey_prob > 0 else ""
        return ", ".join(part for part in (self.light, grey) if part)

    def scene(self, sharp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``sharp`` (HxWx3), or with probability ``grey_prob`` its Rec. 601 luminance in all three channels."""
        if self.grey_prob <= 0 or rng.uniform() >= self.grey_prob:  # no draw by default: same streams
            return sharp
        return black_and_white(sharp)

    @property
    def max_kernel(self) -> int:
        """The largest kernel side this synthesizer can produce (odd)."""
        disc = 2 * int(np.ceil(self.defocus_radius[1])) + 1
        gauss = 2 * int(np.ceil(3.0 * self.gaussian_sigma[1])) + 1
        return max(self.motion_size[1] | 1, disc, gauss)

    def sample_kernel(self, rng: np.random.Generator) -> np.ndarray:
        u = rng.uniform()
        if u < self.motion_prob:
            size = int(rng.integers(self.motion_size[0], self.motion_size[1] + 1)) | 1
            return random_motion_kernel(size, rng)
        if u < self.motion_prob + self.defocus_prob:
            return disk_kernel(float(rng.uniform(*self.defocus_radius)))
        return gaussian_kernel(float(rng.uniform(*self.gaussian_sigma)))

    def degrade(self, sharp_with_margin: np.ndarray, kernel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Blur ``sharp_with_margin`` (HxWx3) with ``kernel`` keeping only fully covered pixels.

        The result is smaller by ``kernel side - 1`` in each dimension; it lines
        up with ``sharp_with_margin`` cropped by ``kernel side // 2`` on each side.
        """
        linear = self.linear_prob > 0 and rng.uniform() < self.linear_prob  # no draw by default: same streams
        scene = srgb_to_linear(np.clip(sharp_with_margin, 0.0, 1.0)) if linear else sharp_with_margin
        blurred = np.stack([fftconvolve(scene[..., c], kernel, mode="valid") for c in range(3)], axis=2)
        if linear:
            blurred = linear_to_srgb(np.clip(blurred, 0.0, 1.0))
        if rng.uniform() < self.noise_prob:
            sigma = float(rng.uniform(*self.noise_sigma))
            blurred = blurred + rng.normal(0.0, sigma, blurred.shape)
        blurred = np.clip(blurred, 0.0, 1.0).astype(np.float32)
        if rng.uniform() < self.jpeg_prob:
            blurred = jpeg_roundtrip(blurred, int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))
        return blurred


def augment_pair(blurred: np.ndarray, sharp: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random flip / 90° rotation (one of the 8 dihedral transforms) applied to both."""
    k = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    out = []
    for img in (blurred, sharp):
        img = np.rot90(img, k, axes=(0, 1))
        if flip:
            img = img[:, ::-1]
        out.append(np.ascontiguousarray(img))
    return out[0], out[1]


class PairSource(Protocol):
    """Anything that yields training batches of (blurred, sharp) patches."""

    def batch(self, size: int, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Two float32 arrays (size, patch, patch, 3) in [0, 1]."""
        ...


def _texture(img: np.ndarray) -> float:
    grey = img.mean(axis=2)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


class SyntheticPairs:
    """Patches of sharp images blurred on the fly by a :class:`BlurSynthesizer`.

    Images are also used at reduced scales (``scales``), which multiplies the
    variety of content and gives crisper sharp targets from large soft
    photographs. Nearly flat patches (no edges to restore) are re-drawn with
    probability ``flat_reject``. A small bank of camera-shake kernels is kept
    and partly refreshed every batch (kernels are also flipped and rotated),
    because generating a trajectory costs more than a training step's share.
    """

    def __init__(
        self,
        images: dict[str, np.ndarray] | Sequence[np.ndarray],
        synth: BlurSynthesizer | None = None,
        scales: Sequence[float] = (1.0, 0.75, 0.5),
        flat_reject: float = 0.8,
        kernel_bank: int = 256,
        augment: bool = True,
    ) -> None:
        imgs = list(images.values()) if isinstance(images, dict) else list(images)
        if not imgs:
            raise InputError("no training images: give at least one sharp image")
        self.synth = synth or BlurSynthesizer()
        self.pyramid: list[np.ndarray] = []
        for img in imgs:
            img = to_float_rgb(img)
            for s in scales:
                scaled = img if s == 1.0 else cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
                self.pyramid.append(np.ascontiguousarray(scaled, dtype=np.float32))
        # Area-weighted, capped so one huge (and mostly dark) image cannot dominate.
        areas = np.array([min(p.shape[0] * p.shape[1], 640 * 512) for p in self.pyramid], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.flat_reject = flat_reject
        self.kernel_bank_size = kernel_bank
        self._bank: list[np.ndarray] = []
        self.augment = augment

    def _kernel(self, rng: np.random.Generator) -> np.ndarray:
        if self.kernel_bank_size <= 0:
            return self.synth.sample_kernel(rng)
        if len(self._bank) < self.kernel_bank_size or rng.uniform() < 0.15:
            k = self.synth.sample_kernel(rng)
            if len(self._bank) < self.kernel_bank_size:
                self._bank.append(k)
            else:
                self._bank[int(rng.integers(0, len(self._bank)))] = k
            return k
        k = self._bank[int(rng.integers(0, len(self._bank)))]
        k = np.rot90(k, int(rng.integers(0, 4)))
        return np.ascontiguousarray(k[:, ::-1] if rng.integers(0, 2) else k)

    def state_dict(self) -> dict[str, object]:
        """The kernel bank, so that a resumed training run draws the same batches."""
        return {"kernel_bank": [k.tolist() for k in self._bank]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        bank = state.get("kernel_bank", [])
        self._bank = [np.asarray(k, dtype=np.float64) for k in bank]  # type: ignore[union-attr]

    def pair(self, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One (blurred, sharp) pair of ``patch``×``patch`` pixels."""
        kernel = self._kernel(rng)
        m = kernel.shape[0] // 2
        side = patch + 2 * m
        for _ in range(10):
            img = self.pyramid[int(rng.choice(len(self.pyramid), p=self.weights))]
            h, w = img.shape[:2]
            if h < side or w < side:
                img = cv2.resize(img, (max(w, side), max(h, side)), interpolation=cv2.INTER_CUBIC)
                h, w = img.shape[:2]
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = img[y : y + side, x : x + side]
            if _texture(crop) > 0.02 or rng.uniform() > self.flat_reject:
                break
        crop = self.synth.scene(crop, rng)
        blurred = self.synth.degrade(crop, kernel, rng)
        sharp = crop[m : m + patch, m : m + patch]
        if self.augment:
            return augment_pair(blurred, sharp, rng)
        return blurred, np.ascontiguousarray(sharp)

    def batch(self, size: int, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.pair(patch, rng) for _ in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def synthetic_validation_set(
    images: dict[str, np.ndarray] | Sequence[np.ndarray],
    count: int = 12,
    size: int = 192,
    seed: int = 1234,
    synth: BlurSynthesizer | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed list of ``count`` (blurred, sharp) crops of ``size`` pixels, the same for a given seed."""
    source = SyntheticPairs(images, synth, scales=(1.0,), flat_reject=0.5, kernel_bank=0, augment=False)
    rng = np.random.default_rng(seed)
    return [source.pair(size, rng) for _ in range(count)]


class PairedImages:
    """Aligned (blurred, sharp) image pairs held in memory, sampled as random aligned patches."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], augment: bool = True) -> None:
        if not pairs:
            raise InputError("no image pairs found")
        for i, (b, s) in enumerate(pairs):
            if b.shape != s.shape:
                raise InputError(f"pair {i}: blurred shape {b.shape} differs from sharp shape {s.shape}")
        self.pairs = list(pairs)
        self.augment = augment

    def batch(self, size: int, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        bs, ss = [], []
        for _ in range(size):
            b, s = self.pairs[int(rng.integers(0, len(self.pairs)))]
            h, w = b.shape[:2]
            if h < patch or w < patch:
                raise InputError(f"image of {w}x{h} pixels is smaller than the {patch}-pixel training patch")
            y, x = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
            pb, ps = b[y : y + patch, x : x + patch], s[y : y + patch, x : x + patch]
            if self.augment:
                pb, ps = augment_pair(pb, ps, rng)
            bs.append(pb)
            ss.append(ps)
        return np.stack(bs), np.stack(ss)


@dataclass(frozen=True)
class NamedPair:
    """A loaded (blurred, sharp) pair with the names it is reported and split by.

    ``name`` is the blurred file's path relative to the data root (or its key
    relative to the blurred prefix), so it does not change when the data
    moves; ``scene`` is the folder the pair belongs to (GoPro: the folder above
    ``blur/``; S3: the key's folder), the unit of the train/validation split
    when there are several; ``file`` is the blurred file's path or URI.
    """

    name: str
    scene: str
    blurred: np.ndarray
    sharp: np.ndarray
    file: str = ""  # the blurred file's full path or URI, for messages


def _pair_paths(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Match ``.../blur/REL`` with ``.../sharp/REL`` among relative paths (``/``-separated)."""
    return _match_paths(paths)[0]


def _match_paths(paths: Sequence[str]) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(matched (blur, sharp) paths, blurred paths without a sharp partner, sharp paths without a blurred one)."""
    blurs: dict[str, str] = {}
    sharps: dict[str, str] = {}
    for p in paths:
        if not p.lower().endswith(IMAGE_SUFFIXES):
            continue
        parts = p.split("/")
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] in ("blur", "sharp"):
                key = "/".join(parts[:i] + ["*"] + parts[i + 1 :])
                (blurs if parts[i] == "blur" else sharps)[key] = p
                break
    matched = [(blurs[k], sharps[k]) for k in sorted(blurs) if k in sharps]
    return matched, [blurs[k] for k in sorted(blurs) if k not in sharps], [sharps[k] for k in sorted(sharps) if k not in blurs]


def _scene_of(blur_path: str) -> str:
    """The folder above the last ``blur`` component of a relative path ('' at the root)."""
    parts = blur_path.split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "blur":
            return "/".join(parts[:i])
    return "/".join(parts[:-1])


def _few(names: Sequence[str], count: int = 3) -> str:
    shown = ", ".join(names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")


def describe_matching(matched: int, lone_blurred: Sequence[str], lone_sharp: Sequence[str]) -> str:
    """'matched 3 pairs; 2 blurred files have no sharp partner (S/blur/x.jpg, ...)...' for the user."""
    text = f"matched {matched} pair{'s' if matched != 1 else ''}"
    if lone_blurred:
        text += (f"; left out {len(lone_blurred)} blurred file{'s' if len(lone_blurred) != 1 else ''} without a sharp "
                 f"partner of the same name and extension ({_few(lone_blurred)})")
    if lone_sharp:
        text += (f"; left out {len(lone_sharp)} sharp file{'s' if len(lone_sharp) != 1 else ''} without a blurred "
                 f"partner ({_few(lone_sharp)})")
    return text


def _checked_pair(name: str, scene: str, blurred: np.ndarray, sharp: np.ndarray, blurred_file: str,
                  sharp_file: str) -> NamedPair:
    """The pair, once its two images are known to be of one size (else an error naming both files)."""
    if blurred.shape[:2] != sharp.shape[:2]:
        raise InputError(
            f"blurred {blurred_file!r} is {blurred.shape[1]}x{blurred.shape[0]} pixels but its sharp partner "
            f"{sharp_file!r} is {sharp.shape[1]}x{sharp.shape[0]}: a pair must be two aligned images of one size; "
            "fix or remove them"
        )
    return NamedPair(name, scene, blurred, sharp, blurred_file)


def named_pairs_from_folder(
    root: str | os.PathLike[str], limit: int | None = None, report: Callable[[str], None] | None = None
) -> list[NamedPair]:
    """Load GoPro-layout pairs (``…/blur/NAME`` ↔ ``…/sharp/NAME``) found under ``root``, with their names.

    ``report`` is told how many files were matched and which were left out
    (a blurred file whose sharp partner is missing or has another extension).
    Each pair's two images must be of one size (checked as they are read).
    """
    base = Path(root)
    if not base.is_dir():
        raise StorageNotFoundError(f"training folder {str(root)!r} does not exist or is not a directory")
    rel = [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
    matched, lone_blurred, lone_sharp = _match_paths(rel)
    matched = matched[:limit]
    if not matched:
        found = f" ({describe_matching(0, lone_blurred, lone_sharp)})" if lone_blurred or lone_sharp else ""
        raise InputError(
            f"no blurred/sharp pairs under {str(root)!r}: expected GoPro layout "
            f"(SCENE/blur/NAME.png next to SCENE/sharp/NAME.png){found}"
        )
    if report is not None:
        report(describe_matching(len(matched), lone_blurred, lone_sharp))
    return [_checked_pair(b, _scene_of(b), read_image(base / b), read_image(base / s), str(base / b), str(base / s))
            for b, s in matched]


def pairs_from_folder(root: str | os.PathLike[str], limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Load GoPro-layout pairs (``…/blur/NAME`` ↔ ``…/sharp/NAME``) found under ``root``."""
    return [(p.blurred, p.sharp) for p in named_pairs_from_folder(root, limit)]


def named_pairs_from_s3(
    blurred_prefix: str, sharp_prefix: str, limit: int | None = None, client: object | None = None,
    report: Callable[[str], None] | None = None,
) -> list[NamedPair]:
    """Load pairs matched by relative key under two S3 prefixes, with their keys (see :func:`named_pairs_from_folder`)."""
    from jobs.s3uri import parse_s3_uri
    from jobs.settings import load_settings
    from jobs.storage import get_bytes, is_image_key, iter_objects, s3_client

    blur_uri = parse_s3_uri(blurred_prefix, want_prefix=True)
    sharp_uri = parse_s3_uri(sharp_prefix, want_prefix=True)
    s3 = client if client is not None else s3_client(load_settings())
    sharp_keys = {u.relative_to(sharp_uri): u for u, _ in iter_objects(s3, sharp_uri) if is_image_key(u.key)}
    pairs: list[NamedPair] = []
    lone: list[str] = []
    used: set[str] = set()
    for uri, _ in iter_objects(s3, blur_uri):
        if not is_image_key(uri.key):
            continue
        rel = uri.relative_to(blur_uri)
        if rel not in sharp_keys:
            lone.append(str(uri))
            continue
        used.add(rel)
        sharp = sharp_keys[rel]
        pairs.append(_checked_pair(rel, rel.rpartition("/")[0], decode_image(get_bytes(s3, uri), str(uri)),
                                   decode_image(get_bytes(s3, sharp), str(sharp)), str(uri), str(sharp)))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise InputError(f"no pairs with the same relative key under {blurred_prefix!r} and {sharp_prefix!r}")
    if report is not None:
        complete = limit is None or len(pairs) < limit
        lone_sharp = [str(u) for rel, u in sorted(sharp_keys.items()) if rel not in used] if complete else []
        report(describe_matching(len(pairs), lone, lone_sharp))
    return pairs


def pairs_from_s3(
    blurred_prefix: str, sharp_prefix: str, limit: int | None = None, client: object | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Load pairs matched by relative key under two S3 prefixes (``s3://bucket/blur/`` and ``…/sharp/``)."""
    return [(p.blurred, p.sharp) for p in named_pairs_from_s3(blurred_prefix, sharp_prefix, limit, client)]


@dataclass(frozen=True)
class Split:
    """The names of the items trained on and of those held out for validation (kept in checkpoints)."""

    training: tuple[str, ...]
    validation: tuple[str, ...]


def stable_share(name: str) -> float:
    """A number in [0, 1) fixed by ``name`` alone (SHA-256): the same on every machine, run and seed."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def held_out_names(names: Sequence[str], fraction: float) -> list[str]:
    """The names held out for validation: those whose :func:`stable_share` is below ``fraction``.

    Each name's side depends on the name only, not on the seed or on the other
    names, so adding or removing files never moves an existing one between
    training and validation. When that holds none out although ``fraction`` > 0
    and there are two names or more (a small set), the name with the smallest
    share is held out, so that there is something to validate on (this one
    choice can change when names are added; a resume refuses a changed split).
    """
    unique = sorted(set(names))
    if fraction <= 0 or len(unique) < 2:
        return []
    held = [n for n in unique if stable_share(n) < fraction]
    if not held:
        held = [min(unique, key=stable_share)]
    if len(held) == len(unique):  # keep something to train on
        held.remove(max(held, key=stable_share))
    return held


def split_pairs(pairs: Sequence[NamedPair], fraction: float) -> tuple[list[NamedPair], list[NamedPair], str]:
    """(training, validation, unit) pairs: whole scenes are held out when there are two or more (``unit`` is
    "scene"), so validation scenes are unseen in training; else single pairs (``unit`` is "pair")."""
    scenes = sorted({p.scene for p in pairs})
    if len(scenes) >= 2:
        held = set(held_out_names(scenes, fraction))
        return [p for p in pairs if p.scene not in held], [p for p in pairs if p.scene in held], "scene"
    held = set(held_out_names([p.name for p in pairs], fraction))
    return [p for p in pairs if p.name not in held], [p for p in pairs if p.name in held], "pair"


def check_patch_fits(items: Sequence[tuple[str, np.ndarray]], patch: int) -> None:
    """Refuse, naming the file, any training image smaller than the ``patch``-pixel training patch."""
    small = [(name, img.shape[1], img.shape[0]) for name, img in items if min(img.shape[:2]) < patch]
    if not small:
        return
    name, w, h = min(small, key=lambda t: min(t[1], t[2]))
    fits = min(w, h) // 16 * 16
    more = f" (and {len(small) - 1} more training image{'s' if len(small) > 2 else ''})" if len(small) > 1 else ""
    advice = (f"pass --patch {fits} or smaller" if fits >= 16
              else "remove it, as training patches are at least 16 pixels")
    raise InputError(f"{name!r} is {w}x{h} pixels, smaller than the {patch}-pixel training patch{more}: {advice}")


__all__ = [
    "VALIDATION_PHOTOS",
    "BlurSynthesizer",
    "NamedPair",
    "PairSource",
    "PairedImages",
    "Split",
    "SyntheticPairs",
    "augment_pair",
    "check_patch_fits",
    "decode_image",
    "held_out_names",
    "jpeg_roundtrip",
    "named_pairs_from_folder",
    "named_pairs_from_s3",
    "package_photographs",
    "pairs_from_folder",
    "pairs_from_s3",
    "read_image",
    "split_pairs",
    "split_photographs",
    "stable_share",
    "synthetic_validation_set",
    "to_float_rgb",
]
