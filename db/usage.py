"""What the workers' time went to: finished images counted per job, UTC day, device and worker.

Two sources make one history. The images still recorded are read live, by
their finish time (``ix_images_finished_at``), so a period's figures are exact to
the second. ``deblur db prune`` deletes old jobs' images, so before it does it
writes their totals per day, device and worker to ``usage_rollups``, in the
same transaction; those count by whole UTC days. Every attempt counts, in the
period it finished: an outcome that a retry or ``deblur verify`` replaces on the
image's row is kept first in ``earlier_attempts`` (:func:`keep_earlier_outcomes`),
so a failed attempt's seconds stay with the day they were spent, and an output
found missing months later leaves that month's figures as they were. A
cancelled image that never ran counts nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Date, case, cast, func, insert, literal_column, select, union_all
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from db.schema import EarlierAttempt, Image, Job, UsageRollup

COUNTED_STATUSES = ("done", "failed")
# an image's pixels, every page's (images.pixels), or width × height for rows recorded before that column; 64-bit
IMAGE_PIXELS = func.coalesce(Image.pixels, cast(Image.width, BigInteger) * Image.height)


@dataclass(frozen=True)
class UsageRecord:
    """One job's finished images on one UTC day on one device of one worker, with the seconds they took."""

    day: date
    job_id: str
    kind: str
    labels: dict[str, str]
    models: str
    device: str | None
    worker: str | None
    done: int
    failed: int
    megapixels: float
    download_s: float
    inference_s: float
    upload_s: float


def models_text(spec: Mapping[str, Any] | None) -> str:
    """A job's models as one text, e.g. ``l0-blind:1 + seed001-refine:1``; a saved ensemble is named too."""
    spec = spec or {}
    models = " + ".join(str(m) for m in spec.get("models") or ())
    ensemble = spec.get("ensemble")
    return f"{ensemble} ({models})" if ensemble else models


_ATTEMPT_COLUMNS = ("job_id", "status", "finished_at", "device", "worker", "download_s", "inference_s", "upload_s")


def _current_outcomes(*where: Any, extra: tuple[Any, ...] = ()) -> Any:
    """The images' current outcomes (done or failed, with a finish time) meeting ``where``: the columns usage reads,
    the pixels, then ``extra``. One definition for what a retry keeps and what usage counts, so they cannot part."""
    return (select(*(getattr(Image, c) for c in _ATTEMPT_COLUMNS), IMAGE_PIXELS.label("pixels"), *extra)
            .where(Image.status.in_(COUNTED_STATUSES), Image.finished_at.is_not(None), *where))


def keep_earlier_outcomes(session: Session, image_ids: Any) -> None:
    """Copy the outcomes of the images ``image_ids`` selects (a list or a subquery of ``images.id``) that have one
    (done or failed, with a finish time) to ``earlier_attempts``, before a retry, a new record or ``deblur
    verify`` replaces them on the image's row, so usage still counts them where they happened."""
    kept = _current_outcomes(Image.id.in_(image_ids), extra=(Image.id, Image.error))
    session.execute(insert(EarlierAttempt).from_select([*_ATTEMPT_COLUMNS, "pixels", "image_id", "error"], kept))


def _utc_day(session: Session, finished_at: Any) -> ColumnElement[Any]:
    """The UTC calendar day an attempt finished on, in the session's dialect."""
    if session.get_bind().dialect.name == "postgresql":
        # a literal, not a bound parameter, so GROUP BY repeats the very expression the SELECT has
        return cast(func.timezone(literal_column("'UTC'"), finished_at), Date)
    return func.date(finished_at)  # SQLite keeps UTC times as text: the day is their first ten characters


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def _sums(attempts: Any) -> list[ColumnElement[Any]]:
    done = attempts.c.status == "done"
    return [
        func.sum(case((done, 1), else_=0)),
        func.sum(case((attempts.c.status == "failed", 1), else_=0)),
        func.sum(case((done, attempts.c.pixels), else_=0)),
        func.coalesce(func.sum(attempts.c.download_s), 0.0),
        func.coalesce(func.sum(attempts.c.inference_s), 0.0),
        func.coalesce(func.sum(attempts.c.upload_s), 0.0),
    ]


def _record(day: Any, row: Any, job_id: str, kind: str, labels: Mapping[str, str] | None,
            models: str) -> UsageRecord:
    device, worker, done, failed, pixels, download, inference, upload = row
    return UsageRecord(
        day=_as_date(day), job_id=job_id, kind=kind, labels=dict(labels or {}), models=models, device=device,
        worker=worker, done=int(done or 0), failed=int(failed or 0), megapixels=float(pixels or 0) / 1e6,
        download_s=float(download or 0.0), inference_s=float(inference or 0.0), upload_s=float(upload or 0.0),
    )


