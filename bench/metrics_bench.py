"""Figures for the metrics, alignment and ensemble-fitting code.

Prints: agreement of our SSIM with scikit-image on real photographs, seconds
per call at 1280x720 (GoPro's frame size), what RealBlur-style alignment
recovers on a photo moved by a few pixels, and the ensemble weight fit on a
known mixture. Run: ``python bench/metrics_bench.py`` (one CPU thread).
"""

from __future__ import annotations

import timeit

import cv2
import numpy as np
import torch
from skimage.metrics import structural_similarity

from models import ensemble, metrics
from models.alignment import AlignOptions
from models.synthetic_blur import blur_image, disk_kernel, gaussian_kernel, sample_photographs

torch.set_num_threads(1)
cv2.setNumThreads(1)


def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _colour_photos() -> dict[str, np.ndarray]:
    return {k: v for k, v in sample_photographs().items() if v.ndim == 3 and v.shape[2] == 3}


def skimage_agreement(photos: dict[str, np.ndarray]) -> None:
    worst = 0.0
    for photo in photos.values():
        blurred = _uint8(blur_image(photo / 255.0, disk_kernel(3.0)))
        ours = metrics.ssim(blurred, photo, variant=metrics.SSIM_CHANNEL_MEAN)
        theirs = structural_similarity(blurred, photo, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=255, channel_axis=-1)
        worst = max(worst, abs(ours - theirs))
    print(f"channel-mean SSIM vs skimage on {len(photos)} real photos (disk-blurred): max |diff| = {worst:.2e}")


def speed(photo: np.ndarray) -> None:
    sharp = cv2.resize(photo, (1280, 720), interpolation=cv2.INTER_AREA)
    blurred = _uint8(blur_image(sharp / 255.0, disk_kernel(3.0)))

    def best(fn: object, repeat: int = 3) -> float:
        return min(timeit.repeat(fn, number=1, repeat=repeat))  # type: ignore[arg-type]

    print("seconds per call at 1280x720 RGB uint8 (best of 3, 1 thread):")
    print(f"  psnr                         {best(lambda: metrics.psnr(blurred, sharp)):.3f}")
    print(f"  ssim channel-mean            {best(lambda: metrics.ssim(blurred, sharp, variant='channel-mean')):.3f}")
    print(f"  ssim 3d                      {best(lambda: metrics.ssim(blurred, sharp, variant='3d')):.3f}")
    print(f"  full_reference_metrics       {best(lambda: metrics.full_reference_metrics(blurred, sharp)):.3f}")
    print(f"  full_reference_metrics+align {best(lambda: metrics.full_reference_metrics(blurred, sharp, align=True)):.3f}")
    print(f"  no_reference_metrics         {best(lambda: metrics.no_reference_metrics(blurred)):.3f}")


def alignment_gain(photos: dict[str, np.ndarray]) -> None:
    warp = np.array([[1.0, 0.01, 2.6], [-0.008, 1.0, -1.7], [1e-5, 0.0, 1.0]])
    print("photo moved by ~3 px (+ slight rotation/perspective), PSNR dB: none | RealBlur | RealBlur+refit")
    for name, photo in list(photos.items())[:5]:
        h, w = photo.shape[:2]
        moved = cv2.warpPerspective(photo.astype(np.float32) / 255.0, warp, (w, h),
                                    flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        figures = [metrics.full_reference_metrics(moved, photo, align=a)["psnr"]
                   for a in (False, True, AlignOptions(refit=True))]
        print(f"  {name:<22} {figures[0]:6.2f} | {figures[1]:6.2f} | {figures[2]:6.2f}")


def fit(photos: dict[str, np.ndarray]) -> None:
    mix = np.array([0.55, 0.3, 0.15])
    outputs, targets = [], []
    for photo in list(photos.values())[:4]:
        sharp = cv2.resize(photo, (320, 240), interpolation=cv2.INTER_AREA) / 255.0
        stack = np.stack([sharp, blur_image(sharp, disk_kernel(2.0)),
                          np.clip(blur_image(sharp, gaussian_kernel(1.5)) * 1.1, 0, 1)])
        outputs.append(stack)
        targets.append(np.clip(np.tensordot(mix, stack, axes=1) + np.random.default_rng(0).normal(0, 0.01, sharp.shape), 0, 1))
    seconds = min(timeit.repeat(lambda: ensemble.fit_weights(outputs, targets), number=1, repeat=3))
    weights, report = ensemble.fit_weights(outputs, targets)
    print(f"fit_weights on 4 images 320x240, true mix {mix.tolist()} + noise 0.01: "
          f"weights {np.round(weights, 4).tolist()}, PSNR fitted {report.psnr_fitted:.2f} vs equal "
          f"{report.psnr_equal:.2f} (+{report.gain_db:.2f} dB), {report.samples} samples, {seconds:.2f} s")


def main() -> None:
    photos = _colour_photos()
    skimage_agreement(photos)
    speed(photos["astronaut"])
    alignment_gain(photos)
    fit(photos)


if __name__ == "__main__":
    main()
