"""Re-enqueueing a job's failed or stalled images."""

from __future__ import annotations

from datetime import timedelta

from db import queries
from db.engine import ensure_schema, session_scope
from db.schema import utcnow
from jobs.messages import PROCESS_BATCH_TASK, ImageItem
from jobs.settings import Settings
from producer.submit import batch_payload


def retry_images(settings: Settings, job_id: str, failed: bool, stalled_after: int | None) -> int:
    """Send the selected images again in fresh batches; returns how many were re-enqueued.

    Outputs go to the same keys, so retried images overwrite partial results.
    """
    from jobs.celery_app import app_for, broker_priority

    app = app_for(settings)
    url = settings.resolved_database_url()
    ensure_schema(url)
    stalled_before = utcnow() - timedelta(seconds=stalled_after) if stalled_after is not None else None
    with session_scope(url) as session:
        job = queries.get_job(session, job_id)
        images = queries.images_to_retry(session, job_id, failed, stalled_before)
        # output_uri keeps the planned key even for failed images
        items = [ImageItem(input=i.input_uri, output=i.output_uri, reference=i.reference_uri) for i in images]
        if items:
            queries.reset_for_retry(session, job_id, [i.input for i in items])
        spec, kind = job.spec, job.kind
    batch_size = int(spec.get("batch_size") or settings.batch_size)
    with app.producer_or_acquire() as producer:
        for start in range(0, len(items), batch_size):
            payload = batch_payload(job_id, kind, spec, items[start:start + batch_size])
            app.send_task(PROCESS_BATCH_TASK, args=[payload], queue=settings.queue,
                          priority=broker_priority(int(spec.get("priority", 5))), producer=producer)
    return len(items)

