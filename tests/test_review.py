"""Images to review: done, but returned as they came by the blind model.

Given images recorded with the metrics ``l0-blind`` reports (an estimate that
fell back, no blur detected, a negligible kernel, a real restoration), when a
job's results, status and counts are read, then exactly the images returned
as they came are flagged, with the reason, on SQLite and PostgreSQL; rows
recorded before the flag existed are flagged by the migration; and a real
worker running ``l0-blind`` flags a thumbnail it cannot restore.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid

import pytest
from click.testing import CliRunner

from jobs.review import JUDGED_SHARP, NOT_RESTORED, review_reason

L0 = "l0-blind"
RESTORED = [(L0, "blur_detected", 1.0), (L0, "kernel_fallback", 0.0), (L0, "kernel_size", 17.0)]
FELL_BACK = [(L0, "blur_detected", 1.0), (L0, "kernel_fallback", 1.0), (L0, "kernel_size", 9.0)]
NO_BLUR = [(L0, "blur_detected", 0.0), (L0, "kernel_fallback", 0.0), (L0, "kernel_size", 1.0)]
TINY_KERNEL = [(L0, "blur_detected", 1.0), (L0, "kernel_fallback", 0.0), (L0, "kernel_size", 2.0)]
# a refiner passes its prior's metrics on under its own key: one flag, not two
REFINED_FELL_BACK = [*FELL_BACK, *(("seed002-refine", name, value) for _, name, value in FELL_BACK)]


WIENER = [("wiener", "laplacian_variance", 3.0)]
OTHER_L0 = "l0-blind:kernel=15"
SHARED_ROWS = [("input", "laplacian_variance", 1.0), ("ensemble", "disagreement", 0.0)]


@pytest.mark.parametrize("metrics, expected", [
    (RESTORED, None), (FELL_BACK, NOT_RESTORED), (NO_BLUR, JUDGED_SHARP), (TINY_KERNEL, JUDGED_SHARP),
    (REFINED_FELL_BACK, NOT_RESTORED), (WIENER, None), ([], None),
    ([(L0, "kernel_fallback", None), (L0, "blur_detected", None)], None),
    ([*FELL_BACK, *SHARED_ROWS], NOT_RESTORED),  # the input's and the ensemble's rows are no member's
    ([*FELL_BACK, *WIENER], None),  # another kind of member restored it its own way
    ([*FELL_BACK, *((OTHER_L0, n, v) for _, n, v in RESTORED)], None),  # one blind member restored it
    ([*FELL_BACK, *((OTHER_L0, n, v) for _, n, v in NO_BLUR)], NOT_RESTORED),  # none did; one estimate fell back
])
def test_review_reason(metrics, expected) -> None:  # type: ignore[no-untyped-def]
    assert review_reason(metrics) == expected


def test_the_negligible_kernel_size_is_the_models() -> None:
    from jobs.review import NO_BLUR_EXTENT
    from models.l0_blind import NO_BLUR_EXTENT as MODELS

    assert NO_BLUR_EXTENT == MODELS


def _record(url: str, metrics_by_name: dict[str, list]) -> str:  # type: ignore[type-arg]
    """A running job with one done image per entry (named by its key) and one failed image."""
    from db import queries
    from db.engine import ensure_schema, session_scope

    ensure_schema(url)
    with session_scope(url) as session:
        job, _ = queries.create_job(session, "deblur", {"models": [L0], "labels": {}}, None)
        job_id = job.id
        names = [*metrics_by_name, "broken"]
        queries.insert_images(session, job_id, [{"input_uri": f"s3://b/in/{n}.png",
                                                 "output_uri": f"s3://b/out/{n}.png"} for n in names], batch=0)
        queries.set_job_state(session, job_id, status="running", total=len(names))
    with session_scope(url) as session:
        outcomes = [queries.ImageOutcome(input_uri=f"s3://b/in/{n}.png", status="done", output_uri=f"s3://b/out/{n}.png",
                                         width=64, height=48, metrics=list(m)) for n, m in metrics_by_name.items()]
        outcomes.append(queries.ImageOutcome(input_uri="s3://b/in/broken.png", status="failed", error="not an image",
                                             metrics=list(FELL_BACK)))
        queries.record_outcomes(session, job_id, outcomes)
    return job_id


def test_flags_are_recorded_listed_counted_and_cleared(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from producer.cli import main
    from producer.tracking import fetch_results, job_status

    settings = load_settings()
    url = settings.resolved_database_url()
    job_id = _record(url, {"restored": RESTORED, "fell-back": FELL_BACK, "refined": REFINED_FELL_BACK,
                           "sharp": NO_BLUR, "tiny": TINY_KERNEL})

    info = job_status(settings, job_id)
    assert info["review"] == {NOT_RESTORED: 2, JUDGED_SHARP: 2}  # the failed image is not counted
    flagged = fetch_results(settings, job_id, review=True)
    assert {r["input"].rsplit("/", 1)[1]: r["review"] for r in flagged} == {
        "fell-back.png": NOT_RESTORED, "refined.png": NOT_RESTORED, "sharp.png": JUDGED_SHARP,
        "tiny.png": JUDGED_SHARP}
    every = {r["input"].rsplit("/", 1)[1]: r["review"] for r in fetch_results(settings, job_id)}
    assert every["restored.png"] is None and every["broken.png"] is None

    runner = CliRunner()
    status = runner.invoke(main, ["status", job_id])
    assert status.exit_code == 0, status.output
    assert "to review: 2 blurred but not restored" in status.output and "2 judged sharp" in status.output
    assert f"deblur results {job_id[:8]} --review" in status.output
    table = runner.invoke(main, ["results", job_id, "--review"])
    assert table.exit_code == 0 and "not_restored" in table.output and "restored.png" not in table.output
    rows = list(csv.DictReader(io.StringIO(runner.invoke(main, ["results", job_id, "--review", "--format",
                                                                "csv"]).stdout)))
    assert sorted(r["input"] for r in rows) == [f"s3://b/in/{n}.png" for n in ("fell-back", "refined", "sharp", "tiny")]
    assert {r["review"] for r in rows} == {NOT_RESTORED, JUDGED_SHARP}
    # the inputs alone are a manifest for a second pass: one URI a line, nothing a manifest would misread
    manifest = runner.invoke(main, ["results", job_id, "--review", "--format", "uris"]).stdout.splitlines()
    assert sorted(manifest) == sorted(r["input"] for r in rows)
    both = runner.invoke(main, ["results", job_id, "--review", "--failed"])
    assert both.exit_code == 2 and "give one of them" in both.output

    # so does the job's report (its notes, and the JSON's review counts)
    from db.engine import session_scope as scope
    from producer.report import build_table

    with scope(url) as session:
        table = build_table(session, job_id)
    assert table.review == {NOT_RESTORED: 2, JUDGED_SHARP: 2}
    assert any("2 images blurred but not restored" in note and "--review" in note for note in table.notes)
    assert table.to_dict()["review"] == table.review

    # the HTTP API gives the same
    import httpx

    from tests.e2e_helpers import serving_api

    with serving_api(env, tmp_path / "api.log") as api, httpx.Client(base_url=api, timeout=60) as http:
        assert http.get(f"/v1/jobs/{job_id}").json()["review"] == {NOT_RESTORED: 2, JUDGED_SHARP: 2}
        page = http.get(f"/v1/jobs/{job_id}/images", params={"review": "true", "limit": 3}).json()
        assert page["total"] == 4 and page["next_offset"] == 3 and len(page["items"]) == 3
        assert {i["review"] for i in page["items"]} <= {NOT_RESTORED, JUDGED_SHARP}
        assert http.get(f"/v1/jobs/{job_id}/images", params={"review": "true", "status": "failed"}).json()[
            "total"] == 0

    # 'deblur verify --mark-failed' turns a done image into a failed one: it is no longer one to review
    with session_scope(url) as session:
        queries.mark_image_failed(session, job_id, "s3://b/in/sharp.png", "output missing")
    assert job_status(settings, job_id)["review"] == {NOT_RESTORED: 2, JUDGED_SHARP: 1}
    # a retried image is recorded anew: restored this time, its flag goes
    with session_scope(url) as session:
        queries.record_outcomes(session, job_id, [queries.ImageOutcome(
            input_uri="s3://b/in/fell-back.png", status="done", output_uri="s3://b/out/fell-back.png",
            metrics=list(RESTORED))])
    assert job_status(settings, job_id)["review"] == {NOT_RESTORED: 1, JUDGED_SHARP: 1}


def test_the_migration_flags_images_recorded_before_it(empty_database_url: str) -> None:
    from sqlalchemy import insert, select

    from db.engine import ensure_schema, get_engine, upgrade
    from db.schema import Image, Job, Metric

    url = empty_database_url
    upgrade(url, "0006")
    job_id = str(uuid.uuid4())
    engine = get_engine(url)
    with engine.begin() as connection:
        connection.execute(insert(Job.__table__).values(id=job_id, kind="deblur", status="done", spec={}, total=5))
        for name, status, metrics in (("a", "done", FELL_BACK), ("b", "done", NO_BLUR), ("c", "done", RESTORED),
                                      ("d", "failed", FELL_BACK), ("e", "done", [*FELL_BACK, *WIENER])):
            image_id = connection.execute(insert(Image.__table__).values(
                job_id=job_id, input_uri=f"s3://b/{name}.png", status=status, attempts=1, batch=0,
                unfinished_starts=0).returning(Image.__table__.c.id)).scalar_one()
            connection.execute(insert(Metric.__table__), [
                {"image_id": image_id, "model": model, "name": metric, "value": value}
                for model, metric, value in metrics])
    ensure_schema(url)
    with engine.connect() as connection:
        flags = dict(connection.execute(select(Image.input_uri, Image.review).where(Image.job_id == job_id)).all())
    assert flags == {"s3://b/a.png": NOT_RESTORED, "s3://b/b.png": JUDGED_SHARP, "s3://b/c.png": None,
                     "s3://b/d.png": None, "s3://b/e.png": None}

    # going back takes the columns away and nothing else (a table rebuild on SQLite would empty metrics)
    from alembic import command
    from sqlalchemy import func, inspect

    from db.engine import alembic_config

    with engine.connect() as connection:
        metric_rows = connection.execute(select(func.count()).select_from(Metric.__table__)).scalar_one()
    with engine.begin() as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.downgrade(config, "0006")
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(Metric.__table__)).scalar_one() == metric_rows
        assert {"review", "pixels"}.isdisjoint(c["name"] for c in inspect(connection).get_columns("images"))
    ensure_schema.cache_clear()
    ensure_schema(url)  # and forward again


def test_a_real_worker_flags_what_l0_blind_returns_as_it_came(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 12-px thumbnail is too small to estimate a kernel from: l0-blind returns it unchanged, and says so."""
    import boto3
    import numpy as np
    from PIL import Image

    from jobs.celery_app import app_for
    from jobs.settings import load_settings
    from producer.tracking import fetch_results, job_status
    from producer.cli import main
    from tests.e2e_helpers import WorkerProcess, service_env

    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = f"review-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(0)
    thumbnail = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), np.uint8)).save(thumbnail, format="PNG")
    s3.put_object(Bucket=bucket, Key="in/thumb.png", Body=thumbnail.getvalue())
    settings = load_settings()
    worker = WorkerProcess(service_env(env), tmp_path / "worker.log")
    try:
        worker.wait_ready(app_for(settings))
        submitted = CliRunner().invoke(main, [
            "submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--model", L0, "-q"])
        assert submitted.exit_code == 0, submitted.output
        job_id = submitted.stdout.strip()
        deadline = time.monotonic() + 120
        while (info := job_status(settings, job_id))["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, info
            time.sleep(0.5)
    finally:
        worker.stop()
    assert info["status"] == "done" and info["review"] == {NOT_RESTORED: 0, JUDGED_SHARP: 1}
    [row] = fetch_results(settings, job_id, review=True)
    assert row["review"] == JUDGED_SHARP and row["metrics_by_model"][L0]["blur_detected"] == 0
    assert json.loads(json.dumps(info))["review"][JUDGED_SHARP] == 1  # as notifications and the API send it
