"""Evaluation jobs store the papers' figures; a dead worker's batch is redelivered; a slow one is split.

Both run through a real Redis, real worker processes, moto_server and SQLite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import boto3
import cv2
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tests.e2e_helpers import WorkerProcess, decode, kill_mid_image_then_finish, queued_tasks, service_env, use_services
from tests.test_end_to_end import run_cli, wait_done

pytestmark = [pytest.mark.integration]


@pytest.fixture
def env(redis_url: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return use_services(monkeypatch, redis_url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}",
                        tmp_path / "home", DEBLUR_VISIBILITY_TIMEOUT="8", DEBLUR_BATCH_TIME_LIMIT="0",
                        DEBLUR_CLAIM_LEASE="4")


def _pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    from skimage import data

    from models.synthetic_blur import blur_image, gaussian_kernel

    pairs = []
    for name, image in (("astro.png", data.astronaut()[60:156, 140:268]), ("coffee.png", data.coffee()[80:176, 200:328])):
        sharp = np.ascontiguousarray(image)
        blurred = np.rint(blur_image(sharp / 255.0, gaussian_kernel(1.5)) * 255).astype(np.uint8)
        pairs.append((name, blurred, sharp))
    return pairs


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_evaluation_job_stores_psnr_ssim_equal_to_an_independent_computation(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="evalset")
    for name, blurred, sharp in _pairs():
        s3.put_object(Bucket="evalset", Key=f"blur/{name}", Body=_png(blurred))
        s3.put_object(Bucket="evalset", Key=f"sharp/{name}", Body=_png(sharp))
    worker = WorkerProcess(service_env(env), tmp_path / "worker.log")
    try:
        worker.wait_ready(app_for(load_settings()))
        job_id = run_cli("evaluate", "--blurred", "s3://evalset/blur/", "--sharp", "s3://evalset/sharp/",
                         "--model", "wiener:psf=gaussian:sigma=1.5", "--model", "richardson-lucy:psf=gaussian:sigma=1.5",
                         "--output", "s3://evalset/out/", "-q").strip()
        info = wait_done(job_id)
        cropped_id = run_cli("evaluate", "--blurred", "s3://evalset/blur/", "--sharp", "s3://evalset/sharp/",
                             "--model", "wiener:psf=gaussian:sigma=1.5", "--crop-border", "8", "-q").strip()
        aligned_id = run_cli("evaluate", "--blurred", "s3://evalset/blur/", "--sharp", "s3://evalset/sharp/",
                             "--model", "wiener:psf=gaussian:sigma=1.5", "--align", "-q").strip()
        assert wait_done(cropped_id)["status"] == "done" and wait_done(aligned_id)["status"] == "done"
    finally:
        worker.stop()
    for row in json.loads(run_cli("results", cropped_id, "--format", "json")):
        sharp = decode(s3.get_object(Bucket="evalset", Key=row["reference"][len("s3://evalset/"):])["Body"].read())
        blurred = decode(s3.get_object(Bucket="evalset", Key=row["input"][len("s3://evalset/"):])["Body"].read())
        expected = peak_signal_noise_ratio(sharp[8:-8, 8:-8], blurred[8:-8, 8:-8], data_range=255)
        assert row["metrics_by_model"]["input"]["psnr"] == pytest.approx(expected, abs=1e-6)
    for row in json.loads(run_cli("results", aligned_id, "--format", "json")):
        assert 0.5 < row["metrics_by_model"]["input"]["alignment_valid_fraction"] <= 1.0
    assert info["status"] == "done", info
    rows = json.loads(run_cli("results", job_id, "--format", "json"))
    assert len(rows) == 2
    for row in rows:
        sharp = cv2.cvtColor(decode(s3.get_object(Bucket="evalset", Key=row["reference"][len("s3://evalset/"):])["Body"].read()),
                             cv2.COLOR_BGR2RGB)
        blurred = cv2.cvtColor(decode(s3.get_object(Bucket="evalset", Key=row["input"][len("s3://evalset/"):])["Body"].read()),
                               cv2.COLOR_BGR2RGB)
        restored = cv2.cvtColor(decode(s3.get_object(Bucket="evalset", Key=row["output"][len("s3://evalset/"):])["Body"].read()),
                                cv2.COLOR_BGR2RGB)
        by_model = row["metrics_by_model"]
        assert set(by_model) >= {"input", "ensemble", "wiener:psf=gaussian:sigma=1.5",
                                 "richardson-lucy:psf=gaussian:sigma=1.5"}
        for model, image in (("input", blurred), ("ensemble", restored)):
            stored = by_model[model]
            assert stored["psnr"] == pytest.approx(peak_signal_noise_ratio(sharp, image, data_range=255), abs=1e-6)
            expected_ssim = structural_similarity(sharp, image, data_range=255, channel_axis=-1, gaussian_weights=True,
                                                  sigma=1.5, use_sample_covariance=False)
            assert stored["ssim_channel_mean"] == pytest.approx(expected_ssim, abs=1e-6)
            assert 0 < stored["ssim_3d"] <= 1
        assert by_model["ensemble"]["psnr"] > by_model["input"]["psnr"]
        # every member's output is kept for reports and weight fitting
        member_keys = [o["Key"] for o in s3.list_objects_v2(Bucket="evalset", Prefix="out/_members/")["Contents"]]
        assert len([k for k in member_keys if k.endswith(row["input"].rsplit("/", 1)[1])]) == 2


def test_a_killed_worker_batch_is_redelivered_to_another_worker(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="crashy")
    name, blurred, _ = _pairs()[0]
    big = cv2.resize(blurred, (512, 384))
    for i in range(3):
        s3.put_object(Bucket="crashy", Key=f"in/{i}.png", Body=_png(big))
    app = app_for(load_settings())
    first = WorkerProcess(service_env(env), tmp_path / "first.log")
    first.wait_ready(app)
    # Richardson-Lucy with many iterations keeps the first worker busy long enough to kill it mid-batch.
    job_id = run_cli("submit", "s3://crashy/in/", "--output", "s3://crashy/out/", "--batch-size", "3",
                     "--model", "richardson-lucy:iterations=80", "-q").strip()
    from producer.tracking import job_status

    def not_all_done() -> None:
        assert job_status(load_settings(), job_id)["counts"]["done"] < 3

    info, second = kill_mid_image_then_finish(env, tmp_path, app, first, job_id, after_kill=not_all_done)
    assert info["status"] == "done" and info["counts"]["done"] == 3, info
    rows = json.loads(run_cli("results", job_id, "--format", "json"))
    attempts = [r["attempts"] for r in rows]
    # the image the first worker was restoring ran again, once; one it had finished was recorded then, not redone
    assert max(attempts) == 2 and min(attempts) == 1, attempts
    assert all(r["attempts"] == 1 for r in rows if r["worker"] == first.name), rows
    assert any(r["worker"] == second.name and r["attempts"] == 2 for r in rows), rows
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="crashy", Prefix="out/")["Contents"])
    assert keys == ["out/0.png", "out/1.png", "out/2.png"]


def _one_image_started_on(first: WorkerProcess, env: dict[str, str], bucket: str, app: Any) -> tuple[str, Any]:
    """Submit a one-image job in a bucket of its own once ``first`` is ready, and wait until it starts the image;
    returns the job's id and the S3 client."""
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="in/0.png", Body=_png(_pairs()[0][1]))
    first.wait_ready(app)
    job_id = run_cli("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--model", "wiener",
                     "-q").strip()
    deadline = time.monotonic() + 60
    while json.loads(run_cli("results", job_id, "--format", "json"))[0]["attempts"] == 0:
        assert time.monotonic() < deadline, "the first worker never started the image"
        time.sleep(0.2)
    return job_id, s3


