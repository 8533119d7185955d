"""Claims and leases on a batch's images, on SQLite and PostgreSQL: two deliveries of one batch never restore an
image at once, a windowed batch frees its slot once, and the locks they take never deadlock.

Each test forces an interleaving that once went wrong (threads, a hook on the SQL a session sends, or a lease
aged by hand) and checks the outcome: the images each restored once, the job's batches in flight as many as are
really in flight, usage counting each attempt once. The PostgreSQL database is shared by the session's tests, so
every job here has buckets and keys of its own.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import timedelta

import boto3
import cv2
import numpy as np
import pytest
from sqlalchemy import event, func, select, update

pytestmark = [pytest.mark.integration]


def make_job(url: str, batches: list[list[str]], window: int = 0) -> tuple[str, dict[str, str], str]:
    """A queued job whose images (names) are split into ``batches``, with a window of ``window`` batches if given;
    returns its id, each name's input URI and the tag its bucket is named after (``claims-TAG``)."""
    from db import queries
    from db.engine import ensure_schema, session_scope

    ensure_schema(url)
    tag = uuid.uuid4().hex[:8]
    uris = {}
    with session_scope(url) as session:
        # the queue of this process's settings: the workers' sweep for abandoned images looks at its own only
        spec = {"models": ["wiener"], "output": f"s3://claims-{tag}/out/", "batch_size": 2,
                "queue": os.environ.get("DEBLUR_QUEUE", f"q-{tag}")}
        if window:
            spec["window"] = window
        job, _ = queries.create_job(session, "deblur", spec)
        for number, names in enumerate(batches):
            rows = []
            for name in names:
                uris[name] = f"s3://claims-{tag}/in/{name}"
                rows.append({"input_uri": uris[name], "output_uri": f"s3://claims-{tag}/out/{name}"})
            queries.insert_images(session, job.id, rows, number)
        if window:
            queries.record_listed_batches(session, job.id, len(batches))
        queries.finish_submission(session, job.id, sum(map(len, batches)), "queued")
        return job.id, uris, tag


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return cv2.imencode(".png", cv2.GaussianBlur(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), (0, 0), 2))[1].tobytes()


def _counters(url: str, job_id: str) -> tuple[int, int, int]:
    from db.engine import session_scope
    from db.schema import Job

    with session_scope(url) as session:
        job = session.get(Job, job_id)
        return job.batches_listed, job.batches_sent, job.batches_in_flight


def test_an_image_relisted_by_a_retry_and_restored_by_its_old_batch_frees_both_slots(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """'retry --failed' moves a failed image of a windowed job to a new batch, sent at once; the old batch's
    message, retried after a passing fault, restores it there. Its recording then frees the new batch's slot and
    its own batch's too (one flag per run once let it free only the first), and the new batch's message, finding
    nothing to do, frees nothing: no slot is held for good."""
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from producer.dispatch import send_window_batches
    from producer.retry import retry_images
    from tests.e2e_helpers import queued_tasks
    from worker import tasks

    settings = load_settings()
    url = settings.resolved_database_url()
    job_id, uris, tag = make_job(url, [["a.png", "b.png"], ["c.png"]], window=2)
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket=f"claims-{tag}")
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        s3.put_object(Bucket=f"claims-{tag}", Key=f"in/{name}", Body=_png(i))
    with session_scope(url) as session:
        spec = queries.job_spec(session, job_id)
    assert send_window_batches(settings, job_id, "deblur", spec) == 2
    messages = {args[0]["images"][0]["input"].rsplit("/", 1)[1]: args[0] for _, args in queued_tasks(env)}
    batch0, batch1 = messages["a.png"], messages["c.png"]
    assert _counters(url, job_id) == (2, 2, 2)
    monkeypatch.setattr(tasks.runtime, "_state", {})

    # batch 1 runs and frees its slot
    assert tasks.process_batch.apply(args=[batch1]).get()["done"] == 1

    # batch 0's first run: a.png fails and is recorded as b.png starts; b.png's upload then fails for a while
    # (TransientError): run_batch takes back the start and drops the lease, and Celery retries the task later
    claim = "1" * 32
    with session_scope(url) as session:
        queries.claim_images(session, job_id, [uris["a.png"], uris["b.png"]], "w1", claim)
        queries.record_outcomes(session, job_id, [queries.ImageOutcome(uris["a.png"], "failed", error="x")],
                                claim=claim)
        queries.start_image(session, job_id, uris["b.png"], claim)
    with session_scope(url) as session:
        queries.unstart_images(session, job_id, [uris["b.png"]])
        queries.drop_leases(session, job_id, claim)

    # meanwhile the operator retries the failed image: relisted as batch 2 and sent (the window has room)
    assert retry_images(settings, job_id, failed=True, stalled_after=None) == 1
    relisted = [args[0] for _, args in queued_tasks(env) if args[0]["images"][0]["input"] == uris["a.png"]
                and len(args[0]["images"]) == 1]
    assert relisted

    # batch 0's Celery retry runs (same message): restores a.png and b.png
    assert tasks.process_batch.apply(args=[batch0]).get() == {"done": 2, "failed": 0, "handed_over": 0}
    # batch 2's message: nothing left to do
    assert tasks.process_batch.apply(args=[relisted[0]]).get() == {"done": 0, "failed": 0, "handed_over": 0}
    with session_scope(url) as session:
        counts = queries.status_counts(session, job_id)
    assert counts["done"] == 3
    assert _counters(url, job_id) == (3, 3, 0)  # nothing in flight, no slot held


