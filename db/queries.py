"""Every read and write the producer, worker and API make, in one place.

Writes are idempotent where a redelivered task could repeat them: image rows
are unique per (job, input) and a batch's results replace earlier ones.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from db.schema import (
    ENSEMBLE_MODEL,
    EarlierAttempt,
    IMAGE_STATUSES,
    INPUT_MODEL,
    JOB_STATUSES,
    TERMINAL_IMAGE_STATUSES,
    Image,
    Job,
    Metric,
    utcnow,
)
from db.usage import IMAGE_PIXELS, keep_earlier_outcomes, roll_up_job
from jobs.errors import AmbiguousJobIdError, UnknownJobError
from jobs.review import REVIEW_REASONS, review_reason
from jobs.settings import Settings
from jobs.statuses import FINISHED_JOB_STATUSES


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC: SQLite hands back naive UTC times (a naive time is taken as UTC), PostgreSQL aware
    ones in the session's zone, and a caller's may be in any zone."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def iso_utc(moment: datetime | None) -> str | None:
    """``moment`` as the ISO 8601 text every JSON answer carries: UTC with its offset
    (``2026-12-07T10:15:00.123456+00:00``), the same on SQLite and PostgreSQL whatever the session's zone; None
    stays None."""
    return None if moment is None else as_utc(moment).isoformat()


SUBMISSION_STALE_S = 600  # a job 'submitting' with no progress for this long was abandoned by its producer
SUBMISSION_INTERRUPTED = "submission interrupted"  # how the error of a job whose listing broke off begins
ABANDONED_SUBMISSION = f"{SUBMISSION_INTERRUPTED}: no progress"  # ...and of one whose producer was found gone


def create_job(session: Session, kind: str, spec: dict[str, Any], job_key: str | None = None) -> tuple[Job, bool]:
    """Insert a job, or return the existing one with the same ``job_key``.

    Returns ``(job, created)``. Safe against two producers racing on one key.
    A job still 'submitting' whose producer has shown no progress
    (:func:`submission_progress`) for ``SUBMISSION_STALE_S`` seconds was
    abandoned (its producer was killed mid-listing, so some of its images were
    never enqueued). Every such job, with a key or without, is marked failed
    and its key released whenever a job is created (:func:`fail_abandoned_submissions`),
    so the same key makes a new job instead of handing the broken one back for
    ever, and a keyless one does not stay 'submitting' for good.
    """
    if job_key:
        existing = job_with_key(session, job_key)
        if existing is not None:
            return existing, False
    else:
        fail_abandoned_submissions(session)
    job = Job(kind=kind, spec=spec, job_key=job_key, status="submitting", total=0)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        if not job_key:  # not a race on the key: looking one up would return some other keyless job
            raise
        existing = session.scalar(select(Job).where(Job.job_key == job_key))
        if existing is None:
            raise
        return existing, False
    return job, True


def job_with_key(session: Session, job_key: str) -> Job | None:
    """The job submitted with ``job_key``, or None; an abandoned submission (:func:`fail_abandoned_submissions`,
    run first) holds its key no longer."""
    fail_abandoned_submissions(session)
    return session.scalar(select(Job).where(Job.job_key == job_key))


def fail_abandoned_submissions(session: Session) -> int:
    """Fail every job still 'submitting' with no progress for ``SUBMISSION_STALE_S`` seconds and free its key;
    returns how many there were. The images such a job enqueued are still restored; the others never will be."""
    cutoff = utcnow() - timedelta(seconds=SUBMISSION_STALE_S)
    rows = select(func.count(Image.id)).where(Image.job_id == Job.id).scalar_subquery()
    result = session.execute(
        update(Job).where(Job.status == "submitting", Job.updated_at < cutoff)
        .values(status="failed", job_key=None, finished_at=database_now(session), total=rows,
                error=f"{ABANDONED_SUBMISSION} for over {SUBMISSION_STALE_S} s (its producer stopped "
                      "while listing): the images it sent are restored, the others were never submitted (rows "
                      "it wrote but may not have sent wait: 'deblur retry JOB --stalled' sends them); submit "
                      "again with --skip-existing for the rest, its key (if any) is free")
        # compared in SQL only: SQLite hands back naive times, which Python cannot compare with the aware cutoff
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:
        session.flush()
    return int(result.rowcount or 0)


def finish_submission(session: Session, job_id: str, total: int, status: str) -> bool:
    """The producer listed every input: the job becomes ``status`` with ``total`` images, if it is still
    submitting (one UPDATE, so a cancellation committed meanwhile is not overwritten); False otherwise."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == "submitting")
                             .values(total=total, status=status, updated_at=utcnow()))
    return bool(result.rowcount)


def submission_progress(session: Session, job_id: str) -> str | None:
    """The producer's heartbeat while it lists and enqueues a job (see :func:`create_job`); returns the job's
    status, which is no longer 'submitting' when someone cancelled it (or failed it as abandoned) meanwhile."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == "submitting").values(updated_at=utcnow()))
    return job_status_of(session, job_id)


def job_status_of(session: Session, job_id: str) -> str | None:
    """The job's status as stored now (None for an unknown job)."""
    return session.scalar(select(Job.status).where(Job.id == job_id))


def cancel_pending_images(session: Session, job_id: str) -> int:
    """Cancel a job's pending images, leaving the job's own status alone; returns how many."""
    result = session.execute(update(Image).where(Image.job_id == job_id, Image.status == "pending")
                             .values(status="cancelled", finished_at=utcnow()))
    return int(result.rowcount or 0)


def cancel_unsent_batches(session: Session, job_id: str, first: int) -> int:
    """Cancel a job's pending images in batches ``first`` and after, which its producer wrote but never sent (it
    broke off while sending); returns how many."""
    result = session.execute(update(Image).where(Image.job_id == job_id, Image.status == "pending",
                                                 Image.batch >= first)
                             .values(status="cancelled", finished_at=database_now(session)))
    return int(result.rowcount or 0)


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise unknown_job(job_id)
    return job


def unknown_job(job_id: str) -> UnknownJobError:
    """The error for a job id nobody knows; the API answers a job hidden from a client with it word for word."""
    return UnknownJobError(f"no job with id {job_id!r}; list recent jobs with 'deblur status'")


MIN_JOB_ID_PREFIX = 4  # shorter starts of an id are not looked up: too likely to be a typo
_JOB_ID_CHARS = frozenset("0123456789abcdef-")


def resolve_job_id(session: Session, text: str) -> str:
    """The full id of the job ``text`` names: the id itself or a unique start of it.

    People copy ids from ``deblur status`` (whose table may cut them short
    with "…") or from the 8-character label of a progress bar; any start of
    at least ``MIN_JOB_ID_PREFIX`` characters that only one job's id begins
    with names that job, case-insensitively, as in git or docker. Raises
    :class:`UnknownJobError` when no job matches and
    :class:`AmbiguousJobIdError` (listing the candidates) when several do.
    """
    wanted = text.strip().rstrip("…").strip()
    if session.get(Job, wanted) is not None:
        return wanted
    prefix = wanted.lower()
    if len(prefix) >= MIN_JOB_ID_PREFIX and set(prefix) <= _JOB_ID_CHARS:
        matches = list(session.scalars(select(Job.id).where(Job.id.startswith(prefix)).order_by(Job.id).limit(6)))
        if len(matches) == 1:
            return matches[0]
        if matches:
            shown = ", ".join(matches[:5]) + (", …" if len(matches) > 5 else "")
            raise AmbiguousJobIdError(f"{text!r} is the start of several job ids ({shown}); give more of the id")
    raise UnknownJobError(f"no job with id {text!r}; list recent jobs with 'deblur status' (the first "
                          f"{MIN_JOB_ID_PREFIX} or more characters of an id are enough when only one job starts so)")


