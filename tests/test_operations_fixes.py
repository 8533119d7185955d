"""Operations that must hold on a real archive, on SQLite and PostgreSQL alike.

Given a database at every migration on the way down (with a job, its image and a metric in it), each step keeps
the rows; a retry resets only what is still as it selected it and starts its clock anew; a retried job's
throughput is its current pace; every JSON timestamp is UTC with its offset whatever the database's zone;
verification pages by id without metrics; CSV pages of one job share their columns; and 'verify --quick' says
which outputs it read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, inspect, select, update

pytestmark = [pytest.mark.integration]


@pytest.fixture
def database(database_url: str, tmp_path, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    """The test's database (SQLite file or the session's PostgreSQL), as this process's settings name it."""
    from db.engine import ensure_schema

    monkeypatch.setenv("DEBLUR_DATABASE_URL", database_url)
    monkeypatch.setenv("DEBLUR_HOME", str(tmp_path / "home"))
    ensure_schema(database_url)
    return database_url


def _job(url: str, inputs: int, created_ago: timedelta = timedelta(0), kind: str = "deblur") -> tuple[str, list[str]]:
    """A queued job of ``inputs`` pending images (created ``created_ago``); returns its id and input URIs."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import Job, utcnow

    ensure_schema(url)
    with session_scope(url) as session:
        job, _ = queries.create_job(session, kind, {"models": ["wiener"], "output": "s3://o/"})
        uris = [f"s3://b/{job.id}/{i}.png" for i in range(inputs)]
        queries.insert_images(session, job.id, [{"input_uri": u, "output_uri": u.replace("s3://b/", "s3://o/")}
                                                for u in uris], 0)
        queries.finish_submission(session, job.id, inputs, "queued")
        session.execute(update(Job).where(Job.id == job.id).values(created_at=utcnow() - created_ago))
        return job.id, uris


# ----------------------------------------------------------------- migrations


def _table_counts(url: str) -> tuple[int, int, int]:
    from db.engine import get_engine
    from db.schema import Image, Job, Metric

    with get_engine(url).connect() as connection:
        jobs, images, metrics = (connection.execute(select(func.count()).select_from(t.__table__)).scalar_one()
                                 for t in (Job, Image, Metric))
    return jobs, images, metrics


def test_every_downgrade_keeps_jobs_images_and_metrics_and_upgrades_back(empty_database_url: str) -> None:
    """On SQLite a batch rebuild of jobs or images drops the old table, and with foreign keys on that deletes the
    images and metrics in cascade: each revision's downgrade must drop its columns in place."""
    from alembic import command
    from sqlalchemy import insert

    from db.engine import alembic_config, current_revision, ensure_schema, get_engine, head_revision, upgrade
    from db.schema import Image, Job, Metric

    url = empty_database_url
    upgrade(url)
    job_id = str(uuid.uuid4())
    with get_engine(url).begin() as connection:  # every column a downgrade drops holds a value
        connection.execute(insert(Job.__table__).values(
            id=job_id, kind="deblur", status="done", spec={}, total=1, batches_listed=1, batches_sent=1,
            batches_in_flight=0))
        image_id = connection.execute(insert(Image.__table__).values(
            job_id=job_id, input_uri="s3://b/a.png", status="done", attempts=1, batch=0, unfinished_starts=0,
            input_sha256="a" * 64, output_sha256="b" * 64, review="judged_sharp", pixels=4, claim="c" * 32,
            lease_until=datetime.now(timezone.utc), sent_at=datetime.now(timezone.utc),
            finished_at=datetime.now(timezone.utc)).returning(Image.__table__.c.id)).scalar_one()
        connection.execute(insert(Metric.__table__).values(image_id=image_id, model="ensemble", name="psnr",
                                                           value=30.0))
    assert _table_counts(url) == (1, 1, 1)
    gone = {"0011": {"sent_at"}, "0008": {"claim", "lease_until"}, "0007": {"pixels"}, "0006": {"review"}, "0004": {"batches_listed", "batches_sent", "batches_in_flight"},
            "0003": {"unfinished_starts"}, "0002": {"input_sha256", "output_sha256"}}
    for revision in ("0011", "0010", "0009", "0008", "0007", "0006", "0005", "0004", "0003", "0002", "0001"):
        with get_engine(url).begin() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
        assert _table_counts(url) == (1, 1, 1), f"rows lost going down to {revision}"
        with get_engine(url).connect() as connection:
            columns = {c["name"] for table in ("jobs", "images") for c in inspect(connection).get_columns(table)}
            indexes = {i["name"] for i in inspect(connection).get_indexes("images")}
            tables = set(inspect(connection).get_table_names())
        assert columns.isdisjoint(gone.get(revision, set())), revision
        assert ("broker_marks" in tables) == (revision >= "0012"), revision
        assert ("ix_images_job_batch" in indexes) == (revision >= "0005")
    ensure_schema.cache_clear()
    ensure_schema(url)  # and forward again, the rows with it
    with get_engine(url).connect() as connection:
        assert connection.execute(select(Image.unfinished_starts, Image.output_sha256)).one() == (0, None)
    assert _table_counts(url) == (1, 1, 1) and current_revision(url) == head_revision()


