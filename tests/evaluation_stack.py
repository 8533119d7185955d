"""A real stack for report and ensemble tests: Redis, moto_server, SQL and one
worker process shared by a test module, plus small blurred/sharp pairs cut
from package photographs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.e2e_helpers import WorkerProcess, service_env

MEMBERS = ("wiener:psf=gaussian:sigma=1.5", "richardson-lucy:iterations=10")


@dataclass(frozen=True)
class Pair:
    relative: str
    blurred: np.ndarray  # uint8 RGB
    sharp: np.ndarray


def sample_pairs(count: int = 3, shape: tuple[int, int] = (128, 192)) -> list[Pair]:
    """``count`` photographs cropped to ``shape``, blurred by a Gaussian (σ 1.5)
    with a little noise: different content, so the images rank differently."""
    from models.synthetic_blur import blur_image, gaussian_kernel, sample_photographs

    photos = sample_photographs()
    names = [n for n in ("astronaut", "coffee", "chelsea", "rocket", "china", "flower") if n in photos]
    if len(names) < count:
        raise RuntimeError(f"only {len(names)} colour photographs ship with the installed packages")
    rng = np.random.default_rng(7)
    pairs = []
    h, w = shape
    for i, name in enumerate(names[:count]):
        photo = photos[name]
        top, left = (photo.shape[0] - h) // 2, (photo.shape[1] - w) // 2
        sharp = np.ascontiguousarray(photo[top:top + h, left:left + w, :3])
        blurred = blur_image(sharp / 255.0, gaussian_kernel(1.5), noise_sigma=0.003 * (i + 1), rng=rng)
        pairs.append(Pair(f"set/{name}.png", np.clip(np.rint(blurred * 255), 0, 255).astype(np.uint8), sharp))
    return pairs


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("could not encode PNG")
    return buf.tobytes()


def upload_pairs(client: Any, bucket: str, pairs: list[Pair]) -> None:
    client.create_bucket(Bucket=bucket)
    for p in pairs:
        client.put_object(Bucket=bucket, Key="blur/" + p.relative, Body=png(p.blurred))
        client.put_object(Bucket=bucket, Key="sharp/" + p.relative, Body=png(p.sharp))


@dataclass
class Stack:
    env: dict[str, str]
    s3: Any
    worker: WorkerProcess


@contextmanager
def running_stack(redis_url: str, s3_endpoint: str, database_url: str, tmp: Path) -> Iterator[Stack]:
    """Point the settings at the services (environment variables) and run one worker."""
    import boto3

    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    values = {
        "DEBLUR_BROKER_URL": redis_url,
        "DEBLUR_S3_ENDPOINT_URL": s3_endpoint,
        "DEBLUR_DATABASE_URL": database_url,
        "DEBLUR_QUEUE": f"q-{uuid.uuid4().hex[:8]}",
        "DEBLUR_HOME": str(tmp / "home"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        worker = WorkerProcess(service_env(values), tmp / "worker.log")
        try:
            worker.wait_ready(app_for(load_settings()))
            client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
            yield Stack(values, client, worker)
        finally:
            worker.stop()