def test_a_plain_message_that_finishes_a_windowed_batch_frees_its_slot(env) -> None:  # type: ignore[no-untyped-def]
    """'retry --stalled' on a windowed job still being listed sends its stalled images as plain batches, holding
    no slot. One that records the last image of a batch sent with a slot frees that batch's slot: the batch's own
    message, finding nothing to do, frees nothing, and the slot was once held for good."""
    from db import queries
    from db.engine import session_scope
    from jobs.messages import BatchMessage, ImageItem
    from jobs.settings import load_settings
    from worker.pipeline import fail_batch

    url = load_settings().resolved_database_url()
    job_id, uris, _ = make_job(url, [["g0.png"], ["g1.png"]], window=2)
    with session_scope(url) as s:
        assert queries.claim_window_batches(s, job_id, 2) == [0, 1]
    plain = BatchMessage(job_id=job_id, kind="deblur", models=["wiener"], images=[ImageItem(input=uris["g0.png"])])
    assert not plain.slot
    assert fail_batch(plain, load_settings(), "the model is missing") == 1  # recorded by the plain message
    assert _counters(url, job_id) == (2, 2, 1)
    assert fail_batch(plain.model_copy(update={"slot": True}), load_settings(), "again") == 0  # the slot's own
    assert _counters(url, job_id) == (2, 2, 1)


def test_failing_a_batch_leaves_images_another_delivery_holds_and_frees_no_slot_twice(env) -> None:  # type: ignore[no-untyped-def]
    """A second delivery gives up on a batch (an internal error) while the first still restores its image under a
    live lease: the image is left to the first, which records it and frees the batch's slot, once."""
    from db import queries
    from db.engine import session_scope
    from db.schema import Job
    from jobs.messages import BatchMessage, ImageItem
    from jobs.settings import load_settings
    from worker.pipeline import fail_batch

    settings = load_settings()
    url = settings.resolved_database_url()
    job_id, uris, _ = make_job(url, [["f0.png"], ["f1.png"]], window=2)
    with session_scope(url) as s:
        assert queries.claim_window_batches(s, job_id, 2) == [0, 1]
    f0 = uris["f0.png"]
    with session_scope(url) as s:  # delivery 1 restores f0 under its live lease
        queries.claim_images(s, job_id, [f0], "w1", "a" * 32)
        queries.start_image(s, job_id, f0, "a" * 32)
    message = BatchMessage(job_id=job_id, kind="deblur", models=["wiener"], slot=True, images=[ImageItem(input=f0)])
    assert fail_batch(message, settings, "internal error while processing the batch") == 0  # delivery 2 gives up
    with session_scope(url) as s:
        assert s.get(Job, job_id).batches_in_flight == 2  # nothing failed, nothing freed
    with session_scope(url) as s:  # delivery 1 finishes f0 and records it (pipeline.run_batch.record)
        written = queries.record_outcomes(s, job_id, [queries.ImageOutcome(f0, "done")], claim="a" * 32)
        assert queries.free_slots_of_finished_batches(s, job_id, written) == 1
    with session_scope(url) as s:
        assert s.get(Job, job_id).batches_in_flight == 1  # batch 1 is still in flight
        assert s.scalar(select(queries.Image.status).where(queries.Image.input_uri == f0)) == "done"


def test_failing_a_batch_keeps_an_image_failed_on_its_own_with_its_reason_counted_once(env) -> None:  # type: ignore[no-untyped-def]
    """After its last retry a batch fails its unfinished images; one that had failed on its own keeps its own
    reason, and usage counts it once, not twice."""
    from db import queries
    from db.engine import session_scope
    from db.schema import EarlierAttempt, utcnow
    from db.usage import recorded_usage
    from jobs.messages import BatchMessage, ImageItem
    from jobs.settings import load_settings
    from worker.pipeline import fail_batch

    settings = load_settings()
    url = settings.resolved_database_url()
    job_id, uris, _ = make_job(url, [["a.png", "b.png"]])
    a, b = uris["a.png"], uris["b.png"]
    # the batch's run: a.png fails on its own (a corrupt file, 3 s of model time), recorded; b.png then meets a
    # storage outage over and over, and after the last retry the task fails the batch (worker.tasks._fail_or_wait)
    with session_scope(url) as session:
        queries.claim_images(session, job_id, [a, b], "w1", "c" * 32)
        queries.record_outcomes(session, job_id, [queries.ImageOutcome(a, "failed", error="corrupt file",
                                                                       worker="w1", inference_s=3.0)],
                                claim="c" * 32)
        queries.drop_leases(session, job_id, "c" * 32)  # as run_batch does when it stops on a passing fault
    message = BatchMessage(job_id=job_id, kind="deblur", models=["wiener"],
                           images=[ImageItem(input=a), ImageItem(input=b)])
    assert fail_batch(message, settings, "gave up after 5 retries: storage down") == 1  # b.png only
    with session_scope(url) as session:
        records = [r for r in recorded_usage(session, utcnow() - timedelta(hours=1), utcnow() + timedelta(hours=1))
                   if r.job_id == job_id]
        kept = session.scalar(select(func.count()).select_from(EarlierAttempt).where(EarlierAttempt.job_id == job_id))
        error_a = session.scalar(select(queries.Image.error).where(queries.Image.input_uri == a))
    assert sum(r.failed for r in records) == 2 and kept == 0  # two images, each attempted once
    assert error_a == "corrupt file"


