"""Images a lost worker left running are sent again once their lease has been out a whole lease, not after
Redis's visibility timeout.

Real Redis, SQLite and PostgreSQL, real worker processes for the end-to-end case.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from tests.e2e_helpers import WorkerProcess, queued_tasks, service_env, use_services
from tests.test_batch_claims import make_job
from tests.test_end_to_end import run_cli, wait_done

pytestmark = [pytest.mark.integration]


def _lose(url: str, job_id: str, inputs: list[str], claim: str, ran_out_ago: timedelta) -> None:
    """A run that claimed and started ``inputs`` and whose lease ran out ``ran_out_ago`` (by the database's clock)."""
    from db import queries
    from db.engine import session_scope
    from db.schema import Image

    with session_scope(url) as s:
        assert sorted(queries.claim_images(s, job_id, inputs, "lost@node", claim, lease_s=60).todo) == sorted(inputs)
        for uri in inputs:
            queries.start_image(s, job_id, uri, claim)
        s.execute(update(Image).where(Image.job_id == job_id, Image.input_uri.in_(inputs))
                  .values(lease_until=queries.database_now(s) - ran_out_ago))


def _images(url: str, *job_ids: str) -> dict[str, tuple[str, int, int]]:
    """Each image's (status, attempts, unfinished starts)."""
    from db.engine import session_scope
    from db.schema import Image

    with session_scope(url) as s:
        rows = s.execute(select(Image.input_uri, Image.status, Image.attempts, Image.unfinished_starts)
                         .where(Image.job_id.in_(job_ids)))
        return {uri: (status, attempts, starts) for uri, status, attempts, starts in rows}


def _job_status(url: str, job_id: str) -> str:
    from db.engine import session_scope
    from db.schema import Job

    with session_scope(url) as s:
        return s.get(Job, job_id).status


def test_a_sweep_sends_again_only_the_images_whose_lease_ran_out_a_lease_ago(env) -> None:  # type: ignore[no-untyped-def]
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from worker.sweeper import AbandonedImageSweeper

    url = load_settings().resolved_database_url()
    lost, uris, _ = make_job(url, [["a0.png", "a1.png", "a2.png"]])
    inputs = sorted(uris.values())
    _lose(url, lost, inputs, "1" * 32, timedelta(minutes=5))
    with session_scope(url) as s:  # the lost run had recorded its first image before it went
        queries.record_outcomes(s, lost, [queries.ImageOutcome(input_uri=inputs[0], status="done", worker="lost@node")],
                                claim="1" * 32)
    recent, recent_uris, _ = make_job(url, [["r0.png"]])  # out for 10 s only: its worker may be a moment late
    _lose(url, recent, list(recent_uris.values()), "2" * 32, timedelta(seconds=10))
    live, live_uris, _ = make_job(url, [["l0.png"]])  # a worker that renews its lease
    with session_scope(url) as s:
        queries.claim_images(s, live, list(live_uris.values()), "alive@node", "3" * 32, lease_s=60)
    sweeper = AbandonedImageSweeper(replace(load_settings(), claim_lease=60))

    assert sweeper.sweep() == 2
    sent = [args[0] for _, args in queued_tasks(env)]
    assert [(m["job_id"], sorted(i["input"] for i in m["images"]), m.get("slot")) for m in sent] == [
        (lost, inputs[1:], None)]
    images = _images(url, lost, recent, live)
    # taken back, with the lost run's start still counted: an image that takes every worker down is failed after
    # DEBLUR_IMAGE_MAX_ATTEMPTS starts, not sent round for good
    assert [images[i] for i in inputs] == [("done", 1, 0), ("pending", 1, 1), ("pending", 1, 1)]
    assert images[next(iter(recent_uris.values()))][0] == images[next(iter(live_uris.values()))][0] == "running"
    assert _job_status(url, lost) == "running"  # its other batches may be running: it is not made queued again
    assert sweeper.sweep() == 0  # sent once: another worker's sweep finds nothing left

    _lose(url, lost, inputs[1:], "5" * 32, timedelta(minutes=5))  # the next worker is lost on them too
    assert sweeper.sweep() == 2
    assert [_images(url, lost)[i] for i in inputs[1:]] == [("pending", 2, 2)] * 2


def test_a_windowed_jobs_abandoned_images_keep_their_batch_and_its_slot(env) -> None:  # type: ignore[no-untyped-def]
    """Relisted behind the job's other batches (as a retry does), a lost batch's images would wait for all of them;
    they keep their batch, which holds its slot until its last image is recorded."""
    from db import queries
    from db.engine import session_scope
    from db.schema import Job
    from jobs.settings import load_settings
    from worker.sweeper import AbandonedImageSweeper

    url = load_settings().resolved_database_url()
    job_id, uris, _ = make_job(url, [["w0.png", "w1.png"], ["w2.png"]], window=1)
    with session_scope(url) as s:  # the first batch was sent and holds the window's one slot: its run is lost
        s.execute(update(Job).where(Job.id == job_id).values(batches_sent=1, batches_in_flight=1))
    _lose(url, job_id, [uris["w0.png"], uris["w1.png"]], "4" * 32, timedelta(minutes=5))

    assert AbandonedImageSweeper(replace(load_settings(), claim_lease=60)).sweep() == 2
    [message] = [args[0] for _, args in queued_tasks(env)]
    assert sorted(i["input"] for i in message["images"]) == [uris["w0.png"], uris["w1.png"]]
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert (job.batches_listed, job.batches_sent, job.batches_in_flight) == (2, 1, 1)
        # the message's run records them; the batch's last image frees its slot for the next batch
        for name in ("w0.png", "w1.png"):
            queries.claim_images(s, job_id, [uris[name]], "w", "6" * 32)
        written = queries.record_outcomes(s, job_id, [queries.ImageOutcome(uris[n], "done", worker="w")
                                                      for n in ("w0.png", "w1.png")], claim="6" * 32)
        queries.free_slots_of_finished_batches(s, job_id, written)
        job = s.get(Job, job_id)
        assert job.batches_in_flight == 0


def test_a_cancelled_jobs_abandoned_images_are_cancelled_not_sent(env) -> None:  # type: ignore[no-untyped-def]
    """A job cancelled while a lost run held some of its images: those stayed 'running' for good, and a sweep
    listing the job just before the cancellation would have brought it back. They are cancelled with it."""
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from worker.sweeper import AbandonedImageSweeper

    url = load_settings().resolved_database_url()
    job_id, uris, _ = make_job(url, [["c0.png", "c1.png"]])
    _lose(url, job_id, [uris["c0.png"]], "7" * 32, timedelta(minutes=5))
    with session_scope(url) as s:
        queries.cancel_job(s, job_id)
    assert AbandonedImageSweeper(replace(load_settings(), claim_lease=60)).sweep() == 0
    assert queued_tasks(env) == []
    assert {status for status, _, _ in _images(url, job_id).values()} == {"cancelled"}
    assert _job_status(url, job_id) == "cancelled"


def test_a_worker_node_lost_mid_image_is_replaced_within_seconds_not_the_visibility_timeout(  # type: ignore[no-untyped-def]
        redis_url, s3_endpoint, tmp_path, monkeypatch) -> None:
    """A whole worker killed (its main process too, so Celery cannot hand its batch on) left its image to Redis's
    redelivery after DEBLUR_VISIBILITY_TIMEOUT, five minutes here. The other worker's sweep sends it again once
    its lease has been out for a lease (4 s here)."""
    from jobs.celery_app import app_for
    from jobs.settings import load_settings
    from tests.test_evaluation_and_recovery import _one_image_started_on

    env = use_services(monkeypatch, redis_url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}", tmp_path / "home",
                       DEBLUR_VISIBILITY_TIMEOUT="300", DEBLUR_BATCH_TIME_LIMIT="0", DEBLUR_CLAIM_LEASE="4")
    closed, opened = tmp_path / "never", tmp_path / "open"
    opened.touch()
    app = app_for(load_settings())
    first = WorkerProcess(dict(service_env(env), TEST_RESTORE_GATE=str(closed)), tmp_path / "first.log",
                          app="tests.gated_worker_app")
    second = None
    try:
        job_id, s3 = _one_image_started_on(first, env, "lost-node", app)
        first.kill()  # the node is gone: nobody acknowledges or hands on its batch
        second = WorkerProcess(dict(service_env(env), TEST_RESTORE_GATE=str(opened)), tmp_path / "second.log",
                               app="tests.gated_worker_app")
        second.wait_ready(app)
        info = wait_done(job_id, timeout=120)  # Redis would hand the batch on only after 300 s
    finally:
        closed.touch()
        for worker in (first, second):
            if worker is not None and worker.proc.poll() is None:
                worker.stop()
    assert info["counts"]["done"] == 1, info
    assert "sent again" in second.log.read_text(errors="replace")
    [row] = json.loads(run_cli("results", job_id, "--format", "json"))
    assert (row["status"], row["attempts"], row["worker"]) == ("done", 2, second.name), row
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="lost-node", Prefix="out/")["Contents"]] == ["out/0.png"]