def recent_jobs(session: Session, limit: int = 20, labels: dict[str, str] | None = None,
                status: str | None = None, before: str | None = None) -> list[Job]:
    """The newest jobs first; only those carrying every one of ``labels`` and with ``status``, when given, and
    only those listed after the job ``before`` (the last of the previous page: pages by creation time, then id,
    so none is skipped or repeated however many jobs arrive meanwhile).

    Raises:
        UnknownJobError: ``before`` names no job.
    """
    query = select(Job)
    for key, value in (labels or {}).items():
        query = query.where(Job.spec["labels"][key].as_string() == value)
    if status is not None:
        query = query.where(Job.status == status)
    if before is not None:
        last = get_job(session, before)
        query = query.where(or_(Job.created_at < last.created_at,
                                and_(Job.created_at == last.created_at, Job.id < last.id)))
    return list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def insert_images(session: Session, job_id: str, rows: Sequence[dict[str, Any]], batch: int,
                  sent_at: datetime | None = None) -> set[str]:
    """Bulk-insert image rows (``input_uri``, ``output_uri``, ``reference_uri``).

    Duplicates of an existing (job, input), or of an earlier row in ``rows``,
    are skipped. Returns the input URIs inserted, so that an image named twice
    (in a manifest and as an argument) is sent to the workers once.
    """
    if not rows:
        return set()
    # sent now, or for a windowed job's batch when it is (claim_window_batches stamps it again); a producer
    # writing several batches in one transaction reads the database's time once and passes it
    sent_at = sent_at or database_now(session)
    values = [
        {"job_id": job_id, "status": "pending", "attempts": 0, "batch": batch, "sent_at": sent_at, **row}
        for row in rows
    ]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt = postgresql.insert(Image).values(values).on_conflict_do_nothing(
            index_elements=["job_id", "input_uri"]
        )
    elif dialect == "sqlite":
        stmt = sqlite.insert(Image).values(values).on_conflict_do_nothing(
            index_elements=["job_id", "input_uri"]
        )
    else:  # pragma: no cover - other dialects are not supported by the engine factory
        raise RuntimeError(f"unsupported database dialect {dialect}")
    return set(session.scalars(stmt.returning(Image.input_uri)))


def set_job_state(session: Session, job_id: str, **changes: Any) -> None:
    changes.setdefault("updated_at", utcnow())
    session.execute(update(Job).where(Job.id == job_id).values(**changes))


def status_counts(session: Session, job_id: str) -> dict[str, int]:
    """Number of images per status (every status present, zero when none); read from the (job, status) index
    alone, as a worker asks after every batch."""
    rows = session.execute(
        select(Image.status, func.count()).where(Image.job_id == job_id).group_by(Image.status)
    ).all()
    counts = dict.fromkeys(IMAGE_STATUSES, 0)
    counts.update({status: int(n) for status, n in rows})
    return counts


def status_and_review_counts(session: Session, job_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """Images per status, and done images per review reason (:func:`review_counts`), in one pass over the job's
    images (``deblur status --watch`` asks every second)."""
    counts = dict.fromkeys(IMAGE_STATUSES, 0)
    review = dict.fromkeys(REVIEW_REASONS, 0)
    for status, reason, n in session.execute(
        select(Image.status, Image.review, func.count()).where(Image.job_id == job_id)
        .group_by(Image.status, Image.review)
    ):
        counts[status] = counts.get(status, 0) + int(n)
        if status == "done" and reason is not None:
            review[reason] = review.get(reason, 0) + int(n)
    return counts, review


def review_counts(session: Session, job_id: str) -> dict[str, int]:
    """Done images flagged for review, per reason (:data:`jobs.review.REVIEW_REASONS`, zero when none)."""
    return status_and_review_counts(session, job_id)[1]


LEASE_S = Settings.claim_lease
"""How long a batch run's claim on its running images holds without renewal, by default (``DEBLUR_CLAIM_LEASE``;
the worker renews it every quarter of that while the batch runs). Another delivery of the batch takes an image
only once its lease ran out: the run that held it is then presumed lost (a killed process, a dead node)."""


def database_now(session: Session) -> datetime:
    """The time by the database's clock (PostgreSQL's), which every lease is written and judged by.

    Workers on different machines write leases and judge each other's: by their own clocks, one whose clock ran a
    minute ahead would take a live lease for one run out (and restore the image a second time), and one behind
    would keep a lost run's images waiting. SQLite is a file on this machine, so its clock is this machine's.
    """
    if session.get_bind().dialect.name == "postgresql":
        return as_utc(session.scalar(select(func.statement_timestamp())))
    return utcnow()


def _lease_over(now: datetime) -> Any:
    """The condition that an image's lease, if it has one, ran out by ``now``: no run holds it any more."""
    return or_(Image.lease_until.is_(None), Image.lease_until <= now)


def _held_by(claim: str) -> Any:
    """The condition that the run ``claim`` holds an image: running under its claim (no other delivery took it)."""
    return and_(Image.claim == claim, Image.status == "running")


@dataclass
class BatchClaim:
    """What one run of a batch task may work on (:func:`claim_images`)."""

    todo: list[str]  # inputs claimed by this run, still to process
    held: list[str] = field(default_factory=list)  # running under another run's live lease: that run's to finish
    held_until: datetime | None = None  # when the last of those leases runs out, unless renewed
    holders: dict[str, str | None] = field(default_factory=dict)  # the claims holding them, and their workers
    held_for: float = 0.0  # seconds until then, by the database's clock (this machine's may differ)


def claim_images(session: Session, job_id: str, inputs: Iterable[str], worker: str, claim: str,
                 lease_s: float = LEASE_S) -> BatchClaim:
    """Claim a batch's images for the run ``claim`` of a batch task on ``worker``, leased for ``lease_s`` seconds.

    Taken: images pending, or running with no live lease (their run was lost, or predates leases). Left: images
    done, failed or cancelled (an earlier delivery finished them; 'retry --failed' makes a failed one pending
    again), and images running under another run's live lease, returned as ``held``: two deliveries of one batch
    (Redis hands a batch to a second worker once it outlives the visibility timeout) never restore an image at
    once, write its output twice or record different checksums for it.
    """
    inputs = list(inputs)
    now = database_now(session)
    job = session.get(Job, job_id)
    if job is None:
        return BatchClaim([])
    if job.status == "cancelled":
        # images given back after the cancellation (a batch out of time, a failed device) are cancelled with it
        session.execute(update(Image).where(Image.job_id == job_id, Image.input_uri.in_(inputs),
                                            Image.status == "pending").values(status="cancelled", finished_at=now))
        return BatchClaim([])
    takeable = (Image.status == "pending") | (
        (Image.status == "running") & (_lease_over(now) | (Image.claim == claim)))
    mine = Image.job_id == job_id, Image.input_uri.in_(inputs)
    # The UPDATE itself re-checks that each image may be taken, so two deliveries claiming at once never both take
    # one (SQLite has no row locks, and its transaction starts only at the UPDATE); what it returns is what this
    # run holds. Image rows are locked before the job's row, as in the recording transaction, so the two never wait
    # for each other in opposite orders (PostgreSQL); and in id order first, as every path that locks several of a
    # job's images does (the sweeps' take-backs, a retry's reset), where the UPDATE alone would lock them in its
    # index's order (by URI, which a manifest's order need not follow).
    session.execute(select(Image.id).where(*mine, takeable).order_by(Image.id).with_for_update())
    todo = list(session.scalars(
        update(Image).where(*mine, takeable)
        .values(status="running", started_at=now, worker=worker, claim=claim,
                lease_until=now + timedelta(seconds=lease_s))
        .returning(Image.input_uri)
        .execution_options(synchronize_session=False)
    ))
    held_rows = session.execute(
        select(Image.input_uri, Image.lease_until, Image.claim, Image.worker)
        .where(*mine, Image.status == "running", Image.claim != claim)
    ).all()
    held = [uri for uri, _, _, _ in held_rows]
    held_until = max((as_utc(until) for _, until, _, _ in held_rows if until is not None), default=None)
    held_for = max(0.0, (held_until - now).total_seconds()) if held_until is not None else 0.0
    holders = {holder: worker for _, _, holder, worker in held_rows}
    if job.started_at is None or job.status == "queued":
        # A job still "submitting" keeps that status until its producer has
        # listed every input, so it cannot be declared done too early.
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=case((Job.status == "queued", "running"), else_=Job.status),
                started_at=func.coalesce(Job.started_at, now),
                updated_at=now,
            )
        )
    return BatchClaim(todo, held, held_until, holders, held_for)