def recorded_usage(session: Session, since: datetime, until: datetime, kind: str | None = None,
                   labels: Mapping[str, str] | None = None) -> list[UsageRecord]:
    """The attempts of jobs still recorded that finished in ``[since, until)`` (:func:`_attempts`), summed per
    job, UTC day, device and worker.

    Only jobs of ``kind`` and carrying every one of ``labels`` count, when given.
    """
    attempts = _attempts([Image.finished_at >= since, Image.finished_at < until],
                         [EarlierAttempt.finished_at >= since, EarlierAttempt.finished_at < until])
    day = _utc_day(session, attempts.c.finished_at)
    query = (
        select(attempts.c.job_id, day, attempts.c.device, attempts.c.worker, *_sums(attempts))
        .join(Job, Job.id == attempts.c.job_id)
        .group_by(attempts.c.job_id, day, attempts.c.device, attempts.c.worker)
    )
    if kind is not None:
        query = query.where(Job.kind == kind)
    for key, value in (labels or {}).items():
        query = query.where(Job.spec["labels"][key].as_string() == value)
    rows = session.execute(query).all()
    jobs = _jobs(session, {row[0] for row in rows})
    records = []
    for job_id, row_day, *rest in rows:
        if job_id not in jobs:
            continue  # pruned since its images were read: its rollup counts it
        job_kind, spec = jobs[job_id]
        records.append(_record(row_day, rest, job_id, job_kind, spec.get("labels"), models_text(spec)))
    return records


def _attempts(current: list[ColumnElement[bool]], earlier: list[ColumnElement[bool]]) -> Any:
    """Every attempt with an outcome, as one subquery of the columns usage reads: the images' current outcomes
    that meet ``current`` and the outcomes replaced before (``earlier_attempts``) that meet ``earlier``, each side
    filtered on its own indexes."""
    now = _current_outcomes(*current)
    before = select(*(getattr(EarlierAttempt, c) for c in _ATTEMPT_COLUMNS), EarlierAttempt.pixels).where(*earlier)
    return union_all(now, before).subquery("attempts")


def _jobs(session: Session, job_ids: set[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    ordered = sorted(job_ids)
    for start in range(0, len(ordered), 500):  # a bounded IN list per query
        chunk = ordered[start:start + 500]
        for job_id, kind, spec in session.execute(select(Job.id, Job.kind, Job.spec).where(Job.id.in_(chunk))):
            found[job_id] = (kind, dict(spec or {}))
    return found


def rolled_up_usage(session: Session, since: datetime, until: datetime, kind: str | None = None,
                    labels: Mapping[str, str] | None = None) -> list[UsageRecord]:
    """The pruned jobs' totals for the UTC days that ``[since, until)`` touches (whole days: that is all a rollup
    keeps)."""
    last_day = (until - timedelta(microseconds=1)).date()
    query = select(UsageRollup).where(UsageRollup.day >= since.date(), UsageRollup.day <= last_day)
    if kind is not None:
        query = query.where(UsageRollup.kind == kind)
    records = []
    for rollup in session.scalars(query):
        carried = dict(rollup.labels or {})
        if any(carried.get(key) != value for key, value in (labels or {}).items()):
            continue
        row = (rollup.device, rollup.worker, rollup.done, rollup.failed, rollup.megapixels * 1e6,
               rollup.download_s, rollup.inference_s, rollup.upload_s)
        records.append(_record(rollup.day, row, rollup.job_id, rollup.kind, carried, rollup.models))
    return records


def roll_up_job(session: Session, job_id: str) -> int:
    """Write a job's usage (every attempt, :func:`_attempts`) per UTC day, device and worker to ``usage_rollups``
    (before its images are deleted); returns the rows written."""
    job = session.get(Job, job_id)
    if job is None:
        return 0
    attempts = _attempts([Image.job_id == job_id], [EarlierAttempt.job_id == job_id])
    day = _utc_day(session, attempts.c.finished_at)
    rows = session.execute(
        select(day, attempts.c.device, attempts.c.worker, *_sums(attempts))
        .group_by(day, attempts.c.device, attempts.c.worker)
    ).all()
    spec = dict(job.spec or {})
    values = [asdict(_record(row_day, rest, job_id, job.kind, spec.get("labels"), models_text(spec)))
              for row_day, *rest in rows]
    if values:
        session.execute(insert(UsageRollup), values)
    return len(values)
