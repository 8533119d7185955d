"""Per-job windows: jobs at one priority take turns instead of queueing behind each other.

Given a real Redis, S3 endpoint, database and Celery worker processes, when a
job is submitted with a window of W batches, then only W of its batches are in
the broker and each one that finishes sends the next; a ten-image job
submitted after a large one at the same priority finishes while the large one
is still running (and without a window it waits for all of it); batches not
sent yet are not taken for stalled; a cancelled job sends nothing more, a
paused one sends nothing more until it is resumed; a worker killed mid-batch
and a batch handed over for time keep the chain going, and every image is
restored once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from tests.e2e_helpers import WorkerProcess, kill_mid_image_then_finish, queued_tasks, service_env, use_services
from tests.test_end_to_end import run_cli, wait_done

pytestmark = [pytest.mark.integration]


def _png(seed: int, size: tuple[int, int] = (96, 128)) -> bytes:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (*size, 3), dtype=np.uint8), (0, 0), 2.0)
    return cv2.imencode(".png", image)[1].tobytes()


def _bucket(env: dict[str, str], name: str, count: int, size: tuple[int, int] = (96, 128)) -> None:
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    for i in range(count):
        s3.put_object(Bucket=name, Key=f"in/{i:02d}.png", Body=_png(i, size))


def _counters(job_id: str) -> tuple[int, int, int]:
    from db.engine import session_scope
    from db.schema import Job
    from jobs.settings import load_settings

    with session_scope(load_settings().resolved_database_url()) as session:
        job = session.get(Job, job_id)
        return job.batches_listed, job.batches_sent, job.batches_in_flight


def test_a_window_keeps_that_many_batches_in_the_broker_and_a_cancelled_job_sends_no_more(env) -> None:  # type: ignore[no-untyped-def]
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from producer.dispatch import send_window_batches
    from producer.tracking import job_status

    _bucket(env, "windowed", 7)
    job_id = run_cli("submit", "s3://windowed/in/", "--output", "s3://windowed/out/", "--model", "wiener",
                     "--batch-size", "2", "--window", "3", "-q").strip()
    tasks = queued_tasks(env)
    assert len(tasks) == 3 and all(args[0]["slot"] is True for _, args in tasks)
    sent = [image["input"].rsplit("/", 1)[1] for _, args in tasks for image in args[0]["images"]]
    assert sorted(sent) == ["00.png", "01.png", "02.png", "03.png", "04.png", "05.png"]  # the first three, in order
    assert _counters(job_id) == (4, 3, 3)
    info = job_status(load_settings(), job_id)
    assert info["status"] == "queued" and info["counts"]["pending"] == 7 and info["spec"]["window"] == 3
    assert info["batches"] == {"window": 3, "listed": 4, "sent": 3, "in_flight": 3}
    assert "window: 3 batches at a time; 3 of 4 sent, 3 in the broker or running" in run_cli("status", job_id)

    # the batch not sent yet waits its turn: 'retry --stalled' sends again only what was sent and is pending
    time.sleep(1.2)
    from producer.cli import main

    retried = CliRunner().invoke(main, ["retry", job_id, "--stalled", "--stalled-after", "1"])
    assert retried.exit_code == 0 and "re-enqueued 6 images" in retried.output, retried.output
    # the six become batches 4-6 after the job's last, sent through the window: the unsent batch 3 first, then
    # two of them (the three sent before were counted afresh as lost: none of theirs is left to run)
    assert len(queued_tasks(env)) == 6 and _counters(job_id) == (7, 6, 3)

    run_cli("cancel", job_id)
    spec = job_status(load_settings(), job_id)["spec"]
    with session_scope(load_settings().resolved_database_url()) as session:  # a batch that held a slot finished
        queries.release_window_slots(session, job_id, 1)
    assert send_window_batches(load_settings(), job_id, "deblur", spec) == 0
    assert len(queued_tasks(env)) == 6 and _counters(job_id) == (7, 6, 2)

    # without a window every batch goes at submission, as before
    plain = run_cli("submit", "s3://windowed/in/", "--output", "s3://windowed/plain/", "--model", "wiener",
                    "--batch-size", "2", "-q").strip()
    assert len(queued_tasks(env)) == 6 + 4
    plain_bodies = [args[0] for _, args in queued_tasks(env) if args[0]["job_id"] == plain]
    assert len(plain_bodies) == 4
    assert not any("slot" in body for body in plain_bodies)  # left out: workers before windows take these batches
    assert _counters(plain) == (0, 0, 0)


def test_a_negative_window_is_refused_before_anything_is_written(env) -> None:  # type: ignore[no-untyped-def]
    from producer.cli import main

    _bucket(env, "refused", 1)
    result = CliRunner().invoke(main, ["submit", "s3://refused/in/", "--output", "s3://refused/out/",
                                       "--window", "-1"])
    assert result.exit_code == 2 and "--window" in result.output
    assert queued_tasks(env) == []


def _finish_order(job_ids: dict[str, str]) -> list[str]:
    """The jobs' images by finishing time, each named by its job's label."""
    rows = []
    for label, job_id in job_ids.items():
        rows += [(r["finished_at"], label) for r in json.loads(run_cli("results", job_id, "--format", "json"))]
    return [label for _, label in sorted(rows)]


@pytest.mark.parametrize("window", [2, 0])
def test_a_small_job_takes_turns_with_a_large_one_at_the_same_priority(env, tmp_path, window) -> None:  # type: ignore[no-untyped-def]
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    _bucket(env, "large", 8)
    _bucket(env, "small", 2)
    large = run_cli("submit", "s3://large/in/", "--output", "s3://large/out/", "--model", "wiener",
                    "--batch-size", "1", "--window", str(window), "-q").strip()
    small = run_cli("submit", "s3://small/in/", "--output", "s3://small/out/", "--model", "wiener",
                    "--batch-size", "1", "--window", str(window), "-q").strip()
    worker = WorkerProcess(service_env(env), tmp_path / "worker.log")
    try:
        worker.wait_ready(app_for(load_settings()))
        assert wait_done(large, timeout=240)["counts"]["done"] == 8
        assert wait_done(small, timeout=60)["counts"]["done"] == 2
    finally:
        worker.stop()
    order = _finish_order({"L": large, "S": small})
    if window:
        # the large job's first two batches were in the broker first; the small job's two came next, and each
        # large batch that finished sent the next one behind them
        assert order == ["L", "L", "S", "S"] + ["L"] * 6, order
        assert _counters(large) == (8, 8, 0) and _counters(small) == (2, 2, 0)
    else:
        assert order == ["L"] * 8 + ["S", "S"], order  # first come, first served: the small job waited


def test_a_killed_worker_and_a_batch_out_of_time_keep_a_windowed_job_going(  # type: ignore[no-untyped-def]
        redis_url, s3_endpoint, tmp_path, monkeypatch) -> None:
    """Window 1: the job's only batch in flight is redelivered after its worker is killed, and batches handed over
    for time carry the slot; every image is restored, none twice after it was recorded."""
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    env = use_services(monkeypatch, redis_url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}",
                       tmp_path / "home", DEBLUR_VISIBILITY_TIMEOUT="8", DEBLUR_BATCH_TIME_LIMIT="1",
                       DEBLUR_CLAIM_LEASE="4")
    _bucket(env, "chain", 4, size=(384, 512))
    app = app_for(load_settings())
    first = WorkerProcess(service_env(env), tmp_path / "first.log")
    first.wait_ready(app)
    # 2-3 s an image: the first worker is killed inside its first image; later batches run out of time after one
    job_id = run_cli("submit", "s3://chain/in/", "--output", "s3://chain/out/", "--batch-size", "2",
                     "--window", "1", "--model", "richardson-lucy:iterations=200", "-q").strip()

    info, second = kill_mid_image_then_finish(env, tmp_path, app, first, job_id)
    assert info["status"] == "done" and info["counts"]["done"] == 4, info
    log = Path(second.log).read_text(errors="replace")
    assert "handing 1 over to a new task" in log  # a batch out of time passed its slot on
    assert _counters(job_id) == (2, 2, 0)
    attempts = sorted(r["attempts"] for r in json.loads(run_cli("results", job_id, "--format", "json")))
    assert attempts == [1, 1, 1, 2], attempts  # only the image the killed worker was restoring ran twice


def test_after_the_broker_lost_its_queue_retry_all_stalled_restarts_every_job(  # type: ignore[no-untyped-def]
        redis_url, s3_endpoint, tmp_path, monkeypatch) -> None:
    """A Redis restarted without persistence loses every waiting batch; 'retry --all --stalled' sends them again,
    and a windowed job's chain starts again from them (its in-flight count still counted the lost ones)."""
    import redis

    from jobs.celery_app import app_for
    from jobs.settings import load_settings
    from producer.cli import main

    env = use_services(monkeypatch, redis_url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}",
                       tmp_path / "home")
    _bucket(env, "lost", 5)
    windowed = run_cli("submit", "s3://lost/in/", "--output", "s3://lost/windowed/", "--model", "wiener",
                       "--batch-size", "1", "--window", "2", "-q").strip()
    plain = run_cli("submit", "s3://lost/in/", "--output", "s3://lost/plain/", "--model", "wiener",
                    "--batch-size", "2", "-q").strip()
    assert len(queued_tasks(env)) == 2 + 3
    broker = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    broker.delete(*[key for key in broker.keys(env["DEBLUR_QUEUE"] + "*") if broker.type(key) == b"list"])
    assert queued_tasks(env) == [] and _counters(windowed) == (5, 2, 2)

    time.sleep(1.2)
    result = CliRunner().invoke(main, ["retry", "--all", "--stalled", "--stalled-after", "1"])
    assert result.exit_code == 0, result.output
    assert f"re-enqueued 2 images of job {windowed}" in result.output  # the batches it had sent, not the held ones
    assert f"re-enqueued 5 images of job {plain}" in result.output
    # the two lost images are relisted as batches 5 and 6; the window (2) goes on with batches 2 and 3
    assert _counters(windowed) == (7, 4, 2)
    assert sum(args[0]["job_id"] == windowed and args[0]["slot"] for _, args in queued_tasks(env)) == 2

    worker = WorkerProcess(service_env(env), tmp_path / "worker.log")
    try:
        worker.wait_ready(app_for(load_settings()))
        assert wait_done(windowed, timeout=120)["counts"]["done"] == 5
        assert wait_done(plain, timeout=120)["counts"]["done"] == 5
    finally:
        worker.stop()
    assert _counters(windowed) == (7, 7, 0)
    no_job = CliRunner().invoke(main, ["retry", "--stalled"])
    assert no_job.exit_code == 2 and "--all" in no_job.output