def mark_running(session: Session, job_id: str, inputs: Iterable[str], worker: str,
                 claim: str | None = None) -> list[str]:
    """Claim a batch's images (:func:`claim_images`, the run named by ``claim``, else by ``worker``); returns the
    inputs to process, so a redelivered task only finishes what was left."""
    return claim_images(session, job_id, inputs, worker, claim or worker[:32]).todo


def renew_leases(session: Session, job_id: str, claim: str, lease_s: float = LEASE_S) -> int:
    """Extend the lease of the running images ``claim`` holds by ``lease_s`` from now; returns how many it holds."""
    # rows the run's own recording transaction holds are skipped (it is renewing them as it records): waiting for
    # them while it waits for another row this renewal took would deadlock the run with its own thread
    ids = select(Image.id).where(Image.job_id == job_id, _held_by(claim)) \
        .with_for_update(skip_locked=True).scalar_subquery()
    result = session.execute(
        update(Image).where(Image.id.in_(ids)).values(lease_until=database_now(session) + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)


def drop_leases(session: Session, job_id: str, claim: str) -> None:
    """End the leases ``claim`` holds at once (its run stops and its task is retried): its next delivery, or any
    other, takes the images without waiting for them to run out. The lease runs out now rather than vanishing,
    so that if no delivery ever comes (the task's retry could not be sent either), the workers' sweep finds the
    images a lease later (:func:`take_back_abandoned`)."""
    session.execute(update(Image).where(Image.job_id == job_id, _held_by(claim))
                    .values(lease_until=database_now(session)))


def start_image(session: Session, job_id: str, input_uri: str, claim: str | None = None) -> int | None:
    """Count a start of the image (``attempts``, and ``unfinished_starts`` until an outcome or a retry resets it);
    returns the unfinished starts, this one included: more than one means earlier starts lost their worker.

    With ``claim``, only while that run holds the image: None when another delivery took it meanwhile (this run's
    lease ran out while it was stalled), and then this run leaves it to that one.
    """
    condition = (Image.job_id == job_id) & (Image.input_uri == input_uri)
    if claim is not None:
        condition = condition & _held_by(claim)
    starts = session.scalar(update(Image).where(condition).values(
        attempts=Image.attempts + 1, unfinished_starts=Image.unfinished_starts + 1, started_at=utcnow())
        .returning(Image.unfinished_starts).execution_options(synchronize_session=False))
    return None if starts is None else int(starts)


def holds(session: Session, job_id: str, input_uri: str, claim: str) -> bool:
    """Whether the run ``claim`` still holds the image (running under its claim: no other delivery took it)."""
    return session.scalar(select(Image.id).where(Image.job_id == job_id, Image.input_uri == input_uri,
                                                 _held_by(claim))) is not None


def release_claims(session: Session, job_id: str, inputs: Sequence[str], claim: str) -> None:
    """Give back images the run ``claim`` claimed (:func:`claim_images`) but did not start: pending again, or
    cancelled when the job was cancelled meanwhile (no task would take them).

    A batch that ran out of time hands its remaining images to a new task;
    they were never started (:func:`start_image`), so no attempt was counted.
    """
    cancelled = job_status_of(session, job_id) == "cancelled"
    now = database_now(session)
    # pending again, sent again now (handed over): their wait for a worker starts anew
    values = ({"status": "cancelled", "finished_at": now, "worker": None} if cancelled
              else {"status": "pending", "started_at": now, "sent_at": now, "worker": None})
    session.execute(
        update(Image)
        .where(Image.job_id == job_id, Image.input_uri.in_(list(inputs)), Image.status == "running",
               Image.claim == claim[:32])
        .values(**values, claim=None, lease_until=None)
    )


def unstart_images(session: Session, job_id: str, inputs: Sequence[str]) -> None:
    """Take back the starts (:func:`start_image`) of images whose batch stopped on a passing fault (storage or
    database unreachable): their worker was not lost, so the cap on lost workers must not count them."""
    session.execute(
        update(Image)
        .where(Image.job_id == job_id, Image.input_uri.in_(list(inputs)), Image.unfinished_starts > 0)
        .values(unfinished_starts=Image.unfinished_starts - 1)
    )


def free_slots_of_finished_batches(session: Session, job_id: str, inputs: Sequence[str]) -> int:
    """Free the window slot of each sent batch ``inputs`` belong to that this transaction just finished (none of
    its images pending or running any more); returns how many slots it freed.

    Called by each transaction that records outcomes, with the images it recorded (whatever message they came
    in: a plain batch 'retry --stalled' sent, say), the slot of a batch is freed exactly once however many times
    the batch was delivered: only the transaction that records its last image sees it finished, so a copy that
    finds nothing to do, or a run that finished after another took part of its batch over, frees nothing. An
    image is counted in the batch it is in now: one that ``retry --failed`` moved to a later batch frees that
    batch's slot (if it was sent) when recorded, whichever message restored it. The job's row is locked first, so
    two runs recording a batch's last images at once (PostgreSQL) see each other's outcomes in turn.
    """
    if not inputs:
        return 0
    # a job without a window sent no batch through one: no row matches, so nothing is locked or freed
    sent = session.scalar(select(Job.batches_sent).where(Job.id == job_id, Job.batches_sent > 0).with_for_update())
    if not sent:
        return 0
    batches = set(session.scalars(select(func.distinct(Image.batch)).where(
        Image.job_id == job_id, Image.input_uri.in_(list(inputs)), Image.batch < sent)))
    if not batches:
        return 0
    unfinished = set(session.scalars(select(func.distinct(Image.batch)).where(
        Image.job_id == job_id, Image.batch.in_(batches), Image.status.in_(("pending", "running")))))
    finished = len(batches - unfinished)
    release_window_slots(session, job_id, finished)
    return finished


PARAMETERS_A_STATEMENT = 1000  # URIs per IN list: PostgreSQL takes at most 65,535 parameters a statement


def _slices(items: Sequence[Any]) -> Iterable[list[Any]]:
    """``items`` in lists of at most :data:`PARAMETERS_A_STATEMENT`, one statement's worth each."""
    for start in range(0, len(items), PARAMETERS_A_STATEMENT):
        yield list(items[start:start + PARAMETERS_A_STATEMENT])


@dataclass
class ImageOutcome:
    """What the worker learned about one image."""

    input_uri: str
    status: str  # done | failed
    output_uri: str | None = None
    error: str | None = None
    kernel_uri: str | None = None
    width: int | None = None
    height: int | None = None
    pixels: int | None = None  # every page's, for a multi-page TIFF (width and height are the first page's)
    format: str | None = None
    bit_depth: int | None = None
    download_s: float | None = None
    inference_s: float | None = None
    upload_s: float | None = None
    device: str | None = None
    worker: str | None = None
    model_versions: dict[str, Any] | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None
    metrics: list[tuple[str, str, float | None]] = field(default_factory=list)  # (model, name, value)


def record_outcomes(session: Session, job_id: str, outcomes: Sequence[ImageOutcome],
                    claim: str | None = None, unfinished_only: bool = False) -> list[str]:
    """Write a batch's results and metrics (replacing earlier ones) in the session's transaction; returns the
    inputs recorded.

    With ``claim``, only images that run still holds (:func:`claim_images`): one another delivery took over after
    this run's lease ran out is that delivery's to record, so the checksum recorded is that of the output it
    writes last. With ``unfinished_only`` (a batch failed as a whole), only images pending or running that no run
    holds: what is done stays done, what failed keeps its own reason, what was cancelled stays cancelled, and an
    image a delivery claims even between the read and the write is left to it. Both are checked by each UPDATE
    itself, not only by the read before it.
    """
    if not outcomes:
        return []
    now = database_now(session)
    condition = [Image.job_id == job_id, Image.input_uri.in_([o.input_uri for o in outcomes])]
    held = [_held_by(claim)] if claim is not None else []
    if unfinished_only:
        held += [Image.status.in_(("pending", "running")), _lease_over(now)]
    rows = session.execute(select(Image.input_uri, Image.id, Image.status).where(*condition, *held)).all()
    ids = {uri: image_id for uri, image_id, _ in rows}
    # an outcome recorded over another keeps the earlier one for usage and history
    replaced = [image_id for _, image_id, status in rows if status in ("done", "failed")]
    if replaced:
        keep_earlier_outcomes(session, replaced)
    for o in outcomes:
        image_id = ids.get(o.input_uri)
        if image_id is None:
            continue
        result = session.execute(
            update(Image)
            .where(Image.id == image_id, *held)  # still this run's when written, not only when read
            .values(
                status=o.status, error=o.error, kernel_uri=o.kernel_uri,
                # a failed image keeps its planned output key, so a retry writes the same key
                output_uri=func.coalesce(o.output_uri, Image.output_uri),
                width=o.width, height=o.height, pixels=o.pixels, format=o.format, bit_depth=o.bit_depth,
                download_s=o.download_s, inference_s=o.inference_s, upload_s=o.upload_s,
                device=o.device, worker=o.worker, model_versions=o.model_versions, finished_at=now,
                input_sha256=o.input_sha256, output_sha256=o.output_sha256, unfinished_starts=0,
                review=review_reason(o.metrics) if o.status == "done" else None, lease_until=None,
            )
        )
        if not result.rowcount:  # another delivery took it over between the read and the write
            del ids[o.input_uri]
    session.execute(delete(Metric).where(Metric.image_id.in_(list(ids.values()))))
    metric_rows = [
        {"image_id": ids[o.input_uri], "model": model, "name": name, "value": _finite_or_inf(value)}
        for o in outcomes
        if o.input_uri in ids
        for model, name, value in o.metrics
    ]
    if metric_rows:
        session.execute(Metric.__table__.insert(), metric_rows)
    return [o.input_uri for o in outcomes if o.input_uri in ids]


def _finite_or_inf(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def finish_if_complete(session: Session, job_id: str) -> str | None:
    """Mark the job done once every image is terminal; returns the new status, if any."""
    job = session.get(Job, job_id)
    if job is None or job.status in ("submitting", *FINISHED_JOB_STATUSES):
        return None
    counts = status_counts(session, job_id)
    unfinished = sum(n for s, n in counts.items() if s not in TERMINAL_IMAGE_STATUSES)
    if unfinished:
        return None
    status = "failed" if counts["done"] == 0 and counts["failed"] > 0 else "done"
    if (job.error or "").startswith(SUBMISSION_INTERRUPTED):
        status = "failed"  # retried to the end, but part of its input was never listed: it stays failed, as it says
    now = utcnow()
    # only one of several workers finishing at once makes the transition (and so sends one notification)
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status.notin_(("submitting", *FINISHED_JOB_STATUSES)))
        .values(status=status, finished_at=now, updated_at=now)
    )
    return status if result.rowcount else None


