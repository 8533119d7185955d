"""The Celery task the producer sends: ``deblur.process_batch``.

Importing this module is cheap and torch-free (the prefork parent imports it
before forking); the work itself happens in :mod:`worker.pipeline`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from jobs.celery_app import app, app_for
from jobs.errors import DeviceFailure, InputError, TransientError, UnknownJobError, describe_failure
from jobs.messages import CLAIMS_GONE_COMMAND, PROCESS_BATCH_TASK, BatchMessage, needs_newer_worker, readable_part
from jobs.notify import NOTIFY_TASK, body, deliver
from jobs.settings import Settings
from worker import control as _control  # noqa: F401 - registers the workers' remote-control answers
from worker import runtime

log = logging.getLogger(__name__)

# A batch from a newer release is sent again this many seconds later, this many times, for a worker that can read
# it (30 minutes in all), then its images fail, to be retried once the workers are upgraded.
NEWER_RELEASE_RETRY_S = 60
NEWER_RELEASE_RETRIES = 30


@worker_process_init.connect
def _child_started(**_: Any) -> None:
    # Runs in each pool child (and in --pool solo). Keep it fast: Celery kills a child that blocks here longer
    # than worker_proc_alive_timeout (60 s here, for torch's import), so models load on first use.
    runtime.init_process()


@worker_process_shutdown.connect
def _child_stopping(**_: Any) -> None:
    try:
        runtime.release()
    except Exception:  # never let clean-up crash the shutdown
        log.exception("error while releasing models")


_sweeper: list[Any] = []  # the main process's AbandonedImageSweeper, once the worker is ready


@worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    if sender is not None and getattr(sender, "hostname", None):
        runtime.set_hostname(sender.hostname)
    # the main process, which outlives its pool: images a lost worker left are sent again within minutes
    from worker.sweeper import AbandonedImageSweeper

    if not _sweeper:
        _sweeper.append(AbandonedImageSweeper(runtime.settings()).start())


@worker_shutdown.connect
def _stopping(**_: Any) -> None:
    while _sweeper:
        _sweeper.pop().stop()


def _newer_release_batch(task: Any, payload: dict[str, Any], error: Exception) -> dict[str, int]:
    """A batch sent by a newer release during a rolling upgrade: never dropped.

    It is sent again a minute later (kept by a worker until then, so it neither holds a pool slot nor jumps ahead
    of other work), for a worker of that release; after half an hour of that its images fail with the reason,
    so they are not left pending for good: ``deblur retry JOB --failed`` once the workers are upgraded.
    """
    from worker.pipeline import batch_counts

    job_id = payload.get("job_id")
    reason = describe_failure(error)
    if task.request.retries < NEWER_RELEASE_RETRIES:
        log.warning("batch of job %s needs a newer worker than this one (%s): sent again in %d s (%d of %d); "
                    "upgrade this worker", job_id, reason, NEWER_RELEASE_RETRY_S, task.request.retries + 1,
                    NEWER_RELEASE_RETRIES)
        raise task.retry(countdown=NEWER_RELEASE_RETRY_S, max_retries=None)
    readable = readable_part(payload)
    if readable is None:
        log.error("dropping a batch of job %s that no worker could read: %s", job_id, reason)
        return batch_counts(0, 0)
    settings = runtime.settings()
    failed = _fail_or_wait(task, readable, settings, f"needs a newer worker than any that took it "
                           f"({reason}); upgrade the workers, then 'deblur retry {job_id} --failed'")
    log.error("no newer worker took a batch of job %s in %d minutes: failed its %d images", job_id,
              NEWER_RELEASE_RETRY_S * NEWER_RELEASE_RETRIES // 60, failed)
    send_next_batch(readable, settings)  # the job's next batch goes out if its failing freed a slot
    return batch_counts(0, failed)


DATABASE_WAIT_S = 300


def _fail_or_wait(task: Any, message: BatchMessage, settings: Any, error: str) -> int:
    """Fail the batch's unfinished images with ``error`` (:func:`worker.pipeline.fail_batch`); returns how many.

    If the database cannot take that either, the task is sent again in five minutes instead: acknowledged with
    nothing recorded, its images would stay 'running' for good (and a windowed job's slot with them).
    """
    from worker.pipeline import fail_batch

    try:
        return fail_batch(message, settings, error)
    except OperationalError as exc:
        log.error("batch of job %s: the database does not answer (%s); the batch is tried again in %d s",
                  message.job_id, exc, DATABASE_WAIT_S)
        raise task.retry(countdown=DATABASE_WAIT_S, max_retries=None) from None


CLAIMS_QUESTION_TIMEOUT_S = 1.0  # how long a second delivery waits for the holders' workers to answer


def gone_claims(holders: dict[str, str], settings: Settings) -> set[str]:
    """The claims among ``holders`` (claim -> the worker whose run made it) that their own worker says were made
    by a process of its own that is gone (:data:`jobs.messages.CLAIMS_GONE_COMMAND`). Each worker's answer counts
    for its own claims only; a worker that does not answer within a second (lost, busy, or of an older release)
    vouches for nothing, and its leases are waited out. Asked through ``settings``' broker."""
    by_worker: dict[str, list[str]] = {}
    for claim, worker in holders.items():
        by_worker.setdefault(worker, []).append(claim)
    try:
        replies = app_for(settings).control.broadcast(
            CLAIMS_GONE_COMMAND, arguments={"claims": sorted(holders)}, destination=sorted(by_worker), reply=True,
            limit=len(by_worker), timeout=CLAIMS_QUESTION_TIMEOUT_S) or []
    except Exception as exc:  # the broker: the leases are waited out, as for a worker that does not answer
        log.warning("could not ask workers %s about their batch runs: %s", ", ".join(sorted(by_worker)), exc)
        return set()
    gone: set[str] = set()
    for reply in replies:
        for worker, answer in reply.items():
            if isinstance(answer, dict) and isinstance(answer.get("gone"), list):
                gone.update(set(answer["gone"]) & set(by_worker.get(worker, ())))
    return gone


@app.task(name=PROCESS_BATCH_TASK, bind=True, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def process_batch(self, payload: dict[str, Any]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Restore (or evaluate) one batch of images; see :func:`worker.pipeline.run_batch`."""
    from worker.pipeline import batch_counts, run_batch

    if self.request.hostname:
        runtime.set_hostname(self.request.hostname)
    try:
        message = BatchMessage.from_payload(payload)
    except (ValidationError, ValueError) as exc:
        if needs_newer_worker(payload, exc):
            return _newer_release_batch(self, payload, exc)
        # A malformed message can never succeed: it is dropped (acked), and the images it names, where they can
        # be read, are failed with the reason instead of left pending for good (with its window slot)
        log.error("dropping malformed batch message: %s", exc)
        readable = readable_part(payload) if isinstance(payload, dict) else None
        if readable is None:
            return batch_counts(0, 0)
        settings = runtime.settings()
        failed = _fail_or_wait(self, readable, settings, f"the batch message was malformed "
                               f"({describe_failure(exc)}); 'deblur retry {readable.job_id} --failed' sends it anew")
        send_next_batch(readable, settings)
        return batch_counts(0, failed)
    settings = runtime.settings()
    # the broker's priority of this delivery, so the rest of an out-of-time batch waits no longer than it did
    priority = (self.request.delivery_info or {}).get("priority")

    def hand_over(rest: BatchMessage, countdown: float | None = None) -> None:
        try:
            app_for(settings).send_task(PROCESS_BATCH_TASK, args=[rest.to_payload()], queue=settings.queue,
                                        priority=priority, countdown=countdown)
        except Exception as exc:  # the images were released: retrying the batch processes them here
            raise TransientError(f"could not hand the rest of the batch to a new task: {exc}") from exc

    try:
        counts = run_batch(message, settings, hand_over, lambda holders: gone_claims(holders, settings))
    except DeviceFailure as exc:
        stop_consuming(settings)
        log.critical("%s. This worker (%s) takes no more batches from %r; the batch's other images went back to the "
                     "queue for the other workers. Check the device, then restart this worker.", exc,
                     runtime.hostname(), settings.queue)
        counts = exc.counts or batch_counts(0, 0)
    except (TransientError, OperationalError) as exc:
        retries = self.request.retries
        if retries >= settings.task_max_retries:
            log.error("batch of job %s failed after %d retries: %s", message.job_id, retries, exc)
            counts = batch_counts(0, _fail_or_wait(self, message, settings, f"gave up after {retries} retries: {exc}"))
        else:
            countdown = min(300, 2 ** retries * 5)
            log.warning("transient error on job %s (retry %d in %ds): %s", message.job_id, retries + 1, countdown,
                        exc)
            raise self.retry(exc=exc, countdown=countdown) from None
    except Exception as exc:
        # A bug outside one image's restoration (recording the batch, say). The task is acknowledged either way,
        # so without this its images would stay 'running' for good; failed, they show in 'deblur results --failed'
        # with the reason, and 'deblur retry JOB --failed' sends them again once it is mended.
        log.exception("batch of job %s failed", message.job_id)
        error = f"internal error while processing the batch: {type(exc).__name__}: {exc}"
        counts = batch_counts(0, _fail_or_wait(self, message, settings, error))
    # frees nothing itself (the recording did, once, whatever message it came in): fills whatever room the job's
    # window has, which a plain batch ('retry --stalled' on a job still being listed) may have made too
    send_next_batch(message, settings)
    return counts


SEND_NEXT_ATTEMPTS = 5  # 1 + 2 + 4 + 8 s between them: a broker or database blip of half a minute


def send_next_batch(message: BatchMessage, settings: Any) -> None:
    """A batch ended: send its job's next batches as the window allows (:mod:`producer.dispatch`; nothing for a job
    without a window). A slot is freed in the transaction that records its batch's last image
    (:func:`db.queries.free_slots_of_finished_batches`), exactly once however often the batch was delivered and
    whatever message recorded it, so a copy of a batch that finds nothing left to do frees nothing and only sends
    what the window has room for.

    The batch itself is recorded and stays acknowledged whatever happens here (retrying the task would run it
    again). A broker or database that does not take the next batch is tried again for half a minute, then the
    job waits for its next batch to finish, or for ``deblur retry JOB --stalled``, as the error says.
    """
    from db import queries
    from db.engine import session_scope
    from producer.dispatch import send_window_batches

    url = settings.resolved_database_url()
    for attempt in range(SEND_NEXT_ATTEMPTS):
        try:
            with session_scope(url) as session:
                spec = queries.job_spec(session, message.job_id)
            if spec is None:
                return
            send_window_batches(settings, message.job_id, message.kind, spec)
            return
        except Exception as exc:  # the broker or the database: try again, then say what to do
            if attempt + 1 == SEND_NEXT_ATTEMPTS:
                log.error("job %s: could not send its next batch (%s: %s); it goes on when another of its batches "
                          "finishes, or after 'deblur retry %s --stalled'", message.job_id, type(exc).__name__, exc,
                          message.job_id)
                return
            log.warning("job %s: could not send its next batch, trying again: %s", message.job_id, exc)
            time.sleep(2 ** attempt)


def stop_consuming(settings: Settings) -> None:
    """Ask this worker node to stop consuming its queue (a broadcast through the broker; it stays up, idle,
    visible in Flower), so a failed GPU does not swallow batch after batch."""
    try:
        app_for(settings).control.cancel_consumer(settings.queue, destination=[runtime.hostname()])
    except Exception:  # the broker is down: the next batch fails the same way and asks again
        log.exception("could not ask this worker to stop consuming %r", settings.queue)


@app.task(name=NOTIFY_TASK, bind=True, max_retries=None, acks_late=True)
def notify_job(self, job_id: str, delivery: str) -> str:  # type: ignore[no-untyped-def]
    """POST a finished job's status to the URL it was submitted with (see :mod:`jobs.notify`).

    A receiver that cannot be reached or answers 5xx/408/429 is tried again after 5 s, doubling to at most
    10 minutes, ``DEBLUR_NOTIFY_MAX_RETRIES`` times; any other answer is final. Returns what happened (Flower
    shows it).
    """
    from producer.tracking import job_status

    settings = runtime.settings()
    url: str | None = None
    try:
        info = job_status(settings, job_id)
        url = (info.get("spec") or {}).get("notify_url")
        if not url:
            return "no notify URL"
        status = deliver(url, body(info, delivery), settings.notify_secret, allow=settings.notify_allowed_networks())
    except UnknownJobError:
        log.error("not notifying: job %s does not exist", job_id)
        return "unknown job"
    except (TransientError, OperationalError) as exc:  # the receiver, or the database the status comes from
        retries = self.request.retries
        if retries >= settings.notify_max_retries:
            log.error("gave up notifying %s of job %s after %d retries: %s", url, job_id, retries, exc)
            return f"gave up: {exc}"
        countdown = min(600, 5 * 2 ** retries)
        log.warning("notification of job %s not delivered (retry %d in %ds): %s", job_id, retries + 1, countdown, exc)
        raise self.retry(exc=exc, countdown=countdown) from None
    except InputError as exc:
        log.error("notification of job %s refused: %s", job_id, exc)
        return f"refused: {exc}"
    return f"delivered to {url} ({status})"
