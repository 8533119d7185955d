"""Batches from a newer release go back to the queue; malformed ones are dropped.

During a rolling upgrade a producer of the next release may send a batch with
a field this worker does not know. Given such a batch on a real Redis queue and
a real worker of this release, the worker does not drop it (its images would
wait for 'deblur retry --stalled'): it returns it to the queue for a newer
worker, again each time it comes back, while a malformed batch is still dropped.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.e2e_helpers import WorkerProcess, service_env, use_services



PAYLOAD = {"v": 1, "job_id": "7d3e1f0a-0000-4000-8000-000000000000", "kind": "deblur", "models": ["wiener"],
           "images": [{"input": "s3://b/in/a.png", "output": "s3://b/out/a.png"}]}


@pytest.mark.parametrize("payload, newer", [
    ({**PAYLOAD, "future_field": 1}, True),
    ({**PAYLOAD, "v": 2}, True),
    ({**PAYLOAD, "images": [{**PAYLOAD["images"][0], "crop": [0, 0, 8, 8]}]}, True),  # a new per-image field
    ({k: v for k, v in PAYLOAD.items() if k != "job_id"}, False),
    ({k: v for k, v in {**PAYLOAD, "future_field": 1}.items() if k != "job_id"}, False),  # and something wrong
    ({**PAYLOAD, "models": []}, False),
    ({**PAYLOAD, "v": 0}, False),
])
def test_needs_newer_worker(payload: dict, newer: bool) -> None:  # type: ignore[type-arg]
    from jobs.messages import BatchMessage, needs_newer_worker

    with pytest.raises((ValueError,)) as refused:
        BatchMessage.from_payload(payload)
    assert needs_newer_worker(payload, refused.value) is newer


@pytest.mark.integration
def test_a_worker_keeps_a_newer_batch_for_a_newer_worker_and_drops_a_malformed_one(  # type: ignore[no-untyped-def]
        redis_url: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.celery_app import app_for
    from jobs.messages import PROCESS_BATCH_TASK
    from jobs.settings import load_settings

    env = use_services(monkeypatch, redis_url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}", tmp_path / "home")
    app = app_for(load_settings())
    worker = WorkerProcess(service_env(env), tmp_path / "worker.log", pool="prefork")
    try:
        worker.wait_ready(app)
        newer = {**PAYLOAD, "job_id": str(uuid.uuid4()), "future_field": 1}
        app.send_task(PROCESS_BATCH_TASK, args=[newer], queue=env["DEBLUR_QUEUE"])
        malformed = {k: v for k, v in PAYLOAD.items() if k != "job_id"}
        app.send_task(PROCESS_BATCH_TASK, args=[malformed], queue=env["DEBLUR_QUEUE"])
        deadline = time.monotonic() + 60
        while True:
            log = worker.log.read_text(errors="replace")
            if f"batch of job {newer['job_id']} needs a newer worker" in log and "dropping malformed" in log:
                break
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(0.5)
        # the newer batch is sent again for later, and held until then (no pool slot, nothing else waits)
        scheduled = app.control.inspect(destination=[worker.name], timeout=10).scheduled() or {}
        held = [entry["request"]["args"][0] for entry in scheduled.get(worker.name, [])]
        assert [args["job_id"] for args in held] == [newer["job_id"]], scheduled
    finally:
        worker.kill()
        worker.stop()


@pytest.mark.integration
def test_a_newer_batch_nobody_took_fails_its_images_by_name(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """After the retries run out, the batch's images fail with the reason and what to do, so none stays pending."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from jobs.settings import load_settings
    from producer.tracking import fetch_results, job_status
    from worker import runtime
    from worker.tasks import NEWER_RELEASE_RETRIES, process_batch

    monkeypatch.setitem(runtime._state, "settings", None)  # this process's worker settings: this test's services
    settings = load_settings()
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        job, _ = queries.create_job(session, "deblur", {"models": ["wiener"], "labels": {}}, None)
        queries.insert_images(session, job.id, [{"input_uri": "s3://b/in/a.png", "output_uri": "s3://b/out/a.png"}],
                              batch=0)
        queries.set_job_state(session, job.id, status="queued", total=1)
    newer = {**PAYLOAD, "job_id": job.id, "future_field": 1}
    result = process_batch.apply(args=[newer], retries=NEWER_RELEASE_RETRIES).get()
    assert result == {"done": 0, "failed": 1, "handed_over": 0}
    [row] = fetch_results(settings, job.id)
    assert row["status"] == "failed" and "needs a newer worker" in row["error"] and "--failed" in row["error"]
    assert job_status(settings, job.id)["status"] == "failed"