def mark_image_failed(session: Session, job_id: str, input_uri: str, error: str) -> None:
    """Turn a done image into a failed one (its output key is kept, so a retry writes it again).

    The done attempt is kept for usage (:func:`db.usage.keep_earlier_outcomes`), in its own period; the failure
    counts when it was found, with no seconds (no worker spent any on it).
    """
    image_id = session.scalar(select(Image.id).where(
        Image.job_id == job_id, Image.input_uri == input_uri, Image.status == "done").with_for_update())
    if image_id is None:
        return
    keep_earlier_outcomes(session, [image_id])
    session.execute(
        update(Image).where(Image.id == image_id)
        .values(status="failed", error=error, output_sha256=None, review=None, finished_at=utcnow(),
                download_s=None, inference_s=None, upload_s=None)
    )


def job_spec(session: Session, job_id: str) -> dict[str, Any] | None:
    """The spec a job was submitted with, or None for an unknown job."""
    job = session.get(Job, job_id)
    return None if job is None else dict(job.spec)


def cancel_job(session: Session, job_id: str) -> int:
    """Cancel a job: pending images become ``cancelled``. Returns how many were cancelled."""
    get_job(session, job_id)
    cancelled = cancel_pending_images(session, job_id)
    set_job_state(session, job_id, status="cancelled", finished_at=utcnow())
    return cancelled


def _abandoned(before: datetime) -> Any:
    """Images running under a lease that ran out before ``before``: the run that held them stopped renewing it (a
    node lost, a worker hung past ``DEBLUR_IMAGE_TIME_LIMIT``, a run that ended its leases for a retry that never
    came) and no delivery of their batch took them since. An image with no lease (from before leases) is not
    one: 'deblur retry --stalled' is its way back."""
    return and_(Image.status == "running", Image.lease_until.is_not(None), Image.lease_until < before)


def images_to_retry(session: Session, job_id: str, failed: bool, stalled_before: datetime | None) -> list[Image]:
    """Failed images, and/or images pending or running since before ``stalled_before`` (of a windowed job, only
    those of batches already sent: the others wait their turn). A running image whose worker still renews its
    lease (:func:`claim_images`) is slow, not stalled: it is left to that worker."""
    conditions = []
    if failed:
        conditions.append(Image.status == "failed")
    if stalled_before is not None:
        conditions.append(
            and_(
                Image.status.in_(("pending", "running")),
                func.coalesce(Image.started_at, Image.finished_at, Job.created_at) < stalled_before,
                # a windowed job's batches not sent yet are waiting their turn, not stalled (producer.dispatch)
                or_(Job.batches_listed == 0, Image.batch < Job.batches_sent),
                or_(Image.status == "pending", _lease_over(database_now(session))),
            )
        )
    if not conditions:
        return []
    return list(
        session.scalars(
            select(Image).join(Job, Job.id == Image.job_id).where(Image.job_id == job_id, or_(*conditions))
            .order_by(Image.id)
        )
    )


def reset_for_retry(session: Session, job_id: str, images: Sequence[Image]) -> set[str]:
    """Make the images :func:`images_to_retry` selected pending again; returns the input URIs reset, the only ones
    to send again.

    Each image is reset only if it still has the status it was selected with: one a worker finished (or claimed)
    between the selection and this UPDATE keeps its outcome (or its claim). A reset image gets a fresh allowance of
    lost workers, loses its earlier outcome's finish time, and its ``started_at`` restarts at the retry, so a
    ``retry --stalled`` soon after does not take it for stalled (it waits from now, as a freshly sent one; a
    cleared time would fall back to the job's creation); the outcome it loses is kept for usage
    (:func:`db.usage.keep_earlier_outcomes`). The job becomes queued again only when an image was reset.
    """
    by_status: dict[str, list[str]] = {}
    for image in images:
        by_status.setdefault(image.status, []).append(image.input_uri)
    now = database_now(session)
    reset: set[str] = set()
    for status, inputs in by_status.items():
        for part in _slices(inputs):
            # locked, so the outcomes kept for usage are exactly those the UPDATE then clears; an image a run
            # claimed since the selection (a redelivery) is that run's, not reset under it
            free = or_(Image.status != "running", _lease_over(now))
            ids = list(session.scalars(select(Image.id).where(
                Image.job_id == job_id, Image.input_uri.in_(part), Image.status == status, free)
                .order_by(Image.id).with_for_update()))
            keep_earlier_outcomes(session, ids)
            reset.update(session.scalars(
                update(Image)
                .where(Image.id.in_(ids), Image.status == status, free)  # re-checked: SQLite locks no rows
                .values(status="pending", error=None, unfinished_starts=0, started_at=now, sent_at=now,
                        finished_at=None, claim=None, lease_until=None)
                .returning(Image.input_uri)
                .execution_options(synchronize_session=False)
            ))
    if reset:
        # a paused job stays paused (the operator retried some images, not the job's other batches), and a job still
        # submitting stays so: its producer is listing it and makes it queued when it is done
        set_job_state(session, job_id,
                      status=case((Job.status.in_(("paused", "submitting")), Job.status), else_="queued"),
                      finished_at=None)
    return reset


