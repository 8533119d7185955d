"""A real job through Redis, a Celery worker process, an S3 server and SQL.

Given a prefix of mixed images in S3 (moto_server over HTTP), when a deblur
job is submitted and a real worker processes it, then every output exists in
S3 with the input's format, size, bit depth and alpha, SQL holds one done row
per image with metrics, and Flower's API lists the worker. Runs on SQLite and
on PostgreSQL.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
from click.testing import CliRunner

from tests.e2e_helpers import (FlowerProcess, HookReceiver, WorkerProcess, decode, mixed_samples, service_env,
                                upload)

pytestmark = [pytest.mark.integration]


@pytest.fixture
def env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The suite's services, with notifications allowed into loopback, where the tests' receivers listen."""
    monkeypatch.setenv("DEBLUR_NOTIFY_ALLOW_NETWORKS", "127.0.0.0/8")
    return {**env, "DEBLUR_NOTIFY_ALLOW_NETWORKS": "127.0.0.0/8"}


@pytest.fixture
def s3(env: dict[str, str]):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[WorkerProcess]:
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    proc = WorkerProcess(service_env(env), tmp_path / "worker.log")
    try:
        proc.wait_ready(app_for(load_settings()))
        yield proc
    finally:
        proc.stop()


def wait_done(job_id: str, timeout: float = 240) -> dict:  # type: ignore[type-arg]
    from jobs.settings import load_settings
    from producer.tracking import job_status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_status(load_settings(), job_id)
        if info["status"] in {"done", "failed", "cancelled"}:
            return info
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} not finished after {timeout}s: {info}")


def run_cli(*args: str) -> str:
    from producer.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_prefix_job_restores_every_image_and_records_metrics(env, s3, worker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s3.create_bucket(Bucket="archive")
    samples = mixed_samples()
    upload(s3, "archive", "scans/", samples)
    s3.put_object(Bucket="archive", Key="scans/notes.txt", Body=b"not an image, not listed")

    with HookReceiver() as hook:  # the backend's notification endpoint
        job_id = run_cli("submit", "s3://archive/scans/", "--output", "s3://archive/restored/",
                         "--model", "wiener:psf=motion:length=7,angle=30", "--model", "richardson-lucy:0.5",
                         "--batch-size", "5", "--notify", hook.url, "--quiet").strip()
        uuid.UUID(job_id)
        info = wait_done(job_id)
        assert info["status"] == "done", info
        assert info["counts"]["done"] == len(samples) and info["counts"]["failed"] == 0
        # the worker that recorded the last image announced it, and a worker delivered it
        [(_, sent)] = hook.wait_for(1)
    job = json.loads(sent)["job"]
    assert (job["id"], job["status"], job["counts"]["done"]) == (job_id, "done", len(samples))

    for s in samples:
        out = s3.get_object(Bucket="archive", Key="restored/" + s.relative)
        got = decode(out["Body"].read())
        src = decode(s.data)
        assert got.shape == src.shape, s.relative
        assert got.dtype == src.dtype, s.relative
        if s.channels == 4:
            assert np.array_equal(got[..., 3], src[..., 3]), "alpha must pass through untouched"
        if s.fmt in {"png", "tiff"}:
            assert out["Body"] is not None
        assert not np.array_equal(got[..., :3] if got.ndim == 3 else got, src[..., :3] if src.ndim == 3 else src)

    rows = json.loads(run_cli("results", job_id, "--format", "json"))
    assert len(rows) == len(samples)
    for row in rows:
        assert row["status"] == "done" and row["error"] is None
        assert row["output"].startswith("s3://archive/restored/")
        assert row["metrics"]["disagreement"] >= 0
        assert row["metrics"]["laplacian_variance"] > 0 and row["metrics"]["input_laplacian_variance"] > 0
        assert row["inference_s"] > 0 and row["download_s"] is not None and row["upload_s"] is not None
        assert set(row["model_versions"]) == {"wiener:psf=motion:length=7,angle=30", "richardson-lucy"}

    # the workers' time on this job, as 'deblur usage' accounts it (per job and device kind)
    usage = json.loads(run_cli("usage", "--since", "1h", "--by", "job", "--by", "device", "--format", "json"))
    [spent] = [group for group in usage["groups"] if group["job"] == job_id]
    assert (spent["device"], spent["images_done"], spent["images_failed"]) == ("cpu", len(samples), 0)
    assert spent["megapixels"] == pytest.approx(sum(r["width"] * r["height"] for r in rows) / 1e6, abs=1e-6)
    assert spent["model_seconds"] == pytest.approx(sum(r["inference_s"] for r in rows), abs=2e-3)
    assert spent["worker_seconds"] == pytest.approx(
        sum(r["download_s"] + r["inference_s"] + r["upload_s"] for r in rows), abs=2e-3)

    # an independent client reads the same rows
    url = env["DEBLUR_DATABASE_URL"]
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            statuses = conn.execute("SELECT status, count(*) FROM images WHERE job_id=? GROUP BY status",
                                    (job_id,)).fetchall()
            n_metrics = conn.execute(
                "SELECT count(*) FROM metrics m JOIN images i ON i.id=m.image_id WHERE i.job_id=?", (job_id,)
            ).fetchone()[0]
    else:
        import psycopg

        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            statuses = conn.execute("SELECT status, count(*) FROM images WHERE job_id=%s GROUP BY status",
                                    (job_id,)).fetchall()
            n_metrics = conn.execute(
                "SELECT count(*) FROM metrics m JOIN images i ON i.id=m.image_id WHERE i.job_id=%s", (job_id,)
            ).fetchone()[0]
    assert dict(statuses) == {"done": len(samples)}
    assert n_metrics >= len(samples) * 5


def test_corrupt_image_fails_alone_and_flower_lists_worker(env, s3, worker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s3.create_bucket(Bucket="mixed")
    samples = mixed_samples()[:3]
    upload(s3, "mixed", "in/", samples)
    s3.put_object(Bucket="mixed", Key="in/broken.png", Body=b"\x89PNG\r\n\x1a\n garbage")
    job_id = run_cli("submit", "s3://mixed/in/", "--output", "s3://mixed/out/", "--model", "wiener", "-q").strip()
    info = wait_done(job_id)
    assert info["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 1, "cancelled": 0}
    failed = json.loads(run_cli("results", job_id, "--format", "json", "--failed"))
    assert len(failed) == 1 and failed[0]["input"] == "s3://mixed/in/broken.png"
    assert "broken.png" in failed[0]["error"] and failed[0]["output"] is None
    shown = " ".join(run_cli("status", job_id).split())  # why it failed, without paging through the results
    assert f"failed: 1 of 4 images; the most frequent reasons: 1 × {' '.join(failed[0]['error'].split())}" in shown
    assert f"'deblur retry {job_id[:8]} --failed'" in shown
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="mixed", Prefix="out/").get("Contents", [])}
    assert keys == {"out/" + s.relative for s in samples}

    flower = FlowerProcess(service_env(env), tmp_path / "flower.log")
    try:
        deadline = time.monotonic() + 30
        workers: dict = {}  # type: ignore[type-arg]
        while time.monotonic() < deadline and worker.name not in workers:
            try:
                with urllib.request.urlopen(flower.url + "/api/workers?refresh=1", timeout=10) as resp:
                    workers = json.loads(resp.read())
            except OSError:
                pass
            time.sleep(1)
        assert worker.name in workers
        with urllib.request.urlopen(flower.url + "/metrics", timeout=10) as resp:
            assert b"flower_" in resp.read()
    finally:
        flower.stop()
