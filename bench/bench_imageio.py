"""Throughput of the worker's image I/O on archive-sized photographs.

A real photograph (scikit-image's astronaut) is scaled to ``--width`` ×
``--height`` with a little noise (so compressors see natural detail, not a
smooth upscale), written in each format the worker handles by an independent
writer, then timed through :func:`worker.imageio.decode_image` and
:func:`worker.imageio.encode_image` (metadata carried). Printed per case:
input size, CPU seconds to decode and to encode (process time, since the
machine may be shared; wall seconds of the round trip beside them), megapixels
per CPU second for the round trip, output size, and whether a lossless round
trip was exact.

Example: ``python bench/bench_imageio.py --width 4000 --height 3000 --repeat 2``
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import imagecodecs  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from PIL import Image, ImageCms  # noqa: E402
from skimage import data  # noqa: E402

from worker.imageio import decode_image, encode_image  # noqa: E402


def _photo(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    base = cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    noisy = base + np.random.default_rng(0).normal(0, 2.0, base.shape).astype(np.float32)
    rgb8 = np.clip(noisy, 0, 255).astype(np.uint8)
    rgb16 = np.clip(noisy * 257, 0, 65535).astype(np.uint16)
    return rgb8, rgb16


def _cases(rgb8: np.ndarray, rgb16: np.ndarray) -> dict[str, tuple[Callable[[], bytes], bool]]:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x013B] = "bench"
    exif[0x0112] = 6

    def pil(array: np.ndarray, fmt: str, **options: object) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, fmt, exif=exif, icc_profile=icc, **options)
        return out.getvalue()

    def tiff(array: np.ndarray, compression: str | None) -> bytes:
        out = io.BytesIO()
        tifffile.imwrite(out, array, photometric="rgb", compression=compression, iccprofile=icc,
                         extratags=[(274, "H", 1, 6, True), (315, "s", 0, "bench", True)])
        return out.getvalue()

    def jp2(array: np.ndarray, **options: object) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, "JPEG2000", **options)
        return out.getvalue()

    alpha = (rgb8[..., 1] // 2 + 64).astype(np.uint8)
    return {
        "jpeg 8-bit RGB q90": (lambda: pil(rgb8, "JPEG", quality=90), False),
        "png 8-bit RGBA": (lambda: cv2.imencode(".png", np.dstack([rgb8[..., ::-1], alpha]))[1].tobytes(), True),
        "png 16-bit RGB": (lambda: cv2.imencode(".png", rgb16[..., ::-1])[1].tobytes(), True),
        "tiff 16-bit RGB LZW": (lambda: tiff(rgb16, "lzw"), True),
        "tiff 16-bit RGB raw": (lambda: tiff(rgb16, None), True),
        "webp 8-bit RGB q90": (lambda: pil(rgb8, "WEBP", quality=90), False),
        "jp2 8-bit lossless": (lambda: jp2(rgb8, tile_size=(1024, 1024), num_resolutions=6, progression="RPCL"), True),
        "jp2 8-bit 1:20": (lambda: jp2(rgb8, irreversible=True, quality_mode="rates", quality_layers=[80, 40, 20]),
                           False),
        "jp2 16-bit lossless": (lambda: imagecodecs.jpeg2k_encode(rgb16, codecformat="JP2"), True),
        "bmp 8-bit RGB": (lambda: cv2.imencode(".bmp", rgb8[..., ::-1])[1].tobytes(), True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per case; the best is kept")
    parser.add_argument("--threads", type=int, default=1, help="OpenCV threads")
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    rgb8, rgb16 = _photo(args.width, args.height)
    megapixels = args.width * args.height / 1e6
    print(f"{args.width}x{args.height} ({megapixels:.1f} MP), OpenCV threads {args.threads}, best of {args.repeat}")
    print(f"{'case':22} {'in MB':>7} {'decode s':>9} {'encode s':>9} {'wall s':>7} {'MP/s':>6} {'out MB':>7}  exact")
    for name, (make, lossless) in _cases(rgb8, rgb16).items():
        encoded = make()
        decode_s = encode_s = wall_s = float("inf")
        for _ in range(args.repeat):
            wall = time.perf_counter()
            start = time.process_time()
            image = decode_image(encoded, name)
            middle = time.process_time()
            output = encode_image(image, image.pixels)
            end = time.process_time()
            decode_s, encode_s = min(decode_s, middle - start), min(encode_s, end - middle)
            wall_s = min(wall_s, time.perf_counter() - wall)
        exact = "-"
        if lossless:
            exact = "yes" if np.array_equal(decode_image(output, name).pixels, image.pixels) else "NO"
        rate = megapixels / (decode_s + encode_s)
        print(f"{name:22} {len(encoded) / 1e6:7.1f} {decode_s:9.2f} {encode_s:9.2f} {wall_s:7.2f} {rate:6.1f} "
              f"{len(output) / 1e6:7.1f}  {exact}")


if __name__ == "__main__":
    main()