def _images_in_flight() -> Any:
    """The condition that a job (the outer query's) has an image still pending or running."""
    unfinished = aliased(Image)
    return select(unfinished.id).where(unfinished.job_id == Job.id,
                                       unfinished.status.in_(("pending", "running"))).exists()


def _finished_before(before: datetime) -> Any:
    """A job finished (done, failed or cancelled) before ``before`` with no image still pending or running; rows
    without a finish time count their last update.

    A finished job can still have work in flight: a cancelled job's running images finish, and a job failed as an
    abandoned submission (:func:`fail_abandoned_submissions`) still has the images it enqueued restored. Such a job
    is kept until they have an outcome (read from the (job, status) index).
    """
    return and_(_ended_before(before), ~_images_in_flight())


def _finish_time() -> Any:
    """When a job finished: its finish time, or its last update for rows without one."""
    return func.coalesce(Job.finished_at, Job.updated_at)


def _ended_before(before: datetime) -> Any:
    """A job done, failed or cancelled before ``before``, whether or not images of it are still in flight."""
    return and_(Job.status.in_(FINISHED_JOB_STATUSES), _finish_time() < before)


def jobs_held_back(session: Session, before: datetime) -> list[str]:
    """Jobs that finished before ``before`` but that pruning keeps, oldest first: images of theirs are still pending
    or running (their workers may be gone: ``deblur retry JOB --stalled`` sends them again)."""
    return list(session.scalars(
        select(Job.id).where(_ended_before(before), _images_in_flight()).order_by(_finish_time(), Job.id)))


def prunable_jobs(session: Session, before: datetime) -> list[tuple[str, int]]:
    """(id, images recorded) of every job that finished before ``before`` and has no image pending or running
    (:func:`_finished_before`), oldest first."""
    counted = (
        select(Job.id, func.count(Image.id))
        .outerjoin(Image, Image.job_id == Job.id)
        .where(_finished_before(before))
        .group_by(Job.id, Job.finished_at, Job.updated_at)
        .order_by(_finish_time(), Job.id)
    )
    return [(job_id, int(n)) for job_id, n in session.execute(counted)]


def delete_finished_job(session: Session, job_id: str, before: datetime) -> int | None:
    """Delete a job with its images and metrics if it is still finished before ``before`` with no image pending or
    running (a retry since the listing makes it unfinished: it is kept); returns the images deleted, or None when
    it was kept.

    The check and the deletes are one transaction, the job's row locked where the database can (PostgreSQL), so
    a retry cannot slip in between. Ensembles fitted on the job keep their weights and lose the link. What its
    images used is kept first, per day, device and worker (:func:`db.usage.roll_up_job`), so ``deblur usage``
    still counts it.
    """
    kept = session.execute(
        select(Job.id).where(Job.id == job_id, _finished_before(before)).with_for_update()
    ).scalar_one_or_none()
    if kept is None:
        return None
    roll_up_job(session, job_id)
    session.execute(delete(EarlierAttempt).where(EarlierAttempt.job_id == job_id))
    images = select(Image.id).where(Image.job_id == job_id).scalar_subquery()
    session.execute(delete(Metric).where(Metric.image_id.in_(images)))
    deleted = session.execute(delete(Image).where(Image.job_id == job_id)).rowcount
    session.execute(delete(Job).where(Job.id == job_id))
    return int(deleted)


def image_rows(
    session: Session,
    job_id: str,
    status: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    order_by_metric: tuple[str, str] | None = None,
    review: bool = False,
    after_id: int | None = None,
    with_metrics: bool = True,
    history: bool = False,
) -> list[dict[str, Any]]:
    """Image results with their metrics, as plain dicts (one per image).

    ``metrics`` maps a metric name to the ensemble's value (``psnr``, ``ssim``,
    sharpness…) and ``metrics_by_model`` holds every model's, including
    ``input``. ``order_by_metric=(model, name)`` sorts ascending by that metric
    (worst PSNR first), images without it last. ``review`` keeps only the done
    images flagged for review (:mod:`jobs.review`). ``after_id`` (in id order
    only) starts after that image: pages cut so neither skip nor repeat an image
    when others change status between them, as offsets over a filter would. Without ``with_metrics`` no metric
    is read and both metric maps are empty. With ``history`` each row's ``earlier_attempts`` lists the outcomes
    the image had before (:func:`earlier_attempts_for`).
    """
    query = select(Image).where(Image.job_id == job_id)
    if after_id is not None:
        if order_by_metric is not None:
            raise ValueError("after_id pages in id order only, not by a metric")
        query = query.where(Image.id > after_id)
    if status:
        query = query.where(Image.status == status)
    if review:
        query = query.where(Image.status == "done", Image.review.is_not(None))
    if order_by_metric is not None:
        model, name = order_by_metric
        value = (
            select(Metric.value)
            .where(Metric.image_id == Image.id, Metric.model == model, Metric.name == name)
            .scalar_subquery()
        )
        query = query.order_by(case((value.is_(None), 1), else_=0), value, Image.id)
    else:
        query = query.order_by(Image.id)
    if limit is not None:
        query = query.limit(limit)
    if offset:
        query = query.offset(offset)
    images = list(session.scalars(query))
    metrics = metrics_for(session, [i.id for i in images]) if with_metrics else {}
    rows = [image_dict(image, metrics.get(image.id, {})) for image in images]
    if history:
        earlier = earlier_attempts_for(session, [i.id for i in images])
        for row in rows:
            row["earlier_attempts"] = earlier.get(row["id"], [])
    return rows