def test_a_paused_job_sends_no_more_batches_until_it_is_resumed(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Window 2 of 6 one-image batches: paused, the two sent still run and nothing more is sent; resumed, it
    finishes. A job without a window cannot be paused (there is nothing to hold back), and says why."""
    from jobs.celery_app import app_for
    from jobs.settings import load_settings
    from producer.cli import main
    from producer.tracking import job_status

    _bucket(env, "pausing", 6)
    job_id = run_cli("submit", "s3://pausing/in/", "--output", "s3://pausing/out/", "--model", "wiener",
                     "--batch-size", "1", "--window", "2", "-q").strip()
    paused = CliRunner().invoke(main, ["pause", job_id[:8]])
    assert paused.exit_code == 0 and f"paused job {job_id}" in paused.output, paused.output
    assert "was paused already" in CliRunner().invoke(main, ["pause", job_id]).output
    assert "paused:" in run_cli("status", job_id) and "deblur resume" in run_cli("status", job_id)

    worker = WorkerProcess(service_env(env), tmp_path / "worker.log")
    try:
        worker.wait_ready(app_for(load_settings()))
        deadline = time.monotonic() + 60
        while job_status(load_settings(), job_id)["counts"]["done"] < 2 or queued_tasks(env):
            assert time.monotonic() < deadline, job_status(load_settings(), job_id)
            time.sleep(0.2)
        time.sleep(1.0)  # a batch sent by mistake would be taken by now
        info = job_status(load_settings(), job_id)
        assert info["status"] == "paused" and info["counts"]["done"] == 2 and info["counts"]["pending"] == 4, info
        assert _counters(job_id) == (6, 2, 0) and queued_tasks(env) == []

        resumed = CliRunner().invoke(main, ["resume", job_id])
        assert resumed.exit_code == 0 and "2 batches sent" in resumed.output, resumed.output
        assert wait_done(job_id, timeout=120)["counts"]["done"] == 6
    finally:
        worker.stop()
    for action in ("resume", "pause"):  # as the API answers both with 409 (resume once said "not paused", exit 0)
        finished = CliRunner().invoke(main, [action, job_id])
        assert finished.exit_code == 2 and "already finished" in finished.output, (action, finished.output)

    plain = run_cli("submit", "s3://pausing/in/", "--output", "s3://pausing/plain/", "--model", "wiener", "-q").strip()
    refused = CliRunner().invoke(main, ["pause", plain])
    assert refused.exit_code == 2 and "no window" in refused.output and "--window" in refused.output
    assert job_status(load_settings(), plain)["status"] == "queued"


def test_concurrent_claims_never_send_a_batch_twice_nor_exceed_the_window(database_url) -> None:  # type: ignore[no-untyped-def]
    """Eight workers finishing batches at once (threads, each with its own connection) claim every batch exactly
    once, in order, with never more than the window outstanding: the claim is one atomic UPDATE ... RETURNING."""
    import threading

    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import Job

    ensure_schema(database_url)
    with session_scope(database_url) as session:
        job = Job(kind="deblur", spec={"window": 5}, status="running", total=200, batches_listed=200)
        session.add(job)
        session.flush()
        job_id = job.id
    with session_scope(database_url) as session:
        first = queries.claim_window_batches(session, job_id, 5)
    assert first == [0, 1, 2, 3, 4]
    claimed = list(first)
    outstanding = [len(first)]
    peak = [len(first)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(held: list[int]) -> None:
        try:
            while True:
                finished = 0
                if held:
                    held.pop()  # this batch finished: free its slot and take whatever the window allows
                    finished = 1
                    with lock:
                        outstanding[0] -= 1
                with session_scope(database_url) as session:
                    got = queries.claim_window_batches(session, job_id, 5, released=finished)
                with lock:
                    claimed.extend(got)
                    outstanding[0] += len(got)
                    peak[0] = max(peak[0], outstanding[0])
                    everything_claimed = len(claimed) == 200
                held.extend(got)
                if not held and everything_claimed:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    # the first five batches handed to five of eight workers; the other three claim as well, from the start
    threads = [threading.Thread(target=worker, args=([n] if n < 5 else [],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert sorted(claimed) == list(range(200))  # every batch once, none twice
    assert peak[0] <= 5
    with session_scope(database_url) as session:
        job = session.get(Job, job_id)
        assert (job.batches_sent, job.batches_in_flight) == (200, 0)


def test_a_next_batch_the_broker_refuses_is_tried_again_and_the_slot_is_freed_once(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The finished batch stays finished (its task is not run again): its slot was freed once, as it was recorded,
    and the worker tries the next batch again; a broker that never takes it leaves the claim given back, for the
    next batch to finish or 'deblur retry --stalled' to send."""
    import worker.tasks as tasks
    from jobs.celery_app import app_for
    from jobs.messages import BatchMessage, ImageItem
    from jobs.settings import load_settings

    _bucket(env, "refused-next", 3)
    job_id = run_cli("submit", "s3://refused-next/in/", "--output", "s3://refused-next/out/", "--model", "wiener",
                     "--batch-size", "1", "--window", "1", "-q").strip()
    assert _counters(job_id) == (3, 1, 1)
    settings = load_settings()
    app = app_for(settings)
    real_send = app.send_task
    refusals = [2]

    def flaky_send(*args, **kwargs):  # type: ignore[no-untyped-def]
        if refusals[0]:
            refusals[0] -= 1
            raise ConnectionError("broker restarting")
        return real_send(*args, **kwargs)

    monkeypatch.setattr(app, "send_task", flaky_send)
    monkeypatch.setattr(tasks.time, "sleep", lambda _s: None)

    def finish(name: str) -> BatchMessage:
        """Batch ``name`` recorded as done, its slot freed as a worker's recording transaction frees it."""
        from db import queries
        from db.engine import session_scope

        uri = f"s3://refused-next/in/{name}"
        with session_scope(settings.resolved_database_url()) as session:
            queries.mark_running(session, job_id, [uri], "w1")
            queries.record_outcomes(session, job_id, [queries.ImageOutcome(uri, "done")])
            assert queries.free_slots_of_finished_batches(session, job_id, [uri]) == 1
        return BatchMessage(job_id=job_id, kind="deblur", models=["wiener"], slot=True, images=[ImageItem(input=uri)])

    finished = finish("00.png")
    tasks.send_next_batch(finished, settings)  # refused twice, then taken
    assert _counters(job_id) == (3, 2, 1) and len(queued_tasks(env)) == 2
    tasks.send_next_batch(finished, settings)  # the same batch again (delivered twice): it frees no second slot
    assert _counters(job_id) == (3, 2, 1) and len(queued_tasks(env)) == 2

    refusals[0] = 100
    tasks.send_next_batch(finish("01.png"), settings)  # never taken: the claim is given back, the slot stays free
    assert _counters(job_id) == (3, 2, 0) and len(queued_tasks(env)) == 2


def test_failed_images_of_a_windowed_job_are_retried_through_its_window(env) -> None:  # type: ignore[no-untyped-def]
    """'retry --failed' once sent every failed image at once, outside the window (thousands of failures flooded
    the broker past the jobs taking turns), in messages that held no slot a later recount could see. They become
    new batches after the job's last and go out as the window allows."""
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from producer.cli import main

    _bucket(env, "refail", 3)
    job_id = run_cli("submit", "s3://refail/in/", "--output", "s3://refail/out/", "--model", "wiener",
                     "--batch-size", "1", "--window", "1", "-q").strip()
    assert len(queued_tasks(env)) == 1 and _counters(job_id) == (3, 1, 1)
    with session_scope(load_settings().resolved_database_url()) as session:  # every image failed; slots free
        queries.record_outcomes(session, job_id, [queries.ImageOutcome(f"s3://refail/in/{i:02d}.png", "failed",
                                                                       error="corrupt") for i in range(3)])
        queries.release_window_slots(session, job_id, 1)
    retried = CliRunner().invoke(main, ["retry", job_id, "--failed"])
    assert retried.exit_code == 0 and "re-enqueued 3 images" in retried.output, retried.output
    assert len(queued_tasks(env)) == 2  # the first message, and one retried batch: the window is 1
    assert _counters(job_id) == (6, 4, 1)  # batches 3-5 added; 1 and 2 had nothing left and were passed over


def test_a_batch_delivered_twice_at_once_restores_each_image_once_and_frees_one_slot(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Redis hands a batch that outlives its visibility timeout to a second worker while the first still works on
    it. The second once restored the same images again (two uploads of one key, and the checksum recorded could
    be the other upload's) and both freed the batch's window slot, so the job ran one batch over its window for
    good. The second delivery now leaves the images the first holds under its lease, and sends itself again for
    when that lease could have run out; the slot is freed once, by the recording of the batch's last image."""
    import threading

    from jobs.messages import BatchMessage
    from worker import pipeline, tasks

    _bucket(env, "sent-twice", 6)
    job_id = run_cli("submit", "s3://sent-twice/in/", "--output", "s3://sent-twice/out/", "--model", "wiener",
                     "--batch-size", "2", "--window", "2", "-q").strip()
    assert _counters(job_id) == (3, 2, 2)
    first_batch = next(args[0] for _, args in queued_tasks(env) if args[0]["images"][0]["input"].endswith("00.png"))
    monkeypatch.setattr(tasks.runtime, "_state", {})  # the task reads its settings (this test's services) afresh
    in_restore, second_done = threading.Event(), threading.Event()
    real = pipeline.restore_work

    def held_up(work: pipeline.Work, message: BatchMessage, *rest: object) -> None:
        in_restore.set()
        second_done.wait(60)  # the first delivery is still restoring while the second arrives
        real(work, message, *rest)

    monkeypatch.setattr(pipeline, "restore_work", held_up)
    results: list[dict[str, int]] = []
    first = threading.Thread(target=lambda: results.append(tasks.process_batch.apply(args=[first_batch]).get()))
    first.start()
    try:
        assert in_restore.wait(60)
        second = tasks.process_batch.apply(args=[first_batch]).get()
    finally:
        second_done.set()
        first.join(120)
    assert second == {"done": 0, "failed": 0, "handed_over": 2}
    assert results == [{"done": 2, "failed": 0, "handed_over": 0}]
    rows = {r["input"].rsplit("/", 1)[1]: r for r in json.loads(run_cli("results", job_id, "--format", "json"))}
    assert [(rows[n]["status"], rows[n]["attempts"]) for n in ("00.png", "01.png")] == [("done", 1), ("done", 1)]
    # the first freed its slot and sent the third batch; the second freed nothing
    assert _counters(job_id) == (3, 3, 2)
    copies = [args[0] for _, args in queued_tasks(env) if args[0]["images"][0]["input"].endswith("00.png")]
    assert copies == [first_batch] * 2  # the batch as submitted, and the second delivery's copy for later
    assert tasks.process_batch.apply(args=[first_batch]).get() == {"done": 0, "failed": 0, "handed_over": 0}
    assert _counters(job_id) == (3, 3, 2)  # it found the images restored: still two batches in flight