def test_a_slow_image_under_a_live_lease_is_not_counted_stalled(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The stalled-images gauge (and its alert) told the operator to run 'retry --stalled' for a scan its worker
    was still restoring, which the retry rightly leaves alone; both now agree it is not stalled."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import Image, utcnow

    url = f"sqlite:///{tmp_path / 'stalled.db'}"  # a database of its own: the gauge counts every job's images
    ensure_schema(url)
    job_id, uris, _ = make_job(url, [["s0.png"]])
    with session_scope(url) as s:  # a slow scan: its worker renews its lease; running for 2 h (> visibility 1 h)
        queries.claim_images(s, job_id, list(uris.values()), "w1", "a" * 32, lease_s=90)
        s.execute(update(Image).where(Image.job_id == job_id).values(started_at=utcnow() - timedelta(hours=2)))
    with session_scope(url) as s:
        before = utcnow() - timedelta(seconds=3600)
        snap = queries.operations_snapshot(s, stalled_before=before, recent_since=utcnow() - timedelta(hours=1))
        retry = queries.images_to_retry(s, job_id, failed=False, stalled_before=before)
    assert (snap.stalled, retry) == (0, [])
    with session_scope(url) as s:  # its worker is gone: the lease runs out, and then it is stalled
        s.execute(update(Image).where(Image.job_id == job_id).values(lease_until=utcnow() - timedelta(seconds=1)))
    with session_scope(url) as s:
        snap = queries.operations_snapshot(s, stalled_before=before, recent_since=utcnow() - timedelta(hours=1))
        assert snap.stalled == 1 and len(queries.images_to_retry(s, job_id, failed=False, stalled_before=before)) == 1


def test_a_run_records_nothing_over_an_image_taken_over_between_its_read_and_write(database_url, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A run whose lease ran out (it stalled) records as another delivery takes the image over: the claim is
    checked by the UPDATE itself, so the stale run writes nothing and the image is recorded once, by the other."""
    from db import queries
    from db.engine import ensure_schema, get_engine, session_scope
    from db.schema import EarlierAttempt, Image, utcnow

    url = database_url
    ensure_schema(url)
    job_id, uris, _ = make_job(url, [["p.png"]])
    p = uris["p.png"]
    first, second = "a" * 32, "b" * 32
    with session_scope(url) as s:
        queries.claim_images(s, job_id, [p], "w1", first)
        queries.start_image(s, job_id, p, first)
    with session_scope(url) as s:  # the first run stalled past its lease (no renewal got through)
        s.execute(update(Image).where(Image.input_uri == p).values(lease_until=utcnow() - timedelta(seconds=1)))

    took: list = []

    def other_delivery_takes_over(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        # between record_outcomes' read (claim still the first's) and its UPDATE (the only one that sets 'review'):
        # the second delivery claims and starts the image, in its own transaction
        if statement.lstrip().upper().startswith("UPDATE IMAGES SET") and "REVIEW=" in statement.upper() \
                and not took:
            with session_scope(url) as other:
                took.append(queries.claim_images(other, job_id, [p], "w2", second).todo)
            with session_scope(url) as other:
                took.append(queries.start_image(other, job_id, p, second))

    engine = get_engine(url)
    event.listen(engine, "before_cursor_execute", other_delivery_takes_over)
    try:
        with session_scope(url) as s:
            written = queries.record_outcomes(s, job_id, [queries.ImageOutcome(
                p, "done", worker="w1", inference_s=5.0, width=10, height=10)], claim=first)
    finally:
        event.remove(engine, "before_cursor_execute", other_delivery_takes_over)
    with session_scope(url) as s:  # the second delivery finishes its restoration and records it
        written2 = queries.record_outcomes(s, job_id, [queries.ImageOutcome(p, "done", worker="w2", inference_s=5.0,
                                                                            width=10, height=10)], claim=second)
        kept = s.scalar(select(func.count()).select_from(EarlierAttempt).where(EarlierAttempt.job_id == job_id))
        row = s.execute(select(Image.status, Image.worker).where(Image.input_uri == p)).one()
    # the other delivery took it over and started it (the stale run's start counts as lost), between the read and
    # the write
    assert took == [[p], 2]
    assert (written, written2, kept, tuple(row)) == ([], [p], 0, ("done", "w2"))


def test_two_deliveries_claiming_at_once_on_sqlite_never_both_take_an_image(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SQLite has no row locks and starts its transaction at the first write: another delivery's claim landing
    just before this one's UPDATE must be seen by that UPDATE, so only one of them takes (and restores) each
    image."""
    from db import queries
    from db.engine import ensure_schema, get_engine, session_scope
    from db.schema import Image, utcnow

    url = f"sqlite:///{tmp_path / 'race.db'}"
    ensure_schema(url)
    job_id, uris, _ = make_job(url, [["q0.png", "q1.png"]])
    inputs = list(uris.values())
    with session_scope(url) as s:  # the job is running already (an earlier batch was claimed)
        queries.set_job_state(s, job_id, status="running", started_at=utcnow())
    engine = get_engine(url)
    fired: list = []

    def first_claims_and_starts(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        # the second delivery is about to claim: the first delivery's claim and start land just before (another
        # process, another connection)
        if statement.lstrip().upper().startswith("UPDATE IMAGES SET STATUS") and not fired:
            fired.append(1)
            with session_scope(url) as other:
                fired.append(queries.claim_images(other, job_id, inputs, "w1", "a" * 32).todo)
            with session_scope(url) as other:
                fired.append(queries.start_image(other, job_id, inputs[0], "a" * 32))

    event.listen(engine, "before_cursor_execute", first_claims_and_starts)
    try:
        with session_scope(url) as s:
            second = queries.claim_images(s, job_id, inputs, "w2", "b" * 32)
    finally:
        event.remove(engine, "before_cursor_execute", first_claims_and_starts)
    with session_scope(url) as s:
        second_start = queries.start_image(s, job_id, inputs[0], "b" * 32)
        row = s.execute(select(Image.claim, Image.attempts).where(Image.input_uri == inputs[0])).one()
    assert fired[1:] == [inputs, 1]  # the first delivery claimed both and started q0
    assert (second.todo, sorted(second.held), second_start) == ([], sorted(inputs), None)
    assert tuple(row) == ("a" * 32, 1)


@pytest.fixture
def pg(postgres_url, monkeypatch):  # type: ignore[no-untyped-def]
    """The session's PostgreSQL, as this process's settings name it: the lock tests need row locks."""
    from db.engine import ensure_schema

    monkeypatch.setenv("DEBLUR_DATABASE_URL", postgres_url)
    ensure_schema(postgres_url)
    return postgres_url


def _run(fn, errors, name):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a thread; what it raises goes to ``errors`` as (name, exception type, first line)."""
    def target():  # type: ignore[no-untyped-def]
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            errors.append((name, type(exc).__name__, str(exc).splitlines()[0]))
    thread = threading.Thread(target=target, name=name)
    thread.start()
    return thread


def test_lease_renewal_never_deadlocks_with_its_own_runs_recording(pg) -> None:  # type: ignore[no-untyped-def]
    """The run records one image and starts the next in one transaction, waiting for the job's row (another
    worker holds it) with the first image's row locked; its lease thread renews meanwhile. The renewal skips the
    rows the run holds instead of waiting for them while holding the others (PostgreSQL aborted one of the two)."""
    from db import queries
    from db.engine import session_scope
    from db.schema import Image, Job

    url = pg
    # a batch from a manifest: listed (and so processed) in the manifest's order, not the keys' order
    job_id, uris, _ = make_job(url, [["z0.png", "a1.png", "m2.png"]], window=1)
    x0, x1, x2 = uris["z0.png"], uris["a1.png"], uris["m2.png"]
    claim = "c" * 32
    with session_scope(url) as s:  # the run: claims its batch, starts x0 (pipeline: one transaction each)
        queries.claim_images(s, job_id, [x0, x1, x2], "w1", claim)
    with session_scope(url) as s:
        queries.start_image(s, job_id, x0, claim)
    with session_scope(url) as s:  # x0's row re-indexed last (any earlier status change of it does this)
        s.execute(update(Image).where(Image.input_uri == x0).values(batch=Image.batch + 100))
    with session_scope(url) as s:
        s.execute(update(Image).where(Image.input_uri == x0).values(batch=Image.batch - 100))
    errors: list = []
    other = session_scope(url)  # another worker recording a batch of the same job holds the job row
    other_session = other.__enter__()
    other_session.execute(select(Job.id).where(Job.id == job_id).with_for_update())

    def main_thread() -> None:  # _run_works: record x0 (frees the slot if the batch is finished), start x1
        with session_scope(url) as s:
            written = queries.record_outcomes(s, job_id, [queries.ImageOutcome(x0, "done")], claim=claim)
            queries.free_slots_of_finished_batches(s, job_id, written)
            queries.start_image(s, job_id, x1, claim)

    def lease_thread() -> None:  # LeaseKeeper._run's tick
        with session_scope(url) as s:
            queries.renew_leases(s, job_id, claim, 90)

    m = _run(main_thread, errors, "run")
    time.sleep(0.5)  # the run has locked x0 and waits for the job row
    r = _run(lease_thread, errors, "lease")
    time.sleep(1.5)  # the renewal locks x1, x2 and waits for x0
    other.__exit__(None, None, None)  # the other worker commits
    m.join(30)
    r.join(30)
    assert not errors, errors


def test_a_second_deliverys_claim_never_deadlocks_with_the_first_deliverys_recording(pg) -> None:  # type: ignore[no-untyped-def]
    """The job is 'queued' again ('retry --failed' reset another batch's images), so a claim updates the job's row;
    the first delivery's recording holds the image rows and then asks for the job's row. Claims now take the image
    rows first and the job's row last, the recording's order, so the two wait for each other instead of deadlocking
    (PostgreSQL aborted one of the two)."""
    from db import queries
    from db.engine import session_scope
    from db.schema import Job

    url = pg
    job_id, uris, _ = make_job(url, [["y0.png", "y1.png"]], window=1)
    y0, y1 = uris["y0.png"], uris["y1.png"]
    first = "a" * 32
    with session_scope(url) as s:
        queries.claim_images(s, job_id, [y0, y1], "w1", first, lease_s=1)
        queries.start_image(s, job_id, y0, first)
        queries.start_image(s, job_id, y1, first)
    with session_scope(url) as s:  # a retry of other images made the job queued again; the lease ran out (stall)
        s.execute(update(Job).where(Job.id == job_id).values(status="queued"))
    time.sleep(1.2)
    errors: list = []
    barrier = threading.Event()

    def first_records() -> None:
        with session_scope(url) as s:
            written = queries.record_outcomes(s, job_id, [queries.ImageOutcome(y0, "done"),
                                                          queries.ImageOutcome(y1, "done")], claim=first)
            barrier.set()
            time.sleep(1.0)  # the second delivery's claim arrives now
            queries.free_slots_of_finished_batches(s, job_id, written)

    def second_claims() -> None:
        barrier.wait(10)
        with session_scope(url) as s:
            queries.claim_images(s, job_id, [y0, y1], "w2", "b" * 32)

    a = _run(first_records, errors, "record")
    b = _run(second_claims, errors, "claim")
    a.join(30)
    b.join(30)
    assert not errors, errors


def test_a_plain_message_that_frees_a_slot_sends_the_next_batch(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The slot a plain batch freed (its images were a sent batch's last) was filled by nobody: only slot messages
    sent the next batch, and the job, listed already, waited for good. Every batch now fills the window's room."""
    from db import queries
    from db.engine import session_scope
    from jobs.messages import BatchMessage, ImageItem
    from jobs.settings import load_settings
    from tests.e2e_helpers import queued_tasks
    from worker import tasks

    url = load_settings().resolved_database_url()
    job_id, uris, tag = make_job(url, [["a.png"], ["b.png"]], window=1)  # listed: the producer sends no more
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket=f"claims-{tag}")
    for i, name in enumerate(("a.png", "b.png")):
        s3.put_object(Bucket=f"claims-{tag}", Key=f"in/{name}", Body=_png(i))
    with session_scope(url) as s:  # batch 0 sent with its slot (its message then lost by the broker)
        assert queries.claim_window_batches(s, job_id, 1) == [0]
    monkeypatch.setattr(tasks.runtime, "_state", {})
    plain = BatchMessage(job_id=job_id, kind="deblur", models=["wiener"],
                         images=[ImageItem(input=uris["a.png"], output=f"s3://claims-{tag}/out/a.png")])
    assert tasks.process_batch.apply(args=[plain.to_payload()]).get()["done"] == 1
    assert _counters(url, job_id) == (2, 2, 1)  # batch 0's slot freed, batch 1 sent in its place
    assert [[i["input"] for i in args[0]["images"]] for _, args in queued_tasks(env)] == [[uris["b.png"]]]


def test_a_retry_of_a_job_still_being_listed_frees_no_slot_twice(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """'retry --failed' on a windowed job still being listed resets a failed image in its batch (no relisting)
    and sends it as a plain batch; that batch had freed its slot when the image failed. The retry counts it in
    flight again, so its recording frees one slot, not a second one the job never held."""
    from db import queries
    from db.engine import session_scope
    from db.schema import Job
    from jobs.settings import load_settings
    from producer.dispatch import send_window_batches
    from producer.retry import retry_images
    from tests.e2e_helpers import queued_tasks
    from worker import tasks

    settings = load_settings()
    url = settings.resolved_database_url()
    job_id, uris, tag = make_job(url, [["a.png"], ["b.png"], ["c.png"]], window=1)
    with session_scope(url) as s:  # the producer is still listing
        s.execute(update(Job).where(Job.id == job_id).values(status="submitting"))
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket=f"claims-{tag}")
    s3.put_object(Bucket=f"claims-{tag}", Key="in/a.png", Body=_png(0))
    a = uris["a.png"]
    with session_scope(url) as s:
        assert queries.claim_window_batches(s, job_id, 1) == [0]
    with session_scope(url) as s:  # batch 0's run: a.png fails (its object was not there yet); slot freed
        queries.claim_images(s, job_id, [a], "w1", "1" * 32)
        written = queries.record_outcomes(s, job_id, [queries.ImageOutcome(a, "failed", error="missing")],
                                          claim="1" * 32)
        assert queries.free_slots_of_finished_batches(s, job_id, written) == 1
    with session_scope(url) as s:  # batch 1 goes out and is in flight
        assert queries.claim_window_batches(s, job_id, 1) == [1]
    assert retry_images(settings, job_id, failed=True, stalled_after=None) == 1  # a plain batch, a.png in batch 0
    [plain] = [args[0] for _, args in queued_tasks(env) if not args[0].get("slot")]
    monkeypatch.setattr(tasks.runtime, "_state", {})
    assert tasks.process_batch.apply(args=[plain]).get()["done"] == 1
    assert _counters(url, job_id) == (3, 2, 1)  # batch 1 still in flight: the window is full
    with session_scope(url) as s:
        spec = queries.job_spec(s, job_id)
    assert send_window_batches(settings, job_id, "deblur", spec) == 0  # the producer's next chunk waits its turn


def test_failing_a_batch_leaves_an_image_claimed_between_its_read_and_write(database_url, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A batch failed after its retries (its leases ended) while a redelivery claims and starts one of its images:
    the failure, checked by its UPDATE, leaves the image to the redelivery, which records it restored."""
    from db import queries
    from db.engine import ensure_schema, get_engine, session_scope
    from db.schema import Image
    from jobs.messages import BatchMessage, ImageItem
    from jobs.settings import load_settings
    from worker.pipeline import fail_batch

    monkeypatch.setenv("DEBLUR_DATABASE_URL", database_url)
    ensure_schema(database_url)
    job_id, uris, _ = make_job(database_url, [["k.png"]])
    k = uris["k.png"]
    with session_scope(database_url) as s:  # run 1 claimed, then stopped on a passing fault (_end_run)
        queries.claim_images(s, job_id, [k], "w1", "1" * 32)
        queries.drop_leases(s, job_id, "1" * 32)
    took: list = []

    def redelivery_claims_first(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        # record_outcomes' UPDATE (the only one that sets 'review'), after its read
        if statement.lstrip().upper().startswith("UPDATE IMAGES SET") and "REVIEW=" in statement.upper() \
                and not took:
            took.append(0)
            with session_scope(database_url) as other:
                took.append(queries.claim_images(other, job_id, [k], "w2", "2" * 32).todo)
            with session_scope(database_url) as other:
                took.append(queries.start_image(other, job_id, k, "2" * 32))

    engine = get_engine(database_url)
    event.listen(engine, "before_cursor_execute", redelivery_claims_first)
    try:
        failed = fail_batch(BatchMessage(job_id=job_id, kind="deblur", models=["wiener"],
                                         images=[ImageItem(input=k)]), load_settings(), "gave up after 5 retries")
    finally:
        event.remove(engine, "before_cursor_execute", redelivery_claims_first)
    assert took == [0, [k], 1] and failed == 0
    with session_scope(database_url) as s:
        written = queries.record_outcomes(s, job_id, [queries.ImageOutcome(k, "done", worker="w2")], claim="2" * 32)
        row = s.execute(select(Image.status, Image.error).where(Image.input_uri == k)).one()
    assert written == [k] and tuple(row) == ("done", None)


def test_retry_stalled_leaves_an_image_a_redelivery_claimed_since_it_looked(database_url) -> None:  # type: ignore[no-untyped-def]
    """'retry --stalled' selects a running image whose worker is gone; a redelivery claims and starts it before
    the reset. The reset leaves it (it re-checks the lease), and the redelivery's restoration is recorded."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import Image, utcnow

    ensure_schema(database_url)
    job_id, uris, _ = make_job(database_url, [["r.png"]])
    r = uris["r.png"]
    with session_scope(database_url) as s:  # run 1 lost: its lease ran out, started 2 h ago
        queries.claim_images(s, job_id, [r], "w1", "1" * 32)
        s.execute(update(Image).where(Image.input_uri == r).values(
            started_at=utcnow() - timedelta(hours=2), lease_until=utcnow() - timedelta(seconds=1)))
    with session_scope(database_url) as retry:
        images = queries.images_to_retry(retry, job_id, failed=False, stalled_before=utcnow() - timedelta(hours=1))
        assert [i.input_uri for i in images] == [r]
        with session_scope(database_url) as other:  # the redelivered batch claims and starts it now
            assert queries.claim_images(other, job_id, [r], "w2", "2" * 32).todo == [r]
            assert queries.start_image(other, job_id, r, "2" * 32) == 1
        assert queries.reset_for_retry(retry, job_id, images) == set()
    with session_scope(database_url) as s:
        written = queries.record_outcomes(s, job_id, [queries.ImageOutcome(r, "done", worker="w2")], claim="2" * 32)
        row = s.execute(select(Image.status, Image.claim).where(Image.input_uri == r)).one()
    assert written == [r] and tuple(row) == ("done", "2" * 32)


def test_retry_never_deadlocks_with_a_claim_or_a_failing_batch(pg) -> None:  # type: ignore[no-untyped-def]
    """Retry once locked the job's row before its image rows, while claims and recordings lock image rows first:
    'retry --stalled' on a queued job as a worker claimed its images deadlocked (PostgreSQL aborted one). Every
    path now takes image rows first; each interleaving is forced with a hook on the SQL the sessions send."""
    from db import queries
    from db.engine import get_engine, session_scope
    from db.schema import utcnow
    from jobs.messages import BatchMessage, ImageItem
    from jobs.settings import load_settings
    from worker.pipeline import fail_batch

    url = pg
    queued_id, queued = make_job(url, [["d0.png", "d1.png"]])[:2]  # queued: a claim updates the job's row too
    windowed_id, windowed = make_job(url, [["e0.png"], ["e1.png"]], window=2)[:2]
    e0 = windowed["e0.png"]
    with session_scope(url) as s:
        assert queries.claim_window_batches(s, windowed_id, 2) == [0, 1]
        queries.claim_images(s, windowed_id, [e0], "w1", "a" * 32)
        queries.drop_leases(s, windowed_id, "a" * 32)  # the run stopped on a passing fault (_end_run)
    message = BatchMessage(job_id=windowed_id, kind="deblur", models=["wiener"], slot=True,
                           images=[ImageItem(input=e0)])
    cases = {
        "claim": (queued_id, "UPDATE JOBS",
                  lambda: _in_session(url, lambda s: queries.claim_images(s, queued_id, list(queued.values()), "w1",
                                                                        "a" * 32))),
        "fail": (windowed_id, "SELECT JOBS",
                 lambda: fail_batch(message, load_settings(), "gave up after 5 retries")),
    }
    engine = get_engine(url)
    for name, (job_id, at_job, worker_side) in cases.items():
        worker_at_job, retry_at_images = threading.Event(), threading.Event()

        def hook(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
            thread = threading.current_thread().name
            if thread == "worker" and statement.lstrip().upper().startswith(at_job):
                worker_at_job.set()  # its image rows are locked; the job's row next
                retry_at_images.wait(10)
                time.sleep(0.5)  # the retry now asks for the image rows
            if thread == "retry" and "FOR UPDATE" in statement and " images" in statement.split("FROM", 1)[-1][:40]:
                retry_at_images.set()

        def retry(job_id: str = job_id) -> None:
            worker_at_job.wait(10)
            with session_scope(url) as s:
                images = queries.images_to_retry(s, job_id, failed=False,
                                                 stalled_before=utcnow() + timedelta(seconds=5))
                queries.reset_for_retry(s, job_id, images)

        errors: list = []
        event.listen(engine, "before_cursor_execute", hook)
        try:
            threads = [_run(worker_side, errors, "worker"), _run(retry, errors, "retry")]
            for thread in threads:
                thread.join(30)
        finally:
            event.remove(engine, "before_cursor_execute", hook)
        assert not errors, (name, errors)


def _in_session(url: str, work):  # type: ignore[no-untyped-def]
    """``work(session)`` in a transaction of its own."""
    from db.engine import session_scope

    with session_scope(url) as session:
        return work(session)


def test_a_run_hung_on_one_image_stops_renewing_its_lease_and_another_delivery_takes_it(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The lease was renewed by a timer thread whatever the run did, so a run hung on one image (a deadlocked
    library) kept its images from every other delivery for good. Renewal now follows progress: past the image time
    limit it stops, the lease runs out and a second delivery claims the images; a new image started renews again."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import Image
    from worker.pipeline import LeaseKeeper

    url = f"sqlite:///{tmp_path / 'hung.db'}"
    ensure_schema(url)
    job_id, uris, _ = make_job(url, [["h0.png", "h1.png"]])
    inputs = list(uris.values())
    hung, second = "0" * 8 + "a" * 24, "0" * 8 + "b" * 24

    def lease_until() -> object:
        with session_scope(url) as s:
            return s.scalar(select(func.max(Image.lease_until)).where(Image.job_id == job_id))

    with session_scope(url) as s:
        assert sorted(queries.claim_images(s, job_id, inputs, "w1", hung, lease_s=0.6).todo) == sorted(inputs)
    with LeaseKeeper(url, job_id, hung, lease_s=0.6, image_limit_s=0.8) as keeper:
        keeper.image_started(inputs[0])
        first = lease_until()
        time.sleep(0.5)
        assert lease_until() > first  # working: renewed
        with session_scope(url) as s:  # a second delivery now leaves both images to the live lease
            claim = queries.claim_images(s, job_id, inputs, "w2", second, lease_s=0.6)
        assert (claim.todo, sorted(claim.held)) == ([], sorted(inputs))
        time.sleep(1.8)  # past the image limit, and then past the lease
        assert keeper.hung_on() == inputs[0]
        with session_scope(url) as s:
            claim = queries.claim_images(s, job_id, inputs, "w2", second, lease_s=60)
        assert (sorted(claim.todo), claim.held) == (sorted(inputs), [])
        keeper.image_started(inputs[1])  # the hung run wakes and starts its next image: it renews again...
        assert keeper.hung_on() is None
        time.sleep(0.4)
    with session_scope(url) as s:  # ...but only what it still holds: the images the other delivery took stay taken
        assert {i.claim for i in s.scalars(select(Image).where(Image.job_id == job_id))} == {second}
    assert any("taken for hung" in r.getMessage() and inputs[0] in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("skew", [timedelta(minutes=10), -timedelta(minutes=10)], ids=["ahead", "behind"])
def test_leases_go_by_the_database_clock_whatever_a_workers_clock_says(pg, monkeypatch, skew) -> None:  # type: ignore[no-untyped-def]
    """Leases were written and judged by each worker's own clock. A worker whose clock ran ten minutes ahead took
    another's live lease for over and restored its images a second time; one ten minutes behind kept a lost run's
    images waiting ten minutes past its lease. Both now go by PostgreSQL's clock."""
    from db import queries
    from db.engine import session_scope
    from db.schema import utcnow

    job_id, uris, _ = make_job(pg, [["k0.png"]])
    inputs = list(uris.values())
    with session_scope(pg) as s:  # a worker with a true clock holds the image under a live 60-s lease
        assert queries.claim_images(s, job_id, inputs, "true-clock", "1" * 32, lease_s=60).todo == inputs
    monkeypatch.setattr(queries, "utcnow", lambda: utcnow() + skew)  # this process is now the skewed worker
    with session_scope(pg) as s:  # a second delivery lands on it: the lease is live, and has about 60 s left
        claim = queries.claim_images(s, job_id, inputs, "skewed", "2" * 32, lease_s=60)
    assert (claim.todo, claim.held) == ([], inputs)
    assert 50 < claim.held_for <= 60
    with session_scope(pg) as s:  # a renewal sent from the skewed machine writes the lease by the database's clock
        queries.renew_leases(s, job_id, "1" * 32, lease_s=60)
        until = s.scalar(select(func.max(queries.Image.lease_until)).where(queries.Image.job_id == job_id))
        # written as PostgreSQL's statement_timestamp() of the renewal plus the lease: an instant within this
        # transaction (not before its start, not after this statement's own time), not the skewed machine's
        renewed_at = queries.as_utc(until) - timedelta(seconds=60)
        began = queries.as_utc(s.scalar(select(func.transaction_timestamp())))
        assert began <= renewed_at <= queries.database_now(s)
        # and 'retry --stalled' from it leaves the image to its live lease (anything started before an hour from
        # now counts as stalled, unless its lease is live)
        assert queries.images_to_retry(s, job_id, failed=False, stalled_before=utcnow() + timedelta(hours=1)) == []


def test_a_recount_of_the_window_waiting_on_a_freed_slot_counts_it_freed(  # type: ignore[no-untyped-def]
        pg, redis_url, s3_endpoint, tmp_path, monkeypatch) -> None:
    """'retry --stalled' recounts a windowed job's batches in flight in one UPDATE. On PostgreSQL that UPDATE
    counted the images with the snapshot it started with: when a worker was freeing a slot under the job's lock
    at that moment, the recount waited for the lock, then wrote back a count that still held the finished batch,
    and a window-1 job never sent its next batch. The recount now takes the job's row before it counts."""
    from db import queries
    from db.engine import _sessionmaker, session_scope
    from db.schema import Job
    from jobs.settings import load_settings
    from producer.retry import retry_images
    from tests.e2e_helpers import use_services

    use_services(monkeypatch, redis_url, s3_endpoint, pg, tmp_path / "home")  # the retry sends to this Redis
    job_id, uris, _ = make_job(pg, [["n0.png"], ["n1.png"]], window=1)
    with session_scope(pg) as s:
        assert queries.claim_window_batches(s, job_id, 1) == [0]
        queries.claim_images(s, job_id, [uris["n0.png"]], "w", "8" * 32)
    worker = _sessionmaker(pg)()  # the worker records batch 0's last image and frees its slot: not committed yet
    written = queries.record_outcomes(worker, job_id, [queries.ImageOutcome(uris["n0.png"], "done", worker="w")],
                                      claim="8" * 32)
    assert queries.free_slots_of_finished_batches(worker, job_id, written) == 1
    retried: list[int] = []
    retry = threading.Thread(target=lambda: retried.append(
        retry_images(load_settings(), job_id, failed=False, stalled_after=3600)))
    retry.start()
    time.sleep(1.0)  # the retry's recount now waits for the job's row
    worker.commit()
    worker.close()
    retry.join(30)
    with session_scope(pg) as s:
        job = s.get(Job, job_id)
        # nothing was stalled; the freed slot stayed free, and the retry sent the next batch through it
        assert (retried, job.batches_sent, job.batches_in_flight) == ([0], 2, 1)


def test_a_run_starting_its_next_image_never_deadlocks_with_a_delivery_claiming_it(  # type: ignore[no-untyped-def]
        pg, redis_url, s3_endpoint, tmp_path, monkeypatch) -> None:
    """A run's transaction between two images recorded the last one (locking the job's row to free a window slot)
    and then started the next (its image row). A delivery taking that next image over (its lease ran out) locks
    the image row and then, for a queued job, the job's row: PostgreSQL found the two deadlocked and aborted one.
    The run now starts the image first, so both take image rows before the job's."""
    from db import queries
    from db.engine import get_engine, session_scope
    from db.schema import Image, Job
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from tests.e2e_helpers import queued_tasks, use_services
    from tests.test_end_to_end import run_cli
    from worker import pipeline

    env = use_services(monkeypatch, redis_url, s3_endpoint, pg, tmp_path / "home")
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = f"lockorder-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    for i in range(2):
        s3.put_object(Bucket=bucket, Key=f"in/{i}.png", Body=_png(i))
    job_id = run_cli("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--model", "wiener",
                     "--batch-size", "2", "--window", "1", "-q").strip()
    [(_, args)] = queued_tasks(env)
    second = f"s3://{bucket}/in/1.png"
    armed, errors = threading.Event(), []
    real = pipeline.restore_work

    def restore(work, message, *rest):  # type: ignore[no-untyped-def]
        if work.item.input.endswith("/0.png"):  # meanwhile the job went back to queued and the next image's lease
            with session_scope(pg) as s:       # ran out (a slow run): a delivery may claim it, job row included
                s.execute(update(Job).where(Job.id == job_id).values(status="queued"))
                s.execute(update(Image).where(Image.input_uri == second)
                          .values(lease_until=queries.database_now(s) - timedelta(seconds=1)))
            armed.set()
        real(work, message, *rest)

    def claim() -> None:
        try:
            with session_scope(pg) as s:
                queries.claim_images(s, job_id, [second], "other@node", "9" * 32, lease_s=60)
        except Exception as exc:
            errors.append(f"claim: {type(exc).__name__}: {exc}")

    claimer: list[threading.Thread] = []

    def hook(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        # the run has just locked the job's row to free slots: the delivery claims the next image right then
        if armed.is_set() and not claimer and threading.current_thread() is threading.main_thread() \
                and "FROM jobs" in statement and "FOR UPDATE" in statement:
            claimer.append(threading.Thread(target=claim))
            claimer[0].start()
            time.sleep(1.0)

    monkeypatch.setattr(pipeline, "restore_work", restore)
    engine = get_engine(pg)
    event.listen(engine, "after_cursor_execute", hook)
    try:
        pipeline.run_batch(BatchMessage.from_payload(args[0]), load_settings(), hand_over=lambda *a, **k: None)
    except Exception as exc:
        errors.append(f"run: {type(exc).__name__}: {exc}")
    finally:
        event.remove(engine, "after_cursor_execute", hook)
        for thread in claimer:
            thread.join(30)
    assert claimer and errors == []