def earlier_attempts_for(session: Session, image_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """The outcomes each image had before its current one (:class:`db.schema.EarlierAttempt`), oldest first: when
    each attempt finished, how, why it failed, where it ran and its model seconds."""
    found: dict[int, list[dict[str, Any]]] = {}
    for part in _slices(image_ids):
        for attempt in session.scalars(select(EarlierAttempt).where(EarlierAttempt.image_id.in_(part))
                                       .order_by(EarlierAttempt.finished_at, EarlierAttempt.id)):
            found.setdefault(int(attempt.image_id or 0), []).append({
                "finished_at": iso_utc(attempt.finished_at), "status": attempt.status, "error": attempt.error,
                "worker": attempt.worker, "device": attempt.device, "inference_s": attempt.inference_s,
            })
    return found


def metrics_for(session: Session, image_ids: Sequence[int]) -> dict[int, dict[str, dict[str, float | None]]]:
    """{image_id: {model: {name: value}}}, fetched in chunks."""
    out: dict[int, dict[str, dict[str, float | None]]] = {}
    ids = list(image_ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for image_id, model, name, value in session.execute(
            select(Metric.image_id, Metric.model, Metric.name, Metric.value).where(Metric.image_id.in_(chunk))
        ):
            out.setdefault(image_id, {}).setdefault(model, {})[name] = value
    return out


def headline_metric_names(session: Session, job_id: str) -> list[str]:
    """Every key the ``metrics`` of the job's :func:`image_dict` rows can hold, sorted: ``input_NAME`` for each of
    the input's metrics and each of the ensemble's names. One query over the job's input and ensemble metrics
    (under a second at 200,000 images), so that every page of a CSV export has the same columns."""
    found = session.execute(
        select(Metric.model, Metric.name).distinct().join(Image, Image.id == Metric.image_id)
        .where(Image.job_id == job_id, Metric.model.in_((INPUT_MODEL, ENSEMBLE_MODEL)))
    )
    return sorted({f"input_{name}" if model == INPUT_MODEL else name for model, name in found})


def image_dict(image: Image, by_model: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    headline: dict[str, float | None] = {}
    for name, value in by_model.get(INPUT_MODEL, {}).items():
        headline[f"input_{name}"] = value
    headline.update(by_model.get(ENSEMBLE_MODEL, {}))
    return {
        "id": image.id,
        "input": image.input_uri,
        "output": image.output_uri if image.status == "done" else None,
        "reference": image.reference_uri,
        "kernel": image.kernel_uri,
        "status": image.status,
        "error": image.error,
        "attempts": image.attempts,
        "review": image.review if image.status == "done" else None,
        "width": image.width,
        "height": image.height,
        "format": image.format,
        "bit_depth": image.bit_depth,
        "download_s": image.download_s,
        "inference_s": image.inference_s,
        "upload_s": image.upload_s,
        "device": image.device,
        "worker": image.worker,
        "model_versions": image.model_versions,
        "input_sha256": image.input_sha256,
        "output_sha256": image.output_sha256 if image.status == "done" else None,
        "started_at": iso_utc(image.started_at),
        "finished_at": iso_utc(image.finished_at),
        "metrics": headline,
        "metrics_by_model": by_model,
    }


def metric_summary(session: Session, job_id: str) -> list[dict[str, Any]]:
    """Mean of every (model, metric) over the job's done images, with ``count`` the values averaged.

    Infinite values (the PSNR of an image identical to its reference) are left out of the mean, which one of them
    would make infinite, and counted in ``non_finite``; when every value is infinite the mean is that infinity (all
    of a set of images compared with themselves), and a mean of none is None.
    """
    finite = Metric.value.between(-sys.float_info.max, sys.float_info.max)  # stored NaNs are NULL already
    finite_value = case((finite, Metric.value))
    rows = session.execute(
        select(Metric.model, Metric.name, func.avg(finite_value), func.count(finite_value), func.count(Metric.value),
               func.min(Metric.value), func.max(Metric.value))
        .join(Image, Image.id == Metric.image_id)
        .where(Image.job_id == job_id, Image.status == "done", Metric.value.is_not(None))
        .group_by(Metric.model, Metric.name)
    ).all()

    def mean(average: float | None, finite_count: int, low: float | None, high: float | None) -> float | None:
        if finite_count or low is None or high is None or low != high:
            return float(average) if average is not None else None
        return float(low)  # every value the same infinity

    def averaged(finite_count: int, every: int, low: float | None, high: float | None) -> int:
        """How many values the mean stands for: the finite ones, or all when all are the same infinity."""
        return every if not finite_count and low is not None and low == high else finite_count

    return [{"model": m, "name": n, "mean": mean(v, int(c), low, high),
             "count": averaged(int(c), int(every), low, high), "non_finite": int(every) - int(c)}
            for m, n, v, c, every, low, high in rows]


def job_timing(session: Session, job_id: str) -> dict[str, float | None]:
    """Mean per-image seconds of each stage over done images."""
    row = session.execute(
        select(func.avg(Image.download_s), func.avg(Image.inference_s), func.avg(Image.upload_s))
        .where(Image.job_id == job_id, Image.status == "done")
    ).one()
    return {"download_s": row[0], "inference_s": row[1], "upload_s": row[2]}


def recent_finishes(session: Session, job_id: str, since: datetime, until: datetime) -> tuple[int, datetime | None]:
    """How many of the job's images reached an outcome (done or failed) between ``since`` and ``until``, and the
    earliest start among them (None when none did): the job's current pace, for its throughput and ETA.

    Read from the finish-time index (``ix_images_finished_at``), so it costs what the window's finishes of every job
    do, never a long job's whole history: ``job_id`` is wrapped in an expression so that neither SQLite (which
    would read every done image of the job through the (job, status) index: 250 ms at 300,000 images, against
    2 ms) nor PostgreSQL takes the job's index instead.
    """
    count, first_start = session.execute(
        select(func.count(), func.min(Image.started_at)).where(
            func.coalesce(Image.job_id, "") == job_id, Image.status.in_(("done", "failed")),
            Image.finished_at >= since, Image.finished_at <= until)
    ).one()
    return int(count or 0), first_start


SENDING_JOB_STATUSES = ("submitting", "queued", "running")  # a windowed job in these may send its next batches
UNFINISHED_JOB_STATUSES = (*SENDING_JOB_STATUSES, "paused")  # work left: what the metrics count as the backlog
RETRYABLE_JOB_STATUSES = ("queued", "running", "paused")  # retry --all: a submitting job is its producer's
# jobs whose images in the broker are still restored: unfinished ones, and one failed because its submission broke
# off (fail_abandoned_submissions: "the images it sent are restored"); a job failed otherwise has none left
STILL_RESTORED_JOB_STATUSES = (*UNFINISHED_JOB_STATUSES, "failed")


@dataclass(frozen=True)
class OperationsSnapshot:
    """What an operator watches, read from SQL at one moment (``deblur metrics``, the API's ``/metrics``).

    The backlog is the images of unfinished jobs only, and the recent figures
    cover images of jobs that are unfinished or finished within the window, so
    a scrape reads the jobs index and the images of a few jobs, never the whole
    history of an archive.
    """

    jobs: dict[str, int]
    backlog: dict[str, int]
    oldest_unfinished_created: datetime | None
    stalled: int
    worker_lost: int
    finished_recently: dict[str, int]
    megapixels_recently: float
    inference_s_recently: float


def operations_snapshot(session: Session, stalled_before: datetime, recent_since: datetime) -> OperationsSnapshot:
    """Job and image counts for monitoring.

    ``stalled`` counts running images started before ``stalled_before`` (past
    the broker's visibility timeout their worker is gone and redelivery has not
    picked them up) whose lease ran out (a worker renewing it is slow, not
    gone); ``worker_lost`` counts images of unfinished jobs whose
    worker died at least once since their last outcome (pending again after a
    start, or started twice); the recent figures count outcomes at or after
    ``recent_since``.
    """
    jobs = dict.fromkeys(JOB_STATUSES, 0)
    for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        jobs[status] = int(count)
    # The job ids first, as literals: given a subquery, PostgreSQL's planner guessed an average job's image count
    # for each and read every image of the history (130 ms at 1 M images) instead of the index (1 ms).
    unfinished = list(session.scalars(select(Job.id).where(Job.status.in_(UNFINISHED_JOB_STATUSES))))
    recent_job_ids = list(session.scalars(select(Job.id).where(
        or_(Job.status.in_(UNFINISHED_JOB_STATUSES), _finish_time() >= recent_since))))
    backlog = dict.fromkeys(IMAGE_STATUSES, 0)
    oldest, stalled, worker_lost = None, 0, 0
    if unfinished:
        for status, count in session.execute(
            select(Image.status, func.count()).where(Image.job_id.in_(unfinished)).group_by(Image.status)
        ):
            backlog[status] = int(count)
        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.id.in_(unfinished)))
        stalled = session.scalar(
            select(func.count()).where(Image.job_id.in_(unfinished), Image.status == "running",
                                       Image.started_at < stalled_before,
                                       # a worker still renewing its lease is slow, not gone (claim_images)
                                       _lease_over(database_now(session)))
        )
        worker_lost = session.scalar(
            select(func.count()).where(
                Image.job_id.in_(unfinished),
                or_(and_(Image.status == "pending", Image.unfinished_starts >= 1),
                    and_(Image.status == "running", Image.unfinished_starts >= 2)),
            )
        )
    finished = dict.fromkeys(TERMINAL_IMAGE_STATUSES, 0)
    pixels = seconds = None
    if recent_job_ids:
        recent = and_(Image.job_id.in_(recent_job_ids), Image.finished_at >= recent_since)
        for status, count in session.execute(
            select(Image.status, func.count()).where(recent, Image.status.in_(TERMINAL_IMAGE_STATUSES))
            .group_by(Image.status)
        ):
            finished[status] = int(count)
        pixels, seconds = session.execute(
            select(func.sum(IMAGE_PIXELS), func.sum(Image.inference_s))
            .where(recent, Image.status == "done")
        ).one()
    return OperationsSnapshot(
        jobs=jobs, backlog=backlog, oldest_unfinished_created=oldest, stalled=int(stalled or 0),
        worker_lost=int(worker_lost or 0), finished_recently=finished,
        megapixels_recently=float(pixels or 0) / 1e6, inference_s_recently=float(seconds or 0.0),
    )


def record_listed_batches(session: Session, job_id: str, listed: int) -> None:
    """A windowed job's producer has written the image rows of batches ``0 .. listed - 1``."""
    session.execute(update(Job).where(Job.id == job_id).values(batches_listed=listed))


def claim_window_batches(session: Session, job_id: str, window: int, released: int = 0) -> list[int]:
    """The batch numbers a windowed job may send now, in order, each counted as sent and in flight.

    ``released`` slots are freed first (batches that finished, or claimed ones
    with nothing left to do). A
    batch is claimed while fewer than ``window`` are in flight, some listed
    batch is still unsent, and the job is unfinished (a cancelled job sends
    nothing more). Each claim is one atomic ``UPDATE ... RETURNING``, so
    producers and workers claiming at once never get the same number.
    """
    release_window_slots(session, job_id, released)
    claimed: list[int] = []
    while True:
        sent = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.batches_sent < Job.batches_listed, Job.batches_in_flight < window,
                   Job.status.in_(SENDING_JOB_STATUSES))
            .values(batches_sent=Job.batches_sent + 1, batches_in_flight=Job.batches_in_flight + 1)
            .returning(Job.batches_sent)
        ).scalar()
        if sent is None:
            break
        claimed.append(int(sent) - 1)
    if claimed:
        # their images wait in the broker from now: 'retry --stalled' measures a pending image's wait from here
        # (unsent, it would count from the job's creation and re-send batches that are merely queued), and a
        # broker's loss is judged by it (worker.broker_watch), on the database's clock as that loss is
        now = database_now(session)
        session.execute(update(Image).where(Image.job_id == job_id, Image.batch.in_(claimed),
                                            Image.status == "pending").values(started_at=now, sent_at=now))
    return claimed


