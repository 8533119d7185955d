"""Re-enqueueing a job's failed or stalled images."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from db import queries
from db.engine import ensure_schema, session_scope
from db.schema import Image, utcnow
from jobs.errors import InputError, OutputsBusyError
from jobs.messages import ImageItem
from jobs.s3uri import parse_s3_uri
from jobs.settings import Settings
from producer.dispatch import send_plain_batches, send_window_batches
from producer.inputs import digest


def retry_images(settings: Settings, job_id: str, failed: bool, stalled_after: int | None) -> int:
    """Send the selected images again in fresh batches; returns how many were re-enqueued.

    Outputs go to the same keys, so retried images overwrite partial results.
    For a job with a window (:mod:`producer.dispatch`), the retried images
    become new batches after the job's last, sent through its window as it
    allows; a retry of stalled images also counts the batches in flight afresh
    first: after the broker lost its messages (a Redis restarted without
    persistence, a flushed queue) the job's count still included them, and no
    batch would have been sent again. A windowed job still being listed gets
    its retried images outside the window, as a job without one does.

    Raises :class:`OutputsBusyError`, retrying nothing, when another unfinished
    job has still to write one of the selected images' outputs (a job run
    again into the same prefix since): both would write it.
    """
    from jobs.celery_app import app_for

    app = app_for(settings)
    url = settings.resolved_database_url()
    ensure_schema(url)
    stalled_before = utcnow() - timedelta(seconds=stalled_after) if stalled_after is not None else None
    with session_scope(url) as session:
        job = queries.get_job(session, job_id)
        images = queries.images_to_retry(session, job_id, failed, stalled_before)
        _check_no_other_job_writes(session, job_id, job.spec.get("output"), images)
        # output_uri keeps the planned key even for failed images
        items = [ImageItem(input=i.input_uri, output=i.output_uri, reference=i.reference_uri) for i in images]
        if items:
            # only those still as selected: an image a worker finished meanwhile is not sent again
            reset = queries.reset_for_retry(session, job_id, images)
            items = [item for item in items if item.input in reset]
        spec, kind = job.spec, job.kind
        batch_size = int(spec.get("batch_size") or settings.batch_size)
        windowed = bool(spec.get("window")) and queries.job_status_of(session, job_id) != "submitting"
        if windowed:
            queries.relist_for_window(session, job_id, [i.input for i in items], batch_size)
            if stalled_after is not None:
                queries.restart_window(session, job_id)
        elif spec.get("window") and items:
            # a windowed job still being listed: its images were reset in place, so batches that had freed their
            # slot are in flight again, and counted so, for their recording to free it once more
            queries.restart_window(session, job_id)
    with app.producer_or_acquire() as producer:
        if windowed:
            send_window_batches(settings, job_id, kind, spec, producer=producer)
        else:
            send_plain_batches(settings, job_id, kind, spec, items, producer=producer)
    return len(items)


def _check_no_other_job_writes(session: Session, job_id: str, prefix: object, images: list[Image]) -> None:
    """Refuse to send ``images`` of job ``job_id`` (output prefix ``prefix``) again when an unfinished job other
    than this one has still to write one of their outputs: the two would write over each other, and whichever
    finished first would keep 'done' over an output the other replaced (as a new job is refused,
    :mod:`producer.submit`). Only jobs whose output prefix overlaps are read; the images are held already."""
    from producer.submit import jobs_writing_into

    if not images or not isinstance(prefix, str):
        return
    try:
        output = parse_s3_uri(prefix, want_prefix=True, exact=True)
    except InputError:  # a spec written by hand or by an older version: nothing to compare
        return
    overlapping = jobs_writing_into(session, output, other_than=job_id)
    if not overlapping:
        return
    retried = {digest(image.output_uri): image for image in images if image.output_uri}
    for other, uri in queries.outputs_still_to_write(session, list(overlapping)):
        image = retried.get(digest(uri))
        if image is not None and image.output_uri == uri:
            raise OutputsBusyError(
                f"output {uri} is one job {other} ({overlapping[other]}) has still to write (the output of "
                f"{image.input_uri}): retrying job {job_id} now would write over that job's result. Wait for it "
                f"('deblur status {other} --watch') or cancel it, then retry", other, uri)


def retryable_job_ids(settings: Settings) -> list[str]:
    """Every job queued, running or paused, oldest first (``deblur retry --all``); jobs still submitting are left
    to their producers."""
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        return queries.retryable_job_ids(session)
