"""Images a lost worker left running are sent again within minutes, not after Redis's visibility timeout.

A worker node that dies (a machine lost, a container killed whole) leaves its
batch unacknowledged in Redis, which hands it to another worker only once
``DEBLUR_VISIBILITY_TIMEOUT`` has passed: an hour by default, chosen long so a
slow batch is not handed on while it still runs. The images the lost run held
stop having their lease renewed (:class:`worker.pipeline.LeaseKeeper`), and
that is a far quicker sign: every worker's main process looks, every
``DEBLUR_CLAIM_LEASE`` seconds, for images of its queue's jobs whose lease
ran out at least one whole lease ago (eight renewals missed), takes them back
(pending again, still in their batch, their lost start still counted) and
sends them in plain batches; each image is taken back only if still abandoned,
so two workers looking at once send it once (:func:`db.queries.take_back_abandoned`).
When Redis at last hands the old batch on, that delivery finds them done. A worker hung on one image stops renewing
after ``DEBLUR_IMAGE_TIME_LIMIT``, so its images are sent again too, and the
hung run writes nothing over them.
"""

from __future__ import annotations

import logging
import random
import threading

from db import queries
from db.engine import ensure_schema, session_scope
from jobs.errors import ConfigurationError
from jobs.settings import Settings

log = logging.getLogger(__name__)


class AbandonedImageSweeper:
    """A daemon thread that sends abandoned images again (:meth:`sweep`) every ``settings.claim_lease`` seconds,
    the first time after a random part of that (workers started together do not all look at once), and in the
    same rounds those whose messages the broker lost (:class:`worker.broker_watch.BrokerWatch`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.interval = float(settings.claim_lease)
        self.abandoned_for = float(settings.claim_lease)
        from worker.broker_watch import BrokerWatch, watches

        # the same rounds look for a broker that lost the queue's messages (worker.broker_watch)
        self.broker_watch = BrokerWatch(settings) if watches(settings.broker_url) else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deblur-sweeper", daemon=True)

    def start(self) -> "AbandonedImageSweeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def sweep(self) -> int:
        """Send again every abandoned image of this worker's queue's jobs; returns how many were sent."""
        url = self.settings.resolved_database_url()
        ensure_schema(url)
        with session_scope(url) as session:
            # only jobs of this worker's queue: a worker of another pool (another queue) may be unable to restore
            # them, and a job submitted before queues were recorded is left to 'deblur retry --stalled'
            job_ids = [job_id for job_id, spec in queries.jobs_with_abandoned_images(session, self.abandoned_for)
                       if (spec or {}).get("queue") == self.settings.queue]
        sent = 0
        for job_id in job_ids:
            try:
                count = self._send_again(url, job_id)
            except Exception:  # the broker or the database: the next sweep tries again
                log.exception("the sweep of job %s's abandoned images failed; the next sweep tries again", job_id)
                continue
            if count:
                log.warning("job %s: %d image(s) were left running by a worker that stopped renewing their lease "
                            "(lost, or hung), which ran out %.0f s ago or more; sent again", job_id, count,
                            self.abandoned_for)
            sent += count
        return sent

    def _send_again(self, url: str, job_id: str) -> int:
        """Take back one job's abandoned images and send them as plain batches, in one transaction: the messages
        are sent before it commits, so a broker that refuses them leaves the images as they were for the next
        sweep (a commit that fails after the send only sends them twice; the second finds them done). Each send
        is tried once, and a broker that stops answering fails it after the transport's socket timeout
        (:func:`jobs.celery_app.make_app`), so the transaction never holds its rows for long."""
        from jobs.messages import ImageItem
        from producer.dispatch import send_plain_batches

        with session_scope(url) as session:
            rows = queries.take_back_abandoned(session, job_id, self.abandoned_for)
            if not rows:
                return 0
            job = queries.get_job(session, job_id)
            items = [ImageItem(input=i, output=o, reference=r) for i, o, r in rows]
            send_plain_batches(self.settings, job_id, job.kind, job.spec, items, retry=False)
        return len(items)

    def _run(self) -> None:
        wait = self.interval * random.uniform(0.5, 1.0)
        while not self._stop.wait(wait):
            wait = self.interval
            try:
                self.sweep()
            except ConfigurationError as exc:  # a schema newer than this release, …: one line without a traceback,
                # and no broker watch this round: it needs the same database and would only fail the same way
                log.error("the sweep for abandoned images cannot run: %s", exc)
                continue
            except Exception:  # the database is away: the next sweep tries again
                log.exception("the sweep for abandoned images failed")
            if self.broker_watch is not None:
                try:
                    self.broker_watch.check()
                    self.broker_watch.send_lost()
                except Exception:  # the broker or the database is away: the next round compares again
                    log.exception("the check for messages the broker lost failed; the next sweep, in %.0f s, "
                                  "tries again", self.interval)