def release_window_slots(session: Session, job_id: str, count: int) -> None:
    """``count`` of a windowed job's batches in flight finished (or had nothing to do): their slots are free."""
    if count:
        session.execute(update(Job).where(Job.id == job_id).values(
            batches_in_flight=case((Job.batches_in_flight > count, Job.batches_in_flight - count), else_=0)))


def unclaim_window_batch(session: Session, job_id: str, batch: int) -> bool:
    """Give back the claim of ``batch`` when its message could not be sent, if no later batch was claimed since
    (then it is sent again by the next claim); False when it could not be given back."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.batches_sent == batch + 1)
        .values(batches_sent=Job.batches_sent - 1,
                batches_in_flight=case((Job.batches_in_flight > 0, Job.batches_in_flight - 1), else_=0))
    )
    return bool(result.rowcount)


def pending_batch_items(session: Session, job_id: str,
                        batches: Sequence[int]) -> dict[int, list[tuple[str, str | None, str | None]]]:
    """The (input, output, reference) URIs of each batch's images still pending, in the order listed (one
    query for all of them); a batch with none is left out."""
    found: dict[int, list[tuple[str, str | None, str | None]]] = {}
    for batch, uri, output, reference in session.execute(
        select(Image.batch, Image.input_uri, Image.output_uri, Image.reference_uri)
        .where(Image.job_id == job_id, Image.batch.in_(list(batches)), Image.status == "pending").order_by(Image.id)
    ):
        found.setdefault(batch, []).append((uri, output, reference))
    return found


def relist_for_window(session: Session, job_id: str, inputs: Sequence[str], batch_size: int) -> int:
    """Give a windowed job's retried images (reset to pending) new batch numbers after its last listed batch, so
    that they are sent through its window like any other batch (a retry of thousands of failed images would
    otherwise flood the broker past it, and its messages would hold no slot the window could count). Returns
    the batches added. Not for a job still being listed: its producer writes ``batches_listed`` itself."""
    listed = int(session.scalar(select(Job.batches_listed).where(Job.id == job_id)) or 0)
    chunks = [list(inputs[start:start + batch_size]) for start in range(0, len(inputs), batch_size)]
    for offset, chunk in enumerate(chunks):
        for part in _slices(chunk):
            session.execute(update(Image).where(Image.job_id == job_id, Image.input_uri.in_(part))
                            .values(batch=listed + offset).execution_options(synchronize_session=False))
    if chunks:
        session.execute(update(Job).where(Job.id == job_id).values(batches_listed=Job.batches_listed + len(chunks)))
    return len(chunks)


def restart_window(session: Session, job_id: str) -> int:
    """Count a windowed job's batches in flight afresh (``deblur retry --stalled``): the batches sent whose images
    are still pending or running (in the broker, or being worked on). Retried images were relisted
    (:func:`relist_for_window`) after every batch sent, so they are not counted; their batches are claimed as the
    window allows. A count that drifted (a broker that lost its messages, a slot whose next batch could not be
    sent) is right again. One UPDATE, counted in it from the job's row as it is then, so a worker claiming or
    freeing a slot meanwhile is not overwritten by a stale read. Returns the count."""
    # the job's row first: on PostgreSQL the count below then sees what a worker that was freeing a slot under
    # that lock committed (the statement's snapshot is taken once it holds the row), instead of counting the
    # finished batch again over the slot it just freed
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    outstanding = (
        select(func.count(func.distinct(Image.batch)))
        .where(Image.job_id == job_id, Image.batch < Job.batches_sent, Image.status.in_(("pending", "running")))
        .scalar_subquery()
    )
    session.execute(update(Job).where(Job.id == job_id).values(batches_in_flight=outstanding)
                    .execution_options(synchronize_session=False))
    return int(session.scalar(select(Job.batches_in_flight).where(Job.id == job_id)) or 0)


def jobs_with_abandoned_images(session: Session, abandoned_for: float) -> list[tuple[str, dict[str, Any]]]:
    """Jobs still restored (unfinished, or failed with their submission broken off) and cancelled jobs (id and
    spec, oldest first) holding images whose lease ran out at least ``abandoned_for`` seconds ago: their run was
    lost, and Redis would hand its batch on only after the whole visibility timeout (an hour by default). A job
    still being listed is included: its producer lists, it does not watch its batches. A cancelled job's are
    cancelled (:func:`take_back_abandoned`)."""
    before = database_now(session) - timedelta(seconds=abandoned_for)
    lost = select(Image.id).where(Image.job_id == Job.id, _abandoned(before)).exists()
    return [(job_id, spec) for job_id, spec in session.execute(
        select(Job.id, Job.spec).where(Job.status.in_((*STILL_RESTORED_JOB_STATUSES, "cancelled")), lost)
        .order_by(Job.created_at))]


def take_back_abandoned(session: Session, job_id: str, abandoned_for: float) -> list[tuple[str, str, str | None]]:
    """Make a job's abandoned images (lease out for ``abandoned_for`` seconds) pending again, to be sent again in
    this transaction; returns their (input, output, reference) URIs.

    Unlike a retry, this takes back what a lost run held and nothing else: the image keeps its batch (a windowed
    job's slot is freed when the batch's last image is recorded, whatever message carried it), its attempts and
    its unfinished starts (the lost run's start counts towards ``DEBLUR_IMAGE_MAX_ATTEMPTS``, so an image that
    kills or hangs every worker is failed after that many, not sent round for good), and the job its status.
    Image rows are locked before the job's row, the order every path keeps. A job cancelled meanwhile is not
    brought back: its abandoned images are cancelled with it.
    """
    now = database_now(session)
    before = now - timedelta(seconds=abandoned_for)
    ids = list(session.scalars(select(Image.id).where(Image.job_id == job_id, _abandoned(before))
                               .order_by(Image.id).with_for_update()))
    if not ids:
        return []
    status = session.scalar(select(Job.status).where(Job.id == job_id).with_for_update())
    still = (Image.id.in_(ids), _abandoned(before))  # re-checked by each UPDATE: SQLite locks no rows
    if status == "cancelled":
        session.execute(update(Image).where(*still).values(status="cancelled", finished_at=now, claim=None,
                                                           lease_until=None)
                        .execution_options(synchronize_session=False))
        return []
    if status not in STILL_RESTORED_JOB_STATUSES:
        return []
    rows = session.execute(
        update(Image).where(*still)
        .values(status="pending", started_at=now, sent_at=now, worker=None, claim=None, lease_until=None)
        .returning(Image.input_uri, Image.output_uri, Image.reference_uri)
        .execution_options(synchronize_session=False)
    ).all()
    return sorted((uri, output, reference) for uri, output, reference in rows)


def _waiting_since_before(before: datetime) -> Any:
    """Pending images whose message went to the broker before ``before`` (``sent_at``, stamped by the database's
    clock before each send: with the job, once a windowed job's batch was claimed, by a retry, a hand-over or a
    sweep; a row from before send times were kept counts as sent long ago). A windowed job's batches not sent
    yet hold no message, so they are not."""
    return and_(
        Image.status == "pending",
        or_(Image.sent_at.is_(None), Image.sent_at < before),
        or_(Job.batches_listed == 0, Image.batch < Job.batches_sent),
    )


def jobs_waiting_since(session: Session, before: datetime) -> list[tuple[str, dict[str, Any]]]:
    """Jobs still restored with images waiting for a message sent before ``before``, id and spec, oldest first:
    after the broker lost its messages (:mod:`worker.broker_watch`), the images it would never deliver. A job still
    being listed is included (the messages its producer sent before the loss are gone too), a paused one (its
    batches already sent were lost as well), and one failed as its submission broke off: "the images it enqueued
    are restored". Its producer cancels the rows it wrote and could not send; a producer killed between writing a
    chunk and sending it leaves that chunk's rows pending, and a loss sends them too (``--skip-existing`` on a
    second submission leaves out what they restored)."""
    waiting = select(Image.id).where(Image.job_id == Job.id, _waiting_since_before(before)).exists()
    return [(job_id, spec) for job_id, spec in session.execute(
        select(Job.id, Job.spec).where(Job.status.in_(STILL_RESTORED_JOB_STATUSES), waiting)
        .order_by(Job.created_at))]


def waiting_since(session: Session, job_id: str, before: datetime,
                  limit: int = 5000) -> list[tuple[int, str, str, str | None]]:
    """Up to ``limit`` of a job's images waiting for a message sent before ``before``, in id order: (id, input,
    output, reference). Read without locking them: the caller sends them, then stamps them
    (:func:`mark_sent`)."""
    return [(int(i), uri, output, reference) for i, uri, output, reference in session.execute(
        select(Image.id, Image.input_uri, Image.output_uri, Image.reference_uri)
        .join(Job, Job.id == Image.job_id).where(Image.job_id == job_id, _waiting_since_before(before))
        .order_by(Image.id).limit(limit))]


def mark_sent(session: Session, ids: Sequence[int], sent_at: datetime, before: datetime) -> int:
    """Stamp images sent again (:func:`waiting_since`) with ``sent_at``, read before the send, so the next pass
    leaves them; one a worker claimed or a retry sent meanwhile keeps what it has. Returns how many were
    stamped."""
    stamped = 0
    for part in _slices(list(ids)):
        result = session.execute(
            update(Image).where(Image.id.in_(part), Image.status == "pending",
                                or_(Image.sent_at.is_(None), Image.sent_at < before))
            .values(sent_at=sent_at).execution_options(synchronize_session=False))
        stamped += int(result.rowcount or 0)
    return stamped


def unfinished_job_outputs(session: Session, job_key: str | None = None) -> list[tuple[str, str, str]]:
    """(id, status, output prefix) of every unfinished job that writes outputs, oldest first, but the one keyed
    ``job_key`` (a submission racing another with its own key is answered with that job, not refused by it): one
    short string per job, for a new job's submission to find those whose outputs its own could land on."""
    output = Job.spec["output"].as_string()
    # not a job failed as its submission broke off, though it still restores what it sent: which of its pending
    # rows were sent is not known, and a failed job cannot be cancelled, so it would hold the outputs for good
    query = select(Job.id, Job.status, output).where(Job.status.in_(UNFINISHED_JOB_STATUSES), output.is_not(None))
    if job_key is not None:
        query = query.where(or_(Job.job_key.is_(None), Job.job_key != job_key))
    rows = session.execute(query.order_by(Job.created_at)).all()
    return [(job_id, status, prefix) for job_id, status, prefix in rows if prefix]