def test_a_batch_redelivered_while_its_worker_still_works_is_not_restored_twice(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Redis hands a batch unacknowledged past DEBLUR_VISIBILITY_TIMEOUT to another worker, though the first is
    alive and restoring it (an image slower than the visibility timeout). The second worker once restored the
    image again, uploading its output a second time. It now leaves the image to the first, whose lease is live,
    and sends the batch again for later; that copy finds the image done."""
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    gate = tmp_path / "restore-gate"
    # slow, not hung: the image may take a minute before its worker stops renewing its lease
    worker_env = dict(service_env(env), TEST_RESTORE_GATE=str(gate), DEBLUR_IMAGE_TIME_LIMIT="60")
    app = app_for(load_settings())
    first = WorkerProcess(worker_env, tmp_path / "first.log", app="tests.gated_worker_app")
    second = None
    try:
        job_id, s3 = _one_image_started_on(first, env, "slowpoke", app)
        second = WorkerProcess(worker_env, tmp_path / "second.log", app="tests.gated_worker_app")
        second.wait_ready(app)
        deadline = time.monotonic() + 60  # the visibility timeout is 8 s
        while "being restored by another delivery" not in second.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, second.log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        gate.touch()
        assert wait_done(job_id, timeout=60)["counts"]["done"] == 1
        deadline = time.monotonic() + 60  # the copy comes once the first worker's lease could have run out
        while not any("{'done': 0, 'failed': 0, 'handed_over': 0}" in w.log.read_text(errors="replace")
                      for w in (first, second)):
            assert time.monotonic() < deadline, second.log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
    finally:
        gate.touch()
        for worker in (first, second):
            if worker is not None:
                worker.stop()
    [row] = json.loads(run_cli("results", job_id, "--format", "json"))
    assert (row["status"], row["attempts"], row["worker"]) == ("done", 1, first.name), row
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="slowpoke", Prefix="out/")["Contents"]] == ["out/0.png"]


def test_a_batch_whose_pool_process_was_killed_is_taken_over_at_once_on_another_worker(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Celery hands the batch of a killed pool process (an OOM kill) back to the queue at once. When another worker
    took it, that worker waited out the dead run's whole lease (here 240 s) before restoring its image. It now asks
    the holder's worker, whose main process outlives its pool, and takes the image at once when told the run's
    process is gone; a worker that does not answer, and a run still alive, are waited out as before."""
    from sqlalchemy import select

    from db.engine import session_scope
    from db.schema import Image
    from jobs.celery_app import app_for
    from jobs.settings import load_settings
    from worker.tasks import gone_claims

    closed, opened = tmp_path / "never", tmp_path / "open"
    opened.touch()
    base = dict(service_env(env), DEBLUR_VISIBILITY_TIMEOUT="300", DEBLUR_CLAIM_LEASE="240")
    app = app_for(load_settings())
    first = WorkerProcess(dict(base, TEST_RESTORE_GATE=str(closed)), tmp_path / "first.log", pool="prefork",
                          app="tests.gated_worker_app")
    second = None
    try:
        job_id, s3 = _one_image_started_on(first, env, "oomed", app)
        with session_scope(env["DEBLUR_DATABASE_URL"]) as session:
            claim = session.scalar(select(Image.claim).where(Image.job_id == job_id))
        # the questions, answered by the first worker's main process: its pool process is alive, a made-up one is
        # gone, and a worker that does not exist answers nothing (its claim is not taken for gone)
        made_up = "7ffffffe" + "0" * 24
        assert gone_claims({claim: first.name, made_up: first.name, "7ffffffd" + "0" * 24: "nobody@nowhere"},
                           load_settings()) == {made_up}
        second = WorkerProcess(dict(base, TEST_RESTORE_GATE=str(opened)), tmp_path / "second.log",
                               app="tests.gated_worker_app")
        second.wait_ready(app)
        app.control.cancel_consumer(base.get("DEBLUR_QUEUE", "deblur"), destination=[first.name], reply=True)
        os.kill(int(claim[:8], 16), signal.SIGKILL)  # the pool process restoring the image, as the OOM killer would
        info = wait_done(job_id, timeout=120)  # well within the 240-s lease it would otherwise wait out
    finally:
        closed.touch()
        for worker in (first, second):
            if worker is not None:
                worker.stop()
    log = second.log.read_text(errors="replace")
    assert info["counts"]["done"] == 1, info
    assert f"took over 1 image(s) from a lost process of worker(s) {first.name}" in log, log[-3000:]
    [row] = json.loads(run_cli("results", job_id, "--format", "json"))
    assert (row["status"], row["attempts"], row["worker"]) == ("done", 2, second.name), row


def test_a_worker_hung_on_an_image_loses_it_to_the_next_delivery_and_writes_nothing(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A worker hung on one image (here: its restoration waits on a file that never comes) kept renewing its lease
    from a timer thread, so every later delivery of the batch left the image to it, for good. Past
    DEBLUR_IMAGE_TIME_LIMIT it now stops renewing: Redis redelivers the batch, the second worker restores the
    image, and the hung run, woken at last, writes nothing over it."""
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    hung_gate, open_gate = tmp_path / "never-yet", tmp_path / "open"
    open_gate.touch()
    base = dict(service_env(env), DEBLUR_IMAGE_TIME_LIMIT="4")
    app = app_for(load_settings())
    first = WorkerProcess(dict(base, TEST_RESTORE_GATE=str(hung_gate)), tmp_path / "first.log",
                          app="tests.gated_worker_app")
    second = None
    try:
        job_id, s3 = _one_image_started_on(first, env, "hangs", app)
        second = WorkerProcess(dict(base, TEST_RESTORE_GATE=str(open_gate)), tmp_path / "second.log",
                               app="tests.gated_worker_app")
        second.wait_ready(app)
        info = wait_done(job_id, timeout=90)  # the lease out 4 + 4 s after the start; redelivery or the sweep
        assert info["counts"]["done"] == 1, info
        assert "taken for hung" in first.log.read_text(errors="replace")
        hung_gate.touch()  # the hung run wakes: it finds the image taken over and writes nothing
        deadline = time.monotonic() + 60
        while "its output is left to that one" not in first.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, first.log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
    finally:
        hung_gate.touch()
        for worker in (first, second):
            if worker is not None:
                worker.stop()
    [row] = json.loads(run_cli("results", job_id, "--format", "json"))
    assert (row["status"], row["attempts"], row["worker"]) == ("done", 2, second.name), row
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="hangs", Prefix="out/")["Contents"]] == ["out/0.png"]
    output = s3.get_object(Bucket="hangs", Key="out/0.png")["Body"].read()
    assert hashlib.sha256(output).hexdigest() == row["output_sha256"]


def test_a_pool_process_hung_on_an_image_ends_itself_and_a_fresh_one_restores_it(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A pool process hung on one image kept its slot in the pool for good: the worker had one process less until
    restarted. Past DEBLUR_IMAGE_TIME_LIMIT it now ends itself, as Celery's hard time limit would; Celery puts the
    batch back at once and starts a fresh process, which restores the image."""
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    gate, once = tmp_path / "never", tmp_path / "hung-once"
    worker = WorkerProcess(dict(service_env(env), TEST_RESTORE_GATE=str(gate), TEST_RESTORE_GATE_ONCE=str(once),
                                DEBLUR_IMAGE_TIME_LIMIT="4"), tmp_path / "worker.log", pool="prefork",
                           app="tests.gated_worker_app")
    try:
        job_id, s3 = _one_image_started_on(worker, env, "hangs-once", app_for(load_settings()))
        info = wait_done(job_id, timeout=90)  # the worker's one pool process was the hung one
    finally:
        gate.touch()
        worker.stop()
    log = worker.log.read_text(errors="replace")
    assert info["counts"]["done"] == 1, info
    assert "this pool process is taken for hung and ends itself" in log and "signal 9" in log, log[-3000:]
    [row] = json.loads(run_cli("results", job_id, "--format", "json"))
    assert (row["status"], row["attempts"], row["worker"]) == ("done", 2, worker.name), row
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="hangs-once", Prefix="out/")["Contents"]] == ["out/0.png"]