# --------------------------------------------------------------------- claims


def test_a_run_holds_its_images_until_its_lease_runs_out(database: str) -> None:
    """Two deliveries of one batch: the second takes nothing the first holds under a live lease, and learns when
    that lease runs out; once it has, the second takes the images, and the first (back from a stall) can neither
    start nor record them."""
    from db import queries
    from db.engine import session_scope
    from db.schema import Image, utcnow

    job_id, uris = _job(database, 3)
    with session_scope(database) as session:
        first = queries.claim_images(session, job_id, uris, "w1@host", "a" * 32, lease_s=60)
        assert sorted(first.todo) == sorted(uris) and not first.held
        assert queries.start_image(session, job_id, uris[0], "a" * 32) == 1
    with session_scope(database) as session:
        second = queries.claim_images(session, job_id, uris, "w2@host", "b" * 32, lease_s=60)
    assert second.todo == [] and sorted(second.held) == sorted(uris)
    assert second.held_until is not None and 50 < (second.held_until - utcnow()).total_seconds() <= 60
    with session_scope(database) as session:
        assert queries.renew_leases(session, job_id, "a" * 32, lease_s=60) == 3
        session.execute(update(Image).where(Image.job_id == job_id).values(lease_until=utcnow() - timedelta(1)))
    with session_scope(database) as session:  # the first run's lease ran out: it is taken for lost
        assert sorted(queries.claim_images(session, job_id, uris, "w2@host", "b" * 32).todo) == sorted(uris)
    with session_scope(database) as session:
        assert queries.start_image(session, job_id, uris[1], "a" * 32) is None
        assert queries.record_outcomes(session, job_id, [queries.ImageOutcome(uris[0], "done")], claim="a" * 32) == []
        assert queries.start_image(session, job_id, uris[1], "b" * 32) == 1
        assert queries.record_outcomes(session, job_id, [queries.ImageOutcome(uris[1], "done")],
                                       claim="b" * 32) == [uris[1]]
    with session_scope(database) as session:
        rows = dict(session.execute(select(Image.input_uri, Image.status).where(Image.job_id == job_id)).all())
    assert [rows[u] for u in uris] == ["running", "done", "running"]


def test_a_retried_run_drops_its_leases_so_the_retry_need_not_wait(database: str) -> None:
    from db import queries
    from db.engine import session_scope

    job_id, uris = _job(database, 2)
    with session_scope(database) as session:
        queries.claim_images(session, job_id, uris, "w1@host", "a" * 32)
        queries.drop_leases(session, job_id, "a" * 32)
    # the lease ran out rather than vanished: if the retry never comes (its message could not be sent either), the
    # workers' sweep finds the images once the lease has been out for a lease (here none), instead of never
    time.sleep(0.01)
    with session_scope(database) as session:
        assert job_id in [j for j, _ in queries.jobs_with_abandoned_images(session, 0)]
    with session_scope(database) as session:
        assert sorted(queries.claim_images(session, job_id, uris, "w1@host", "c" * 32).todo) == sorted(uris)


def test_retry_stalled_leaves_an_image_its_worker_still_renews(database: str) -> None:
    """A 40-minute scan is slow, not stalled: 'retry --stalled' once made it pending and sent it again while its
    worker went on. Only a running image whose lease ran out (its worker is gone) is stalled."""
    from db import queries
    from db.engine import session_scope
    from db.schema import Image, utcnow

    job_id, uris = _job(database, 2)
    with session_scope(database) as session:
        queries.claim_images(session, job_id, uris, "w1@host", "a" * 32, lease_s=60)
        session.execute(update(Image).where(Image.job_id == job_id).values(started_at=utcnow() - timedelta(hours=2)))
        session.execute(update(Image).where(Image.input_uri == uris[1]).values(lease_until=utcnow() - timedelta(1)))
    with session_scope(database) as session:
        stalled = queries.images_to_retry(session, job_id, failed=False, stalled_before=utcnow() - timedelta(1 / 24))
        assert [i.input_uri for i in stalled] == [uris[1]]
        assert queries.reset_for_retry(session, job_id, stalled) == {uris[1]}
    with session_scope(database) as session:
        row = session.execute(select(Image.status, Image.claim, Image.lease_until).where(
            Image.input_uri == uris[1])).one()
    assert tuple(row) == ("pending", None, None)