def test_a_broken_off_submissions_abandoned_images_are_sent_again(env) -> None:  # type: ignore[no-untyped-def]
    """A job whose producer stopped mid-listing is failed, and "the images it enqueued are restored": one whose run
    was lost stayed running for good (and held the job back from pruning). It is sent again like any other; a job
    failed because all its images failed has none to send."""
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from worker.sweeper import AbandonedImageSweeper

    url = load_settings().resolved_database_url()
    job_id, uris, _ = make_job(url, [["s0.png", "s1.png"]])
    _lose(url, job_id, [uris["s0.png"]], "8" * 32, timedelta(minutes=5))
    with session_scope(url) as s:
        queries.set_job_state(s, job_id, status="failed", error="submission interrupted")
    assert AbandonedImageSweeper(replace(load_settings(), claim_lease=60)).sweep() == 1
    [message] = [args[0] for _, args in queued_tasks(env)]
    assert [i["input"] for i in message["images"]] == [uris["s0.png"]]
    assert _images(url, job_id)[uris["s0.png"]] == ("pending", 1, 1) and _job_status(url, job_id) == "failed"


@pytest.mark.parametrize("window", [0, 1])
def test_a_submission_whose_producer_was_killed_counts_its_rows_and_stays_failed(env, window) -> None:  # type: ignore[no-untyped-def]
    """A job found abandoned mid-listing showed 0 images, and a 'retry --stalled' that sent its waiting rows made
    it done, though part of its input was never listed. It now counts its rows, its error says how to send the
    rows its producer may not have sent, and restored to the end it stays failed."""
    from db import queries
    from db.engine import session_scope
    from db.schema import Image, Job
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    job_id, _, _ = make_job(url, [["k0.png", "k1.png"], ["k2.png"]], window=window)
    with session_scope(url) as s:  # still being listed, by a producer last heard of 11 minutes ago
        s.execute(update(Job).where(Job.id == job_id).values(
            status="submitting", total=0, updated_at=queries.utcnow() - timedelta(minutes=11)))
    with session_scope(url) as s:
        queries.fail_abandoned_submissions(s)
        job = s.get(Job, job_id)
        assert (job.status, job.total) == ("failed", 3) and job.error.startswith(queries.ABANDONED_SUBMISSION)
        assert "'deblur retry JOB --stalled' sends them" in job.error
    with session_scope(url) as s:  # restored to the end after a retry, it keeps its failure: never fully listed
        s.execute(update(Image).where(Image.job_id == job_id).values(status="done"))
        queries.set_job_state(s, job_id, status="queued", finished_at=None)
        assert queries.finish_if_complete(s, job_id) == "failed"
        assert s.get(Job, job_id).error.startswith(queries.ABANDONED_SUBMISSION)