def test_a_batch_out_of_time_hands_its_remaining_images_to_a_new_task(  # type: ignore[no-untyped-def]
        redis_url, s3_endpoint, tmp_path, monkeypatch) -> None:
    """With a 1-s limit, a 3-image batch of 2-3-s images runs as three tasks; no image is attempted twice."""
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    env = use_services(monkeypatch, redis_url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}", tmp_path / "home",
                       DEBLUR_BATCH_TIME_LIMIT="1")
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="slow")
    big = cv2.resize(_pairs()[0][1], (512, 384))
    for i in range(3):
        s3.put_object(Bucket="slow", Key=f"in/{i}.png", Body=_png(big))
    worker = WorkerProcess(service_env(env), tmp_path / "worker.log")
    try:
        worker.wait_ready(app_for(load_settings()))
        job_id = run_cli("submit", "s3://slow/in/", "--output", "s3://slow/out/", "--batch-size", "3",
                         # 200 iterations: 2-3 s an image, so each task is out of time after its first (with 80,
                         # about 1 s on a fast machine, the second task finished both remaining images in time)
                         "--model", "richardson-lucy:iterations=200", "-q").strip()
        info = wait_done(job_id, timeout=300)
    finally:
        worker.stop()
    assert info["status"] == "done" and info["counts"]["done"] == 3, info
    log = worker.log.read_text(errors="replace")
    received = re.findall(r"Task deblur\.process_batch\[[0-9a-f-]+\] received", log)
    assert len(received) == 3, log[-3000:]  # the submitted task and two hand-overs
    assert "handing 2 over to a new task" in log and "handing 1 over to a new task" in log
    rows = json.loads(run_cli("results", job_id, "--format", "json"))
    assert [r["attempts"] for r in rows] == [1, 1, 1]  # a hand-over is not an attempt
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="slow", Prefix="out/")["Contents"])
    assert keys == ["out/0.png", "out/1.png", "out/2.png"]


def _submit_one_image_named_twice(env: dict[str, str], tmp_path: Path) -> tuple[str, dict]:  # type: ignore[type-arg]
    """A job naming s3://twice/in/a.png in a manifest and as an argument, and its one batch's task body."""
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="twice")
    s3.put_object(Bucket="twice", Key="in/a.png", Body=_png(_pairs()[0][1]))
    manifest = tmp_path / "list.txt"
    manifest.write_text("s3://twice/in/a.png\n")
    job_id = run_cli("submit", str(manifest), "s3://twice/in/a.png", "--output", "s3://twice/out/",
                     "--model", "wiener", "-q").strip()
    [(_, args)] = queued_tasks(env)
    return job_id, args[0]