def outputs_still_to_write(session: Session, job_ids: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(job id, output URI) of every image of ``job_ids`` still pending or running, streamed."""
    for part in _slices(list(job_ids)):
        yield from session.execute(
            select(Image.job_id, Image.output_uri)
            .where(Image.job_id.in_(part), Image.status.in_(("pending", "running")), Image.output_uri.is_not(None))
            .execution_options(yield_per=10_000))


def waiting_by_queue(session: Session) -> dict[str | None, tuple[int, int]]:
    """For each queue unfinished jobs were submitted to (None: jobs that predate recorded queues), how many such
    jobs there are and how many of their images wait for a worker (pending), for ``deblur doctor``. A job failed
    as its submission broke off counts while images it sent still wait (they are restored, as its error says)."""
    pending = select(Image.id).where(Image.job_id == Job.id, Image.status == "pending").exists()
    jobs = session.execute(select(Job.id, Job.spec).where(
        or_(Job.status.in_(UNFINISHED_JOB_STATUSES), and_(Job.status == "failed", pending)))).all()
    queue_of = {job_id: (spec or {}).get("queue") for job_id, spec in jobs}
    found: dict[str | None, tuple[int, int]] = {}
    for queue in queue_of.values():
        count, waiting = found.get(queue, (0, 0))
        found[queue] = (count + 1, waiting)
    ids = list(queue_of)
    for part in _slices(ids):
        for job_id, waiting in session.execute(
            select(Image.job_id, func.count()).where(Image.job_id.in_(part), Image.status == "pending")
            .group_by(Image.job_id)
        ):
            count, total = found[queue_of[job_id]]
            found[queue_of[job_id]] = (count, total + int(waiting))
    return found


def failure_reasons(session: Session, job_id: str, limit: int = 3) -> list[tuple[str, int]]:
    """The most frequent errors of ``job_id``'s failed images, with how many failed so: what 'deblur status' shows
    of a job that failed, so a user sees why (a missing weights file fails every image alike) without paging
    through its results."""
    rows = session.execute(
        select(Image.error, func.count()).where(Image.job_id == job_id, Image.status == "failed")
        .group_by(Image.error).order_by(func.count().desc(), Image.error).limit(limit))
    return [(error or "no reason recorded", int(count)) for error, count in rows]


def queues_of_unfinished_jobs(session: Session) -> set[str | None]:
    """The queues unfinished jobs were submitted to (None: a job that predates recorded queues), for the metrics'
    broker figures: a scrape must read every queue with work left, not only its own ``DEBLUR_QUEUE``. Unlike
    :func:`waiting_by_queue` it reads only the jobs table (the queue extracted in SQL), as a scrape runs every few
    seconds."""
    return set(session.scalars(select(Job.spec["queue"].as_string()).distinct()
                               .where(Job.status.in_(UNFINISHED_JOB_STATUSES))))


def retryable_job_ids(session: Session) -> list[str]:
    """Jobs queued, running or paused, oldest first (``deblur retry --all``); a job still submitting is its
    producer's to finish listing."""
    return list(session.scalars(
        select(Job.id).where(Job.status.in_(RETRYABLE_JOB_STATUSES)).order_by(Job.created_at)))


def pause_job(session: Session, job_id: str) -> bool:
    """Hold back a queued or running job's batches not sent yet (a windowed job); False if it was not queued or
    running. Batches already sent still run."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.status.in_(("queued", "running")))
                             .values(status="paused", updated_at=utcnow()))
    return bool(result.rowcount)


def resume_job(session: Session, job_id: str) -> bool:
    """A paused job is queued (or running, if an image of it ever started) again; False if it was not paused."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "paused")
        .values(status=case((Job.started_at.is_(None), "queued"), else_="running"), updated_at=utcnow()))
    return bool(result.rowcount)