def test_the_lease_must_be_shorter_than_the_visibility_timeout(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from jobs.errors import ConfigurationError
    from jobs.settings import load_settings

    monkeypatch.setenv("DEBLUR_VISIBILITY_TIMEOUT", "60")
    monkeypatch.setenv("DEBLUR_BATCH_TIME_LIMIT", "30")
    with pytest.raises(ConfigurationError, match="DEBLUR_CLAIM_LEASE=90 s must be .* below DEBLUR_VISIBILITY_TIMEOUT"):
        load_settings()
    monkeypatch.setenv("DEBLUR_CLAIM_LEASE", "20")
    assert load_settings().claim_lease == 20


# -------------------------------------------------------------------- retries


def _fail_all(url: str, job_id: str, uris: list[str], ago: timedelta) -> None:
    from db import queries
    from db.engine import session_scope
    from db.schema import Image, utcnow

    with session_scope(url) as session:
        queries.mark_running(session, job_id, uris, "w1")
        queries.record_outcomes(session, job_id, [queries.ImageOutcome(u, "failed", error="x") for u in uris])
        queries.finish_if_complete(session, job_id)
        session.execute(update(Image).where(Image.job_id == job_id)
                        .values(started_at=utcnow() - ago, finished_at=utcnow() - ago))


def test_a_retried_image_waits_from_the_retry_and_one_finished_meanwhile_keeps_its_outcome(database: str) -> None:
    from db import queries
    from db.engine import session_scope
    from db.schema import Image, utcnow

    url = database
    job_id, uris = _job(url, 3, created_ago=timedelta(days=2))
    _fail_all(url, job_id, uris, timedelta(days=1))
    with session_scope(url) as session:
        selected = queries.images_to_retry(session, job_id, True, None)
        assert [i.input_uri for i in selected] == uris
        with session_scope(url) as worker:  # a worker records an outcome between the selection and the reset
            queries.record_outcomes(worker, job_id, [queries.ImageOutcome(uris[0], "done", output_uri="s3://o/0")])
        reset = queries.reset_for_retry(session, job_id, selected)
    assert reset == set(uris[1:])
    with session_scope(url) as session:
        rows = {i.input_uri: i for i in session.scalars(select(Image).where(Image.job_id == job_id))}
        assert rows[uris[0]].status == "done" and rows[uris[0]].output_uri == "s3://o/0"
        for uri in uris[1:]:
            assert rows[uri].status == "pending" and rows[uri].finished_at is None
            assert abs((queries.as_utc(rows[uri].started_at) - utcnow()).total_seconds()) < 60
        assert queries.job_status_of(session, job_id) == "queued"
        # a 'retry --all --stalled' an hour's threshold later does not send them again
        assert queries.images_to_retry(session, job_id, False, utcnow() - timedelta(seconds=3600)) == []
        # nothing left as selected: nothing reset, and the job is not made queued for images no one will send
        session.execute(update(Image).where(Image.job_id == job_id).values(status="done"))
        queries.set_job_state(session, job_id, status="done")
        assert queries.reset_for_retry(session, job_id, selected) == set()
        assert queries.job_status_of(session, job_id) == "done"


def test_retry_sends_only_the_images_it_reset(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from producer.retry import retry_images
    from tests.e2e_helpers import queued_tasks

    url = load_settings().resolved_database_url()
    job_id, uris = _job(url, 3, created_ago=timedelta(hours=2))
    _fail_all(url, job_id, uris, timedelta(hours=1))
    select_images = queries.images_to_retry

    def finished_meanwhile(session, *args):  # type: ignore[no-untyped-def]
        selected = select_images(session, *args)
        with session_scope(url) as worker:
            queries.record_outcomes(worker, job_id, [queries.ImageOutcome(uris[1], "done", output_uri="s3://o/1")])
        return selected

    monkeypatch.setattr(queries, "images_to_retry", finished_meanwhile)
    assert retry_images(load_settings(), job_id, failed=True, stalled_after=None) == 2
    sent = [image["input"] for _, args in queued_tasks(env) for image in args[0]["images"]]
    assert sorted(sent) == [uris[0], uris[2]]


# ----------------------------------------------------------------- throughput


def test_a_retried_jobs_throughput_and_eta_are_its_current_pace(database: str) -> None:
    from db import queries
    from db.engine import session_scope
    from db.schema import Image, Job, utcnow
    from jobs.settings import load_settings
    from producer.tracking import job_status

    url = database
    job_id, uris = _job(url, 100, created_ago=timedelta(days=2))
    now = utcnow()
    with session_scope(url) as session:  # 90 done and 10 failed a day ago, in 100 s
        queries.mark_running(session, job_id, uris, "w1")
        queries.record_outcomes(session, job_id, [queries.ImageOutcome(u, "done" if i < 90 else "failed")
                                                  for i, u in enumerate(uris)])
        queries.finish_if_complete(session, job_id)
        for i, uri in enumerate(uris):
            moment = now - timedelta(days=1, seconds=100 - i)
            session.execute(update(Image).where(Image.job_id == job_id, Image.input_uri == uri)
                            .values(started_at=moment - timedelta(seconds=1), finished_at=moment))
        session.execute(update(Job).where(Job.id == job_id).values(
            started_at=now - timedelta(days=1, seconds=101), finished_at=now - timedelta(days=1)))
    finished = job_status(load_settings(), job_id)
    assert finished["images_per_s"] == pytest.approx(1.0, rel=0.05) and finished["eta_s"] == 0.0  # its last pace

    with session_scope(url) as session:
        queries.reset_for_retry(session, job_id, queries.images_to_retry(session, job_id, True, None))
    retried = job_status(load_settings(), job_id)
    assert retried["status"] == "queued" and retried["images_per_s"] is None and retried["eta_s"] is None

    with session_scope(url) as session:  # 5 of the 10 done again within the last minute: 1 every 10 s
        queries.mark_running(session, job_id, uris[90:], "w2")
        queries.record_outcomes(session, job_id, [queries.ImageOutcome(u, "done") for u in uris[90:95]])
        for i, uri in enumerate(uris[90:95]):
            session.execute(update(Image).where(Image.job_id == job_id, Image.input_uri == uri).values(
                started_at=now - timedelta(seconds=60 - 10 * i), finished_at=now - timedelta(seconds=50 - 10 * i)))
    info = job_status(load_settings(), job_id)
    assert info["status"] == "running" and info["finished"] == 95
    assert 0.07 < info["images_per_s"] < 0.1  # 5 in the minute since the first retried image started
    assert 50 < info["eta_s"] < 75  # 5 left at that pace (the job's whole run would say 95 in a day: 1.3 h)


# ----------------------------------------------------------------- timestamps


def _assert_utc(text: str | None) -> None:
    assert text is not None and text.endswith("+00:00"), text
    assert datetime.fromisoformat(text).utcoffset() == timedelta(0)


def test_every_json_timestamp_is_utc_with_an_offset(database: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from db import queries
    from db.engine import ensure_schema, get_engine, session_scope
    from db.ensembles import list_ensembles, save_ensemble
    from jobs.settings import load_settings
    from producer.tracking import fetch_results, job_status, list_jobs

    url = database
    if url.startswith("postgresql"):
        # a session in another zone: PostgreSQL hands back its times in that zone
        url += "?options=-c%20timezone%3DAsia%2FTokyo"
        with get_engine(url).connect() as connection:
            assert connection.exec_driver_sql("SHOW timezone").scalar() == "Asia/Tokyo"
        ensure_schema(url)
        monkeypatch.setenv("DEBLUR_DATABASE_URL", url)
    job_id, uris = _job(url, 1, kind="evaluate")
    with session_scope(url) as session:
        queries.mark_running(session, job_id, uris, "w1")
        queries.record_outcomes(session, job_id, [queries.ImageOutcome(uris[0], "done")])
        queries.finish_if_complete(session, job_id)
        name = f"utc-{uuid.uuid4().hex[:8]}"
        save_ensemble(session, name, ["wiener:1.0"], source_job_id=job_id, psnr_fitted=None, psnr_equal=None,
                      images=1)
    settings = load_settings()
    info = job_status(settings, job_id)
    for key in ("created_at", "started_at", "finished_at"):
        _assert_utc(info[key])
    _assert_utc(next(j for j in list_jobs(settings, limit=100) if j["id"] == job_id)["created_at"])
    [row] = fetch_results(settings, job_id)
    _assert_utc(row["started_at"])
    _assert_utc(row["finished_at"])
    with session_scope(url) as session:
        _assert_utc(next(e for e in list_ensembles(session) if e.name == name).to_dict()["created_at"])
    tokyo = datetime(2026, 12, 7, 19, 0, tzinfo=timezone(timedelta(hours=9)))
    assert queries.iso_utc(tokyo) == "2026-12-07T10:00:00+00:00"
    assert queries.iso_utc(datetime(2026, 12, 7, 10, 0)) == "2026-12-07T10:00:00+00:00"  # SQLite's naive UTC
    assert queries.iso_utc(None) is None


# ---------------------------------------------------------------- verification


def test_verify_pages_by_id_without_metrics_while_images_change(  # type: ignore[no-untyped-def]
        database: str, monkeypatch) -> None:
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from producer import verify

    url = database
    job_id, uris = _job(url, 5)
    with session_scope(url) as session:
        queries.mark_running(session, job_id, uris, "w1")
        queries.record_outcomes(session, job_id, [queries.ImageOutcome(u, "done", output_uri=u + ".out",
                                                                       metrics=[("ensemble", "psnr", 30.0)])
                                                  for u in uris])
    monkeypatch.setattr(verify, "PAGE", 2)
    seen: list[str] = []
    for page in verify._done_pages(load_settings(), job_id):
        assert all(row["metrics_by_model"] == {} and row["metrics"] == {} for row in page)  # not read
        seen += [row["input"] for row in page]
        if len(seen) == 2:  # an image of the first page is no longer done: an offset would now skip the third
            with session_scope(url) as session:
                queries.mark_image_failed(session, job_id, uris[0], "verify: gone")
    assert seen == uris
    with session_scope(url) as session:  # the default still reads them
        assert queries.image_rows(session, job_id, status="done", limit=1)[0]["metrics"] == {"psnr": 30.0}


def test_quick_verify_says_which_outputs_were_only_found_present(env) -> None:  # type: ignore[no-untyped-def]
    import boto3

    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from producer.cli import main

    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = f"quick-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    url = load_settings().resolved_database_url()
    job_id, uris = _job(url, 3)
    body = b"restored bytes"
    digest = hashlib.sha256(body).hexdigest()
    outputs = [f"s3://{bucket}/out/{i}.png" for i in range(3)]
    s3.put_object(Bucket=bucket, Key="out/0.png", Body=body, ChecksumAlgorithm="SHA256")  # the store keeps it
    s3.put_object(Bucket=bucket, Key="out/1.png", Body=body)  # no checksum kept: read back
    s3.put_object(Bucket=bucket, Key="out/2.png", Body=body)  # written before checksums were recorded
    with session_scope(url) as session:
        queries.mark_running(session, job_id, uris, "w1")
        queries.record_outcomes(session, job_id, [
            queries.ImageOutcome(uri, "done", output_uri=output, output_sha256=digest if i < 2 else None)
            for i, (uri, output) in enumerate(zip(uris, outputs, strict=True))])
    result = CliRunner().invoke(main, ["verify", job_id, "--quick"])
    message = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "3 outputs checked, 2 intact, 0 missing, 0 changed, 1 present but written before checksums" in message
    assert ("1 compared by the checksum the store keeps, 1 read back in full (no checksum kept), 1 only found "
            "present (no checksum recorded to compare with)") in message


# ------------------------------------------------------------------------ CSV


def test_csv_pages_of_a_job_share_sorted_metric_columns(database: str) -> None:
    from db import queries
    from db.engine import session_scope
    from producer.cli import main
    from producer.tracking import _fmt

    url = database
    job_id, uris = _job(url, 2)
    with session_scope(url) as session:
        queries.mark_running(session, job_id, uris, "w1")
        queries.record_outcomes(session, job_id, [
            queries.ImageOutcome(uris[0], "done", metrics=[("ensemble", "ssim", 0.5), ("input", "psnr", 20.0)]),
            queries.ImageOutcome(uris[1], "done", metrics=[
                ("ensemble", "psnr", float("-inf")), ("ensemble", "blur_effect", 0.25), ("wiener", "psnr", 1.0)]),
        ])

    def page(offset: int) -> list[dict[str, Any]]:
        result = CliRunner().invoke(main, ["results", job_id, "--format", "csv", "--limit", "1", "--offset",
                                           str(offset)])
        assert result.exit_code == 0, result.output
        return list(csv.DictReader(io.StringIO(result.stdout)))

    first, second = page(0), page(1)
    header = ["input", "output", "status", "error", "width", "height", "inference_s", "blur_effect", "input_psnr",
              "psnr", "ssim", "review"]
    assert list(first[0]) == list(second[0]) == header
    assert (first[0]["ssim"], first[0]["input_psnr"], first[0]["psnr"]) == ("0.5000", "20.0000", "")
    assert (second[0]["psnr"], second[0]["blur_effect"], second[0]["ssim"]) == ("-inf", "0.2500", "")
    assert (_fmt(float("inf")), _fmt(float("-inf"))) == ("inf", "-inf")