def test_a_batch_naming_an_image_twice_restores_it_once(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Both names landed in one batch, and recording the image twice in one transaction broke the metrics'
    uniqueness: the task raised and the image stayed 'running' for good."""
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker.pipeline import run_batch

    job_id, payload = _submit_one_image_named_twice(env, tmp_path)
    message = BatchMessage.from_payload(payload)
    assert [i.input for i in message.images] == ["s3://twice/in/a.png"] * 2  # the producer sent both names

    assert run_batch(message, load_settings()) == {"done": 1, "failed": 0, "handed_over": 0}
    rows = json.loads(run_cli("results", job_id, "--format", "json"))
    # the first name wins: a manifest's key keeps its whole path under the output
    assert [(r["status"], r["output"]) for r in rows] == [("done", "s3://twice/out/in/a.png")]


def test_an_unexpected_batch_error_fails_its_images_instead_of_leaving_them_running(  # type: ignore[no-untyped-def]
        env, tmp_path, monkeypatch) -> None:
    from worker import pipeline, runtime
    from worker.tasks import process_batch

    job_id, payload = _submit_one_image_named_twice(env, tmp_path)

    def broken(*_: object) -> None:
        """Called by the real batch once it has claimed its images: fails outside any one image's restoration."""
        raise RuntimeError("recording went wrong")

    monkeypatch.setattr(pipeline, "_run_works", broken)
    monkeypatch.setitem(runtime._state, "settings", None)  # this process's worker settings: this test's services
    assert process_batch.apply(args=[payload]).get() == {"done": 0, "failed": 1, "handed_over": 0}
    rows = json.loads(run_cli("results", job_id, "--format", "json"))
    assert [(r["status"], r["error"]) for r in rows] == [
        ("failed", "internal error while processing the batch: RuntimeError: recording went wrong")]
    assert json.loads(run_cli("status", job_id, "--format", "json"))["status"] == "failed"  # finished, not stuck


def test_every_page_of_a_multi_page_tiff_is_restored(env, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Through S3 and SQL: the output holds every page, each restored in its own layout; an evaluation refuses
    the file (no single reference to measure it against) and the rest of its batch goes on."""
    import io

    import tifffile

    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker.pipeline import run_batch

    blurred = [pair[1] for pair in _pairs()]  # two blurred crops, 96x128 RGB
    scan = io.BytesIO()
    with tifffile.TiffWriter(scan) as tif:
        tif.write(blurred[0], photometric="rgb", metadata=None)
        tif.write(blurred[0][::4, ::4], photometric="rgb", subfiletype=1, metadata=None)  # a preview, no page
        tif.write(blurred[1][..., 1], photometric="minisblack", compression="lzw", metadata=None)
        tif.write((blurred[1].astype(np.uint16) * 257)[:64], photometric="rgb", metadata=None)
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="pages")
    s3.put_object(Bucket="pages", Key="in/scan.tif", Body=scan.getvalue())
    s3.put_object(Bucket="pages", Key="in/single.png", Body=_png(blurred[1]))

    job_id = run_cli("submit", "s3://pages/in/", "--output", "s3://pages/out/", "--model", "richardson-lucy",
                     "-q").strip()
    [(_, args)] = queued_tasks(env)
    assert run_batch(BatchMessage.from_payload(args[0]), load_settings())["done"] == 2
    with tifffile.TiffFile(io.BytesIO(s3.get_object(Bucket="pages", Key="out/scan.tif")["Body"].read())) as tif:
        pages = [(p.shape, p.dtype, int(p.compression), p.asarray()) for p in tif.pages]
    originals = [blurred[0], blurred[1][..., 1], (blurred[1].astype(np.uint16) * 257)[:64]]
    assert [(shape, dtype) for shape, dtype, _, _ in pages] == [(o.shape, o.dtype) for o in originals]
    assert pages[1][2] == 5  # each page keeps its own (lossless) compression
    for (_, _, _, restored), original in zip(pages, originals, strict=True):
        assert not np.array_equal(restored, original)  # every page went through the model
    [row] = [r for r in json.loads(run_cli("results", job_id, "--format", "json")) if r["input"].endswith(".tif")]
    assert row["status"] == "done" and row["metrics_by_model"]["input"]["pages"] == 3
    # 'deblur usage' counts every page's megapixels, not the first page's alone
    usage = json.loads(run_cli("usage", "--since", "1h", "--by", "job", "--format", "json"))
    [spent] = [group for group in usage["groups"] if group["job"] == job_id]
    every_pixel = sum(o.shape[0] * o.shape[1] for o in originals) + blurred[1].shape[0] * blurred[1].shape[1]
    assert spent["megapixels"] == pytest.approx(every_pixel / 1e6, abs=1e-6)
    from models.metrics import no_reference_metrics

    # the sharpness figures are the mean over the pages (the first page alone differs by over 50 % here); the
    # restored ones were measured before quantisation to the files' 8/16 bits, which adds a few per cent
    for model, read, tolerance in (("input", originals, 1e-4),
                                   ("ensemble", [restored for _, _, _, restored in pages], 0.05)):
        per_page = [no_reference_metrics(page)["laplacian_variance"] for page in read]
        assert row["metrics_by_model"][model]["laplacian_variance"] == pytest.approx(np.mean(per_page), rel=tolerance)

    s3.put_object(Bucket="pages", Key="sharp/scan.tif", Body=scan.getvalue())
    s3.put_object(Bucket="pages", Key="sharp/single.png", Body=_png(blurred[1]))
    evaluation = run_cli("evaluate", "--blurred", "s3://pages/in/", "--sharp", "s3://pages/sharp/", "--model",
                         "richardson-lucy", "-q").strip()
    [args] = [task[1] for task in queued_tasks(env) if task[1][0]["job_id"] == evaluation]
    assert run_batch(BatchMessage.from_payload(args[0]), load_settings()) == {"done": 1, "failed": 1,
                                                                              "handed_over": 0}
    [failed] = json.loads(run_cli("results", evaluation, "--failed", "--format", "json"))
    assert "a multi-page TIFF (3 pages) has no single sharp reference" in failed["error"]


def test_verify_finds_outputs_deleted_or_changed_since_they_were_written(env) -> None:  # type: ignore[no-untyped-def]
    """Fixity: workers record SHA-256 of what they read and wrote; 'deblur verify' reads the outputs back."""
    import hashlib

    from click.testing import CliRunner

    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from producer.cli import main
    from worker.pipeline import run_batch

    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="fixity")
    inputs = {f"in/{i}.png": _png(pair[1]) for i, pair in enumerate(_pairs() * 2)}
    for key, data in inputs.items():
        s3.put_object(Bucket="fixity", Key=key, Body=data)
    job_id = run_cli("submit", "s3://fixity/in/", "--output", "s3://fixity/out/", "--model", "wiener", "-q").strip()
    [(_, args)] = queued_tasks(env)
    run_batch(BatchMessage.from_payload(args[0]), load_settings())
    rows = {r["input"]: r for r in json.loads(run_cli("results", job_id, "--format", "json"))}
    for key, data in inputs.items():
        row = rows[f"s3://fixity/{key}"]
        assert row["input_sha256"] == hashlib.sha256(data).hexdigest()
        written = s3.get_object(Bucket="fixity", Key=key.replace("in/", "out/"))["Body"].read()
        assert row["output_sha256"] == hashlib.sha256(written).hexdigest()
    intact = CliRunner().invoke(main, ["verify", job_id])
    assert intact.exit_code == 0 and "4 outputs checked, 4 intact, 0 missing, 0 changed" in intact.output

    s3.delete_object(Bucket="fixity", Key="out/1.png")
    s3.put_object(Bucket="fixity", Key="out/2.png", Body=b"overwritten by a later sync")
    result = CliRunner().invoke(main, ["verify", job_id])
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "4 outputs checked, 2 intact, 1 missing, 1 changed" in message
    assert "missing: s3://fixity/out/1.png (from s3://fixity/in/1.png)" in message
    assert "changed: s3://fixity/out/2.png" in message and "--mark-failed" in message

    marked = CliRunner().invoke(main, ["verify", job_id, "--mark-failed"])
    assert marked.exit_code == 1 and "marked 2 images failed" in marked.output
    failed = json.loads(run_cli("results", job_id, "--failed", "--format", "json"))
    assert sorted((r["input"], r["error"].split(":")[1].strip()) for r in failed) == [
        ("s3://fixity/in/1.png", "the output is missing from storage"),
        ("s3://fixity/in/2.png", "the output changed since it was written (SHA-256 differs)")]
    retried = CliRunner().invoke(main, ["retry", job_id, "--failed"])
    assert retried.exit_code == 0 and "re-enqueued 2 images" in retried.output


def test_quick_verify_compares_the_checksum_the_store_keeps_instead_of_reading_outputs(  # type: ignore[no-untyped-def]
        env) -> None:
    """Workers send each output's SHA-256 with its upload; 'deblur verify --quick' asks the store for it (HEAD)
    and reads back only the outputs whose store keeps none, so a million outputs cost no egress."""
    from click.testing import CliRunner

    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from jobs.storage import s3_client
    from producer.cli import main
    from producer.client import Client
    from worker.pipeline import run_batch

    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="quick")
    for i, pair in enumerate(_pairs() * 2):
        s3.put_object(Bucket="quick", Key=f"in/{i}.png", Body=_png(pair[1]))
    job_id = run_cli("submit", "s3://quick/in/", "--output", "s3://quick/out/", "--model", "wiener", "-q").strip()
    [(_, args)] = queued_tasks(env)
    run_batch(BatchMessage.from_payload(args[0]), load_settings())

    reads: list[str] = []
    client = s3_client(load_settings())  # the per-process client verification uses

    def count(params, **_: object) -> None:  # type: ignore[no-untyped-def]
        reads.append(params["Key"])
    client.meta.events.register("before-parameter-build.s3.GetObject", count)
    try:
        found = Client().verify(job_id, quick=True)
        assert (found.checked, found.intact, found.by_store_checksum, reads) == (4, 4, 4, [])

        s3.delete_object(Bucket="quick", Key="out/1.png")
        s3.put_object(Bucket="quick", Key="out/2.png", Body=b"replaced by a sync that sends no SHA-256")
        s3.put_object(Bucket="quick", Key="out/3.png", Body=b"replaced, with a SHA-256", ChecksumAlgorithm="SHA256")
        result = CliRunner().invoke(main, ["verify", job_id, "--quick"])
        message = " ".join(result.output.split())
        assert result.exit_code == 1 and "4 outputs checked, 1 intact, 1 missing, 2 changed" in message
        assert "2 compared by the checksum the store keeps, 1 read back in full" in message
        assert reads == ["out/2.png"]  # only the output whose store kept no SHA-256
        assert "changed: s3://quick/out/3.png" in message and "missing: s3://quick/out/1.png" in message
    finally:
        client.meta.events.unregister("before-parameter-build.s3.GetObject", count)
    full = Client().verify(job_id)
    assert (len(full.missing), len(full.changed), full.by_store_checksum) == (1, 2, 0)  # the bytes agree


def test_a_store_that_takes_no_checksums_is_sent_none_as_boto3s_own_setting_says(  # type: ignore[no-untyped-def]
        env, monkeypatch) -> None:
    """Some S3-compatible stores refuse flexible checksums; AWS_REQUEST_CHECKSUM_CALCULATION=when_required is the
    standard switch, and it must not be overridden by the SHA-256 deblur sends by default."""
    from jobs.s3uri import S3URI
    from jobs.storage import put_bytes, stored_sha256

    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="plain")
    put_bytes(s3, S3URI("plain", "with.png"), b"restored bytes")
    assert stored_sha256(s3, S3URI("plain", "with.png")) == hashlib.sha256(b"restored bytes").hexdigest()
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    plain = boto3.session.Session().client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    put_bytes(plain, S3URI("plain", "without.png"), b"restored bytes")
    assert stored_sha256(plain, S3URI("plain", "without.png")) is None  # --quick then reads it back

    # uploaded in parts: the store keeps a checksum of the parts' checksums (moto's unmarked as composite), which
    # --quick once took for the file's own and called a sound output changed
    part = b"x" * (5 * 1024 * 1024)
    upload = s3.create_multipart_upload(Bucket="plain", Key="parts.tif", ChecksumAlgorithm="SHA256")
    etags = [s3.upload_part(Bucket="plain", Key="parts.tif", UploadId=upload["UploadId"], PartNumber=n, Body=part,
                            ChecksumAlgorithm="SHA256") for n in (1, 2)]
    s3.complete_multipart_upload(Bucket="plain", Key="parts.tif", UploadId=upload["UploadId"], MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": e["ETag"], "ChecksumSHA256": e["ChecksumSHA256"]}
                  for n, e in zip((1, 2), etags)]})
    assert stored_sha256(s3, S3URI("plain", "parts.tif")) is None


def _one_batch_job(env: dict[str, str], bucket: str, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """A wiener job over one blurred crop per name under s3://BUCKET/in/, and the payload of its one queued batch."""
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for name in names:
        s3.put_object(Bucket=bucket, Key=f"in/{name}", Body=_png(_pairs()[0][1]))
    job_id = run_cli("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--model", "wiener",
                     "-q").strip()
    [(_, args)] = queued_tasks(env)
    return job_id, args[0]


def _gpu_dies_on(name: str, real: Any) -> Any:
    """A restoration that loses its GPU (a device-side failure, not the image's fault) on the image ``name``, and
    runs ``real`` on the others."""
    def restore(work: Any, message: Any, *rest: Any) -> None:
        if work.item.input.endswith("/" + name):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        real(work, message, *rest)

    return restore


def test_a_failed_gpu_hands_its_batch_back_unfailed_and_its_worker_stops_consuming(  # type: ignore[no-untyped-def]
        env, monkeypatch) -> None:
    """A worker whose GPU fails (a lost CUDA context) once failed every image it took, fast, so it swallowed the
    queue while healthy workers were busy. Now the batch's images go back to the queue unfailed and the worker
    stops consuming; a plain model error still fails its image alone."""
    from jobs.celery_app import app_for
    from jobs.settings import load_settings
    from worker import pipeline, tasks
    from worker.runtime import is_device_failure

    job_id, payload = _one_batch_job(env, "gpu", ("1.png", "2.png", "3.png"))
    gpu_dies_on_the_second = _gpu_dies_on("2.png", pipeline.restore_work)
    monkeypatch.setattr(pipeline, "restore_work", gpu_dies_on_the_second)
    monkeypatch.setattr(tasks.runtime, "_state", {})  # the task reads its settings (this test's services) afresh
    stopped: list[tuple[str, list[str]]] = []
    # the worker asks through the app of its own settings (this test's broker), whichever app this process made first
    monkeypatch.setattr(app_for(load_settings()).control, "cancel_consumer",
                        lambda queue, destination: stopped.append((queue, destination)))
    result = tasks.process_batch.apply(args=[payload]).get()
    assert result == {"done": 1, "failed": 0, "handed_over": 2}
    assert stopped == [(env["DEBLUR_QUEUE"], [tasks.runtime.hostname()])]
    rows = {r["input"].rsplit("/", 1)[1]: r for r in json.loads(run_cli("results", job_id, "--format", "json"))}
    assert [rows[n]["status"] for n in ("1.png", "2.png", "3.png")] == ["done", "pending", "pending"]
    sent = [task[1][0] for task in queued_tasks(env) if task[1][0]["job_id"] == job_id]  # read, not consumed
    assert sorted([i["input"].rsplit("/", 1)[1] for i in m["images"]] for m in sent) == [
        ["1.png", "2.png", "3.png"], ["2.png", "3.png"]]  # the submitted batch, and the images handed back

    assert not is_device_failure(RuntimeError("CUDA error: out of memory"))  # a smaller image still fits
    assert not is_device_failure(ValueError("operands could not be broadcast together"))
    assert is_device_failure(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))


def test_images_whose_hand_over_could_not_be_sent_are_held_for_the_retry_or_the_sweep(  # type: ignore[no-untyped-def]
        env, monkeypatch) -> None:
    """A failed device hands the rest of its batch to a new task after releasing it (pending). When the broker
    refused that message, and then the task's own retry, the released images waited with no message for good.
    They are now claimed back under a lease that has run out: a retry takes them at once, and failing that the
    workers' sweep finds them a lease later. The device failure still comes out, so the worker stops consuming
    (the broker's error once replaced it, and the worker with the broken GPU went on taking batches)."""
    from db import queries
    from db.engine import session_scope
    from jobs.errors import DeviceFailure, TransientError
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker import pipeline

    job_id, payload = _one_batch_job(env, "unsent", ("1.png", "2.png", "3.png"))
    gpu_dies_on_the_second = _gpu_dies_on("2.png", pipeline.restore_work)
    def broker_down(*_: Any, **__: Any) -> None:
        raise TransientError("could not hand the rest of the batch to a new task: connection refused")

    monkeypatch.setattr(pipeline, "restore_work", gpu_dies_on_the_second)
    # the device failure still comes out (the worker must stop taking batches), not the broker's error
    with pytest.raises(DeviceFailure):
        pipeline.run_batch(BatchMessage.from_payload(payload), load_settings(), hand_over=broker_down)
    results = json.loads(run_cli("results", job_id, "--format", "json"))
    assert {r["input"].rsplit("/", 1)[1]: r["status"] for r in results} == {
        "1.png": "done", "2.png": "running", "3.png": "running"}
    url = load_settings().resolved_database_url()
    time.sleep(0.01)
    with session_scope(url) as session:
        assert [j for j, _ in queries.jobs_with_abandoned_images(session, 0)] == [job_id]
        unsent = [f"s3://unsent/in/{n}" for n in ("2.png", "3.png")]
        assert sorted(queries.claim_images(session, job_id, unsent, "retry@node", "r" * 32).todo) == unsent


def test_an_image_that_kills_its_worker_is_failed_after_three_starts_and_its_batch_finishes(  # type: ignore[no-untyped-def]
        env, monkeypatch) -> None:
    """A poison image (one whose restoration takes the worker down: out of memory, a crash) once took down every
    worker its redelivered batch reached, and the rest of the batch never finished. Images are now counted when
    they start and recorded as they finish, so only the poison image's count grows, and past
    DEBLUR_IMAGE_MAX_ATTEMPTS it is failed and its batch completes."""
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker import pipeline

    job_id, payload = _one_batch_job(env, "poison", ("1.png", "2-poison.png", "3.png"))
    real = pipeline.restore_work

    def dies_on_poison(work: Any, message: Any, *rest: Any) -> None:
        if work.item.input.endswith("/2-poison.png"):
            raise SystemExit("the worker process dies here")  # not an Exception: nothing after it runs, as in a crash
        real(work, message, *rest)

    monkeypatch.setattr(pipeline, "restore_work", dies_on_poison)

    def deliver() -> dict[str, int] | None:
        try:
            return pipeline.run_batch(BatchMessage.from_payload(payload), load_settings())
        except SystemExit:
            _lease_runs_out(job_id)  # as it has by the time Redis hands a dead worker's batch to another
            return None

    def rows() -> dict[str, dict[str, Any]]:
        return {r["input"].rsplit("/", 1)[1]: r for r in json.loads(run_cli("results", job_id, "--format", "json"))}

    assert deliver() is None
    assert (rows()["1.png"]["status"], rows()["3.png"]["attempts"]) == ("done", 0)  # recorded before the poison
    assert deliver() is None and deliver() is None  # the batch redelivered twice more, dying each time
    assert deliver() == {"done": 1, "failed": 1, "handed_over": 0}
    final = rows()
    assert [(final[n]["status"], final[n]["attempts"]) for n in ("1.png", "2-poison.png", "3.png")] == [
        ("done", 1), ("failed", 4), ("done", 1)]
    assert "lost its worker 3 times in a row" in final["2-poison.png"]["error"]
    assert json.loads(run_cli("status", job_id, "--format", "json"))["status"] == "done"

    run_cli("retry", job_id, "--failed")  # a retry gives the image a fresh allowance
    assert deliver() is None and rows()["2-poison.png"]["status"] == "running"


def _lease_runs_out(job_id: str) -> None:
    """The leases on the job's running images end, as they do DEBLUR_CLAIM_LEASE seconds after their run is lost."""
    from sqlalchemy import update

    from db.engine import session_scope
    from db.schema import Image
    from jobs.settings import load_settings

    with session_scope(load_settings().resolved_database_url()) as session:
        session.execute(update(Image).where(Image.job_id == job_id).values(lease_until=None))


def test_images_of_a_process_of_this_worker_that_died_are_taken_over_at_once(env) -> None:  # type: ignore[no-untyped-def]
    """A pool child killed mid-batch (an OOM kill) has its batch handed on by Celery at once, but its images were
    held under its lease for a minute and a half more. A sibling process of the same worker sees that the
    holder is gone and takes them at once; a holder still alive, or on another worker, is waited for."""
    import os
    import subprocess
    from datetime import timedelta

    from sqlalchemy import update

    from db.engine import session_scope
    from db.schema import Image, utcnow
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker import pipeline, runtime

    job_id, payload = _one_batch_job(env, "orphans", ("1.png", "2.png"))
    message = BatchMessage.from_payload(payload)
    url = load_settings().resolved_database_url()
    inputs = [i.input for i in message.images]
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = os.getppid()  # this test's parent process: certainly alive, and not this process
    handed: list[tuple[list[str], float]] = []

    def hand_over(rest: BatchMessage, countdown: float | None = None) -> None:
        handed.append(([i.input for i in rest.images], countdown or 0.0))

    def held_by(pid: int, worker: str) -> None:
        """Every image running under a live lease of a claim made by process ``pid`` of ``worker``."""
        with session_scope(url) as session:
            session.execute(update(Image).where(Image.job_id == job_id).values(
                status="running", worker=worker, claim=f"{pid:08x}{'0' * 24}",
                lease_until=utcnow() + timedelta(seconds=60)))

    held_by(alive, runtime.hostname())
    assert pipeline.run_batch(message, load_settings(), hand_over) == {"done": 0, "failed": 0, "handed_over": 2}
    held_by(gone.pid, "another-worker@elsewhere")  # gone, but of another worker: its process cannot be seen
    assert pipeline.run_batch(message, load_settings(), hand_over) == {"done": 0, "failed": 0, "handed_over": 2}
    assert [sorted(images) for images, _ in handed] == [sorted(inputs)] * 2 and all(wait > 4 for _, wait in handed)
    held_by(gone.pid, runtime.hostname())
    assert pipeline.run_batch(message, load_settings(), hand_over) == {"done": 2, "failed": 0, "handed_over": 0}
    assert len(handed) == 2  # taken at once, not handed over


def test_a_run_that_lost_its_image_while_frozen_writes_no_output_for_it(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A worker frozen past its lease (a paused machine) finds, when it comes back, that another delivery took its
    image over: it writes nothing for it, so the output in storage is the one whose checksum that delivery
    records, and it does not count the image as failed."""
    from sqlalchemy import update

    from db import queries
    from db.engine import session_scope
    from db.schema import Image
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker import pipeline

    job_id, payload = _one_batch_job(env, "frozen", ("1.png", "2.png"))
    url = load_settings().resolved_database_url()
    real = pipeline.restore_work

    def taken_over_meanwhile(work: Any, message: Any, *rest: Any) -> None:
        real(work, message, *rest)
        if work.item.input.endswith("/2.png"):  # frozen here past the lease; the redelivery took the image
            with session_scope(url) as session:
                session.execute(update(Image).where(Image.input_uri == work.item.input).values(lease_until=None))
            with session_scope(url) as session:
                assert queries.claim_images(session, job_id, [work.item.input], "w2", "2" * 32).todo

    monkeypatch.setattr(pipeline, "restore_work", taken_over_meanwhile)
    counts = pipeline.run_batch(BatchMessage.from_payload(payload), load_settings())
    assert counts == {"done": 1, "failed": 0, "handed_over": 0}
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="frozen", Prefix="out/")["Contents"]] == ["out/1.png"]
    rows = {r["input"].rsplit("/", 1)[1]: r for r in json.loads(run_cli("results", job_id, "--format", "json"))}
    assert (rows["1.png"]["status"], rows["2.png"]["status"]) == ("done", "running")  # the redelivery's to record


def test_a_download_still_coming_is_timed_as_its_own_image_and_the_images_before_it_are_recorded_first(  # type: ignore[no-untyped-def]
        env, monkeypatch) -> None:
    """The hang timer ran from the start of one image's upload to the start of the next image, so a slow
    download counted against the image before it, which also stayed unrecorded until that download came: a
    process taken for hung there counted a start against a finished image. Now the wait is timed as the next
    image's own step, and the finished images are recorded before it."""
    from sqlalchemy import select

    from db.engine import session_scope
    from db.schema import Image
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker import pipeline

    job_id, payload = _one_batch_job(env, "slowdownload", ("1.png", "2.png"))
    url = load_settings().resolved_database_url()
    steps: list[str] = []  # the images the hang timer was told a step began on, in order

    class Keeper(pipeline.LeaseKeeper):
        def image_started(self, input_uri: str) -> None:
            steps.append(input_uri.rsplit("/", 1)[1])
            super().image_started(input_uri)

    seen: dict[str, Any] = {}
    real = pipeline._download

    def slow_second(client: Any, work: Any) -> None:
        if work.item.input.endswith("/2.png"):  # a store that stalls on this one until the first is recorded
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and "first" not in seen:
                with session_scope(url) as session:
                    if session.scalar(select(Image.status).where(Image.job_id == job_id,
                                                                 Image.input_uri.endswith("/1.png"))) == "done":
                        seen["first"], seen["steps"] = "recorded", list(steps)
                time.sleep(0.05)
        real(client, work)

    monkeypatch.setattr(pipeline, "LeaseKeeper", Keeper)
    monkeypatch.setattr(pipeline, "_download", slow_second)
    assert pipeline.run_batch(BatchMessage.from_payload(payload), load_settings()) == {
        "done": 2, "failed": 0, "handed_over": 0}
    assert seen.get("first") == "recorded"  # while the second download was still awaited
    # restore 1, upload 1, then the wait for 2's download timed as 2's own step
    assert seen["steps"] == ["1.png", "1.png", "2.png"], seen
    assert steps == ["1.png", "1.png", "2.png", "2.png", "2.png"]
    rows = {r["input"].rsplit("/", 1)[1]: r for r in json.loads(run_cli("results", job_id, "--format", "json"))}
    assert [(rows[n]["status"], rows[n]["attempts"]) for n in ("1.png", "2.png")] == [("done", 1), ("done", 1)]


def test_a_hang_timer_takes_a_later_step_of_the_same_image_for_hung_again(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The timer said an image hung once per image: a download that hung past the limit and then came, followed by
    a restoration that hung too, went unnoticed the second time, and the run kept renewing nothing for good. Each
    step begun now arms it afresh."""
    from db.engine import ensure_schema
    from worker.pipeline import LeaseKeeper

    url = f"sqlite:///{tmp_path / 'steps.db'}"
    ensure_schema(url)
    with LeaseKeeper(url, "no-such-job", "c" * 32, lease_s=0.4, image_limit_s=0.3) as keeper:
        keeper.image_started("s3://b/in/1.png")  # its download, awaited past the limit
        time.sleep(0.8)
        keeper.image_started("s3://b/in/1.png")  # ...came: its restoration begins, and hangs too
        time.sleep(0.8)
    said = [r.getMessage() for r in caplog.records if "taken for hung" in r.getMessage()]
    assert len(said) == 2 and all("s3://b/in/1.png" in m for m in said), said


def test_passing_storage_faults_neither_undo_finished_images_nor_count_as_lost_workers(  # type: ignore[no-untyped-def]
        env, monkeypatch) -> None:
    """An upload that fails for a while once left the image it belonged to counted as started each time, so after
    three retries it was failed as 'lost its worker'; a download that failed once made the image before it, stored
    already, unrecorded, to be restored again (or failed with the batch when retries ran out)."""
    from jobs.errors import TransientError
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker import pipeline

    job_id, payload = _one_batch_job(env, "flaky", ("1.png", "2.png", "3.png"))
    real_put, real_get = pipeline.put_bytes, pipeline.get_bytes
    faults = {"put": 4, "get": 1}

    def flaky_put(client: Any, uri: Any, *rest: Any, **kw: Any) -> Any:
        if uri.key == "out/2.png" and faults["put"]:
            faults["put"] -= 1
            raise TransientError("S3 error SlowDown")
        return real_put(client, uri, *rest, **kw)

    def flaky_get(client: Any, uri: Any) -> Any:
        if uri.key == "in/3.png" and faults["get"] and not faults["put"]:
            faults["get"] -= 1
            raise TransientError("S3 error InternalError")
        return real_get(client, uri)

    monkeypatch.setattr(pipeline, "put_bytes", flaky_put)
    monkeypatch.setattr(pipeline, "get_bytes", flaky_get)

    def rows() -> dict[str, dict[str, Any]]:
        return {r["input"].rsplit("/", 1)[1]: r for r in json.loads(run_cli("results", job_id, "--format", "json"))}

    for _ in range(4):  # more retries than DEBLUR_IMAGE_MAX_ATTEMPTS (3)
        with pytest.raises(TransientError, match="SlowDown"):
            pipeline.run_batch(BatchMessage.from_payload(payload), load_settings())
        assert rows()["1.png"]["status"] == "done"
    with pytest.raises(TransientError, match="InternalError"):  # 2.png stored now, then 3.png cannot be read
        pipeline.run_batch(BatchMessage.from_payload(payload), load_settings())
    assert rows()["2.png"]["status"] == "done"  # recorded before the download's fault was raised
    assert pipeline.run_batch(BatchMessage.from_payload(payload), load_settings()) == {
        "done": 1, "failed": 0, "handed_over": 0}
    final = rows()
    assert [final[n]["status"] for n in ("1.png", "2.png", "3.png")] == ["done"] * 3
    assert final["2.png"]["error"] is None and final["1.png"]["attempts"] == 1


def test_a_redelivered_batch_does_not_redo_a_failed_image(env) -> None:  # type: ignore[no-untyped-def]
    """A failed image (a corrupt file here) stays failed when its batch comes again; 'retry --failed' is how it is
    tried again."""
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker.pipeline import run_batch

    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    job_id, payload = _one_batch_job(env, "redo", ("1.png",))
    s3.put_object(Bucket="redo", Key="in/1.png", Body=b"\x89PNG\r\n\x1a\n not a png")
    assert run_batch(BatchMessage.from_payload(payload), load_settings()) == {"done": 0, "failed": 1, "handed_over": 0}
    assert run_batch(BatchMessage.from_payload(payload), load_settings()) == {"done": 0, "failed": 0, "handed_over": 0}
    [row] = json.loads(run_cli("results", job_id, "--format", "json"))
    assert row["status"] == "failed" and row["attempts"] == 1


def test_images_given_back_after_a_cancellation_are_cancelled_not_left_pending(env) -> None:  # type: ignore[no-untyped-def]
    """A batch that runs out of time (or whose device fails) gives its unstarted images back; after a cancellation
    no task takes them, so they are cancelled, and a batch failing later leaves them cancelled too."""
    from db import queries
    from db.engine import session_scope
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker.pipeline import fail_batch

    job_id, payload = _one_batch_job(env, "gone", ("1.png", "2.png", "3.png"))
    message = BatchMessage.from_payload(payload)
    inputs = [i.input for i in message.images]
    url = env["DEBLUR_DATABASE_URL"]
    with session_scope(url) as session:
        assert sorted(queries.mark_running(session, job_id, inputs, "w1")) == sorted(inputs)
    run_cli("cancel", job_id)
    with session_scope(url) as session:
        queries.release_claims(session, job_id, inputs[1:], "w1")
        queries.drop_leases(session, job_id, "w1")  # the run stops, on a fault its retries do not mend
    assert fail_batch(message, load_settings(), "gave up") == 1  # the one still running; the others stay cancelled
    statuses = {r["input"]: r["status"] for r in json.loads(run_cli("results", job_id, "--format", "json"))}
    assert [statuses[i] for i in inputs] == ["failed", "cancelled", "cancelled"]


def test_a_batch_the_database_cannot_fail_is_tried_again_instead_of_acknowledged(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Retries used up while the database is down: failing the images needs the database too, and the task, had it
    failed, would be acknowledged with its images 'running' for good. It is sent again later instead."""
    from celery.exceptions import Retry
    from sqlalchemy.exc import OperationalError

    from jobs.messages import BatchMessage
    from worker import pipeline, tasks

    def database_down(*_: Any) -> int:
        raise OperationalError("UPDATE images", {}, Exception("connection refused"))

    class Task:
        def retry(self, countdown: int, max_retries: Any) -> Exception:
            assert countdown == tasks.DATABASE_WAIT_S and max_retries is None
            return Retry("sent again")

    monkeypatch.setattr(pipeline, "fail_batch", database_down)
    message = BatchMessage(job_id="j", kind="deblur", models=["wiener"], images=[{"input": "s3://b/in/1.png"}])
    with pytest.raises(Retry):
        tasks._fail_or_wait(Task(), message, object(), "gave up")


def test_a_malformed_batch_fails_the_images_it_names_and_frees_its_window_slot(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from worker import tasks

    job_id, payload = _one_batch_job(env, "malformed", ("1.png",))
    sent: list[str] = []
    monkeypatch.setattr(tasks, "send_next_batch", lambda message, settings: sent.append(message.job_id))
    monkeypatch.setattr(tasks.runtime, "_state", {})  # the task reads its settings (this test's services) afresh
    broken = {**payload, "v": 0, "slot": True}  # an older, unknown version: not a newer release's batch
    assert tasks.process_batch.apply(args=[broken]).get() == {"done": 0, "failed": 1, "handed_over": 0}
    [row] = json.loads(run_cli("results", job_id, "--format", "json"))
    assert row["status"] == "failed" and "the batch message was malformed" in row["error"]
    assert sent == [job_id]


def test_storage_errors_no_retry_mends_fail_the_image_alone() -> None:
    from botocore.exceptions import ClientError

    from jobs.errors import InputError, TransientError
    from jobs.storage import translate

    archived = ClientError({"Error": {"Code": "InvalidObjectState", "Message": "archived"}}, "GetObject")
    assert isinstance(translate(archived, "s3://b/in/1.png"), InputError)
    assert "restore it first" in str(translate(archived, "s3://b/in/1.png"))
    slow = ClientError({"Error": {"Code": "SlowDown", "Message": "reduce your rate"}}, "GetObject")
    assert isinstance(translate(slow, "s3://b/in/1.png"), TransientError)


def test_a_worker_keeps_at_most_its_cache_size_of_models(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Jobs with varied models or parameters once piled up loaded weights in each worker process until memory ran
    out; the least recently used model is dropped first."""
    import dataclasses

    import models.loading
    from jobs.settings import load_settings
    from models.catalog import REGISTRY
    from worker import runtime

    loaded: list[str] = []
    monkeypatch.setattr(models.loading, "load_model", lambda spec, device: loaded.append(spec.key()) or spec.key())
    monkeypatch.setattr(runtime, "_models", {})
    monkeypatch.setattr(runtime, "_state", {"settings": dataclasses.replace(load_settings(), model_cache_size=2),
                                            "initialised": True, "device": "cpu"})
    for text in ("wiener", "richardson-lucy", "wiener", "wiener:nsr=0.02", "richardson-lucy", "wiener"):
        runtime.get_model(REGISTRY.parse(text))
    # richardson-lucy was dropped for wiener:nsr=0.02 (wiener had been used since), then loaded again
    assert [k.split(":")[0] for k in loaded] == ["wiener", "richardson-lucy", "wiener", "richardson-lucy", "wiener"]
    assert len(runtime._models) == 2


def test_a_key_the_store_refuses_fails_that_image_alone(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An output key near the store's 1,024-byte limit is taken, but its kernel's or record's longer key is refused
    (KeyTooLongError, which no retry mends): that failed the whole batch as an internal error."""
    from jobs.errors import InputError
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from worker import pipeline

    job_id, payload = _one_batch_job(env, "longkey", ("1.png", "2.png"))
    real = pipeline.put_bytes

    def refusing(client: Any, uri: Any, *rest: Any, **kw: Any) -> Any:
        if uri.key == "out/2.png":
            raise InputError(f"{uri}: the key is longer than the store allows (S3 error KeyTooLongError)")
        return real(client, uri, *rest, **kw)

    monkeypatch.setattr(pipeline, "put_bytes", refusing)
    assert pipeline.run_batch(BatchMessage.from_payload(payload), load_settings()) == {
        "done": 1, "failed": 1, "handed_over": 0}
    rows = {r["input"].rsplit("/", 1)[1]: r for r in json.loads(run_cli("results", job_id, "--format", "json"))}
    assert rows["1.png"]["status"] == "done" and rows["2.png"]["status"] == "failed"
    assert "KeyTooLongError" in rows["2.png"]["error"]
