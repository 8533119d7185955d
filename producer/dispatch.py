"""Sending a job's batches to the broker: the message body, and the per-job window that makes jobs take turns.

Without a window (``DEBLUR_JOB_WINDOW=0``) a job's batches all go to the
broker as it is listed, first come first served: a job of a million images
submitted first makes a ten-image job at the same priority wait for all of it.
With a window of W, at most W of a job's batches are in the broker or being
worked on; each batch that finishes sends the job's next one, at the back of
the list, so two jobs at one priority alternate batch for batch.

The job row counts batches listed, sent and in flight (:func:`db.queries.
claim_window_batches`), and batches are sent in their listed order. A batch
carries ``slot: true`` when it holds one of its job's slots; only such a batch
frees one when it finishes (retries and handed-over remainders keep theirs).

What can go wrong, and what then happens:

- a worker dies mid-batch: the batch is redelivered and frees its slot when it
  finishes, as before;
- a worker dies between finishing a batch and sending the next one: the
  redelivered batch finds its images done and sends the next one then;
- the broker refuses the next batch: the worker tries again for half a
  minute; then its claim is given back and the next batch of the job to finish
  sends it. A job left with nothing in flight (a window of 1, say) waits until
  ``deblur retry JOB --stalled`` counts its batches in flight afresh and fills
  the window; its images stay pending, so the backlog alert fires meanwhile;
- a batch delivered twice (a worker lost after freeing its slot, or a batch
  outliving the broker's visibility timeout): its slot is freed by the
  transaction that records its last image (:func:`db.queries.
  free_slots_of_finished_batches`), so once; the copy that finds nothing to do
  only sends what the window has room for, and an image another delivery
  holds under a live lease is left to it (:func:`db.queries.claim_images`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from db import queries
from db.engine import session_scope
from jobs.messages import PROCESS_BATCH_TASK, BatchMessage, ImageItem, JobKind
from jobs.settings import Settings

log = logging.getLogger(__name__)


def batch_payload(job_id: str, kind: JobKind, spec: dict[str, Any], images: Sequence[ImageItem],
                  slot: bool = False) -> dict[str, Any]:
    """The JSON task body for ``images`` of a job, derived from the job's stored spec.

    Submission, retries and windows all build messages here, so a retried batch
    is processed exactly like the original one. ``slot`` marks a batch that
    holds one of its job's window slots.
    """
    return BatchMessage(
        job_id=job_id, kind=kind, models=spec["models"], strength=spec.get("strength", 1.0),
        strip_metadata=spec.get("strip_metadata", False), write_outputs=bool(spec.get("output")),
        output_root=spec.get("output"), align=bool(spec.get("align", False)),
        crop_border=int(spec.get("crop_border", 0)), images=list(images),
        output_format=spec.get("output_format"), quality=spec.get("quality"), sidecar=bool(spec.get("sidecar")),
        slot=slot,
    ).to_payload()


def job_queue(spec: dict[str, Any], settings: Settings) -> str:
    """The queue a job's batches go to: the one it was submitted to (recorded in its spec), or for a job submitted
    before queues were recorded, ``settings.queue``."""
    return str(spec.get("queue") or settings.queue)


def job_priority(spec: dict[str, Any]) -> int:
    """The broker priority of a job's batches (from the 0-9 priority it was submitted with)."""
    from jobs.celery_app import broker_priority

    return broker_priority(int(spec.get("priority", 5)))


def send_plain_batches(settings: Settings, job_id: str, kind: JobKind, spec: dict[str, Any],
                       items: Sequence[ImageItem], producer: Any = None, retry: bool = True) -> int:
    """Send ``items`` in batches of the job's batch size, outside any window, to the job's queue at its priority
    (a retry, the workers' sweep for abandoned images); returns how many messages were sent. ``retry=False`` tries
    each send once (a sender holding database rows must not wait on the broker)."""
    from jobs.celery_app import app_for

    app = app_for(settings)
    size = int(spec.get("batch_size") or settings.batch_size)
    queue, priority = job_queue(spec, settings), job_priority(spec)
    sent = 0
    with app.producer_or_acquire(producer) as producer:
        for start in range(0, len(items), size):
            app.send_task(PROCESS_BATCH_TASK, args=[batch_payload(job_id, kind, spec, items[start:start + size])],
                          queue=queue, priority=priority, producer=producer, retry=retry)
            sent += 1
    return sent


def send_window_batches(settings: Settings, job_id: str, kind: JobKind, spec: dict[str, Any],
                        producer: Any = None) -> int:
    """Send as many of a windowed job's unsent batches as its window allows now; returns how many were sent.

    The producer calls this after each chunk of listed images, a worker after each batch (the batch's slot was
    freed as its last image was recorded: :func:`db.queries.free_slots_of_finished_batches`), and a retry after
    relisting. A claimed batch whose images are no longer pending (all cancelled, or done by a retry) frees its
    slot at once and the next one is claimed instead. Raises what the broker raises when a message cannot be
    sent, after giving the claim back where it can.
    """
    from jobs.celery_app import app_for

    window = int(spec.get("window") or 0)
    if window < 1:
        return 0
    app = app_for(settings)
    queue, priority = job_queue(spec, settings), job_priority(spec)
    url = settings.resolved_database_url()
    sent = 0
    released = 0
    while True:
        with session_scope(url) as session:
            claimed = queries.claim_window_batches(session, job_id, window, released=released)
            pending = queries.pending_batch_items(session, job_id, claimed) if claimed else {}
        released = 0
        for position, number in enumerate(claimed):
            rows = pending.get(number)
            if not rows:  # nothing left to do in it: its slot is free again
                released += 1
                continue
            items = [ImageItem(input=i, output=o, reference=r) for i, o, r in rows]
            try:
                app.send_task(PROCESS_BATCH_TASK, args=[batch_payload(job_id, kind, spec, items, slot=True)],
                              queue=queue, priority=priority, producer=producer)
            except Exception:
                with session_scope(url) as session:  # the empty batches' slots are free whatever happens next
                    queries.release_window_slots(session, job_id, released)
                _give_back(url, job_id, claimed[position:])
                raise
            sent += 1
        if not released:
            return sent


def _give_back(url: str, job_id: str, unsent: Sequence[int]) -> None:
    """Return the claims of batches that were not sent, last first, as far as no later claim prevents it."""
    for number in reversed(unsent):
        with session_scope(url) as session:
            if not queries.unclaim_window_batch(session, job_id, number):
                log.error("could not send batches %s of job %s: their images stay pending until 'deblur retry "
                          "JOB --stalled' sends them", ", ".join(map(str, unsent)), job_id)
                return
