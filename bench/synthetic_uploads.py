"""Blurred crops of the package photographs, uploaded to S3 for the queue benchmarks (bench_queue, bench_fairness)."""

from __future__ import annotations

from typing import Any


def upload_blurred_crops(client: Any, bucket: str, prefix: str, count: int, size: int) -> list[str]:
    """Upload ``count`` PNG crops of ``size`` px, each blurred by the same 9-px motion kernel, as
    ``PREFIX0000.png`` ...; returns their keys. The same call always uploads the same images."""
    import cv2
    import numpy as np

    from models.synthetic_blur import blur_image, linear_motion_kernel, sample_photographs

    photos = [p for p in sample_photographs().values() if p.ndim == 3]
    kernel = linear_motion_kernel(9, 20)
    keys = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y, x = (i * 37) % max(1, photo.shape[0] - size), (i * 53) % max(1, photo.shape[1] - size)
        blurred = np.rint(blur_image(photo[y:y + size, x:x + size] / 255.0, kernel) * 255).astype(np.uint8)
        key = f"{prefix}{i:04d}.png"
        client.put_object(Bucket=bucket, Key=key, Body=cv2.imencode(".png", blurred[..., ::-1])[1].tobytes())
        keys.append(key)
    return keys
