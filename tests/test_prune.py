"""``deblur db prune``: finished jobs past the retention period go with their rows; nothing else does.

Runs against the session's real databases (SQLite and PostgreSQL), with jobs in every state.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

pytestmark = [pytest.mark.integration]


def _job(session, status: str, finished_days_ago: float | None, images: int = 3) -> str:  # type: ignore[no-untyped-def]
    from db.schema import Image, Job, Metric, utcnow

    now = utcnow()
    job = Job(id=str(uuid.uuid4()), kind="deblur", spec={}, status=status, total=images,
              finished_at=None if finished_days_ago is None else now - timedelta(days=finished_days_ago))
    session.add(job)
    session.flush()
    for index in range(images):
        image = Image(job_id=job.id, input_uri=f"s3://b/in/{job.id}/{index}.png", status="done")
        session.add(image)
        session.flush()
        session.add_all(Metric(image_id=image.id, model=model, name="psnr", value=30.0)
                        for model in ("input", "ensemble"))
    return job.id


def _counts(url: str, job_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Per job: (image rows, metric rows); a job whose row is gone is left out."""
    from db.engine import session_scope
    from db.schema import Image, Job, Metric

    found = {}
    with session_scope(url) as session:
        for job_id in job_ids:
            if session.get(Job, job_id) is None:
                continue
            images = session.scalar(select(func.count()).select_from(Image).where(Image.job_id == job_id))
            metrics = session.scalar(select(func.count()).select_from(Metric).join(Image)
                                     .where(Image.job_id == job_id))
            found[job_id] = (int(images or 0), int(metrics or 0))
    return found


def test_prune_deletes_old_finished_jobs_with_their_rows_and_keeps_the_rest(  # type: ignore[no-untyped-def]
        env) -> None:
    from db.engine import ensure_schema, session_scope
    from db.ensembles import get_ensemble, save_ensemble
    from jobs.settings import load_settings
    from producer.cli import main

    url = load_settings().resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        old = {status: _job(session, status, 120) for status in ("done", "failed", "cancelled")}
        recent = _job(session, "done", 10)
        running = _job(session, "running", None)
        stuck = _job(session, "submitting", None)
        name = f"fitted-{uuid.uuid4().hex[:8]}"
        save_ensemble(session, name, ["wiener:1.0"], source_job_id=old["done"], psnr_fitted=30.0,
                      psnr_equal=29.0, images=3)
    every = [*old.values(), recent, running, stuck]
    before = _counts(url, every)

    dry = CliRunner().invoke(main, ["db", "prune", "--older-than", "90", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would delete" in dry.output and _counts(url, every) == before  # the shared database may hold more jobs

    declined = CliRunner().invoke(main, ["db", "prune", "--older-than", "90"], input="n\n")
    assert declined.exit_code != 0 and "Aborted" in declined.output and _counts(url, every) == before

    result = CliRunner().invoke(main, ["db", "prune", "--older-than", "90", "--yes"])
    assert result.exit_code == 0, result.output
    assert "storage untouched" in result.output
    assert _counts(url, every) == {recent: (3, 6), running: (3, 6), stuck: (3, 6)}
    with session_scope(url) as session:
        fitted = get_ensemble(session, name)
        assert fitted.members == ["wiener:1.0"] and fitted.source_job_id is None  # the weights outlive the job

    again = CliRunner().invoke(main, ["db", "prune", "--older-than", "90", "--yes"])
    assert again.exit_code == 0 and recent not in again.output


def test_a_job_retried_after_the_listing_is_kept(env) -> None:  # type: ignore[no-untyped-def]
    from db import queries
    from db.engine import ensure_schema, session_scope
    from jobs.settings import load_settings
    from producer.prune import cutoff_for

    url = load_settings().resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        job_id = _job(session, "failed", 400)
    before = cutoff_for(365)
    with session_scope(url) as session:
        assert job_id in dict(queries.prunable_jobs(session, before))
    with session_scope(url) as session:  # 'deblur retry' between the listing and the delete
        queries.set_job_state(session, job_id, status="queued", finished_at=None)
    with session_scope(url) as session:
        assert queries.delete_finished_job(session, job_id, before) is None
    assert _counts(url, [job_id]) == {job_id: (3, 6)}
    with pytest.raises(ValueError, match="cannot be negative"):
        cutoff_for(-1)


def test_a_finished_job_is_kept_while_images_of_it_are_pending_or_running(env) -> None:  # type: ignore[no-untyped-def]
    """A cancelled job's running image still finishes, and a job failed as an abandoned submission still has the
    images it enqueued restored: neither job goes until they have an outcome."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import Image
    from jobs.settings import load_settings
    from producer.cli import main

    url = load_settings().resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        cancelled = _job(session, "cancelled", 120)
        abandoned = _job(session, "failed", 120)
    with session_scope(url) as session:
        session.query(Image).filter(Image.job_id == cancelled, Image.input_uri.endswith("/0.png")).update(
            {"status": "running"}, synchronize_session=False)
        session.query(Image).filter(Image.job_id == abandoned).update({"status": "pending"},
                                                                      synchronize_session=False)
    every = [cancelled, abandoned]
    result = CliRunner().invoke(main, ["db", "prune", "--older-than", "90", "--yes"])
    assert result.exit_code == 0, result.output
    assert _counts(url, every) == {cancelled: (3, 6), abandoned: (3, 6)}
    said = " ".join(result.output.split())
    # (at least these two: the PostgreSQL database is shared by the session's tests)
    assert re.search(r"kept \d+ finished jobs with images still pending or running", said) and cancelled in said
    assert "deblur retry JOB --stalled" in said

    with session_scope(url) as session:  # their images reach an outcome: both may go now
        queries.record_outcomes(session, cancelled, [queries.ImageOutcome(f"s3://b/in/{cancelled}/0.png", "done")])
        queries.record_outcomes(session, abandoned, [queries.ImageOutcome(f"s3://b/in/{abandoned}/{i}.png", "done")
                                                     for i in range(3)])
    result = CliRunner().invoke(main, ["db", "prune", "--older-than", "90", "--yes"])
    assert result.exit_code == 0, result.output
    assert _counts(url, every) == {}


@pytest.mark.parametrize("days", ["0", "-1", "-0.5"])
def test_a_retention_of_zero_or_less_is_refused_before_anything_is_read(days: str) -> None:
    from producer.cli import main

    result = CliRunner().invoke(main, ["db", "prune", "--older-than", days, "--yes"])
    assert result.exit_code == 2
    assert "cannot be negative or zero" in result.output and "--older-than 90" in result.output
