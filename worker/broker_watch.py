"""A broker that lost its messages is found within minutes, and the images they carried are sent again.

Redis keeps the queue's messages in memory. One restarted without persistence,
flushed by hand, or brought back from a snapshot older than its last writes has
lost every message sent since, and nothing tells the workers: the images those
messages carried stay pending for good (before this, only ``deblur retry
--stalled`` sent them again, once an operator noticed the backlog alert).

Each worker's main process keeps a count per queue, in the database and in a
key of the broker (``deblur:broker-mark:QUEUE``, holding the database's token
and the count), and at every sweep
(:class:`worker.sweeper.AbandonedImageSweeper`, every ``DEBLUR_CLAIM_LEASE``
seconds) adds one to both, holding the database's row meanwhile so the queue's
workers take turns. A broker that holds no key, or a smaller count than the
database's last, lost its data since it was written (:meth:`BrokerWatch.check`).
The moment is recorded, and the images of the queue's jobs waiting for a
message sent before it are sent again in plain batches
(:meth:`BrokerWatch.send_lost`): pending, and for a windowed job in a batch
already sent. Nothing is lost when a message survived after all: its second
delivery finds the images done or held, and takes nothing
(:func:`db.queries.claim_images`).

What it does not see: messages sent between a snapshot and the broker's
crash when no sweep wrote the key in between (with Redis's append-only file,
as ``deploy/`` configures it, at most a second of writes); a queue no worker
serves (nobody compares its count; its images wait for a worker, and its first
sweep finds the loss); jobs submitted before jobs recorded their queue, which
are left to ``deblur retry --stalled`` (a warning names them).
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

from db import broker_marks, queries
from db.engine import ensure_schema, session_scope
from jobs.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "deblur:broker-mark:"
BROKER_TIMEOUT_S = 5.0  # the count's reads and writes: the queue's row is held meanwhile
SEND_AT_ONCE = 5000  # images taken and sent per transaction, so a large backlog never holds its rows for long


def broker_identity(url: str) -> str:
    """The broker's address without credentials (``redis://host:6379/0``): which broker a count belongs to."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    query = parse_qs(parts.query)
    database = (query.get("db") or query.get("virtual_host") or [""])[0]
    return f"{parts.scheme}://{host}{parts.path or '/'}" + (f"?db={database}" if database else "")


def watches(url: str) -> bool:
    """Whether a broker at ``url`` can be watched: Redis (a ``memory://`` broker lives and dies with its process)."""
    return url.startswith(("redis://", "rediss://", "unix://"))


class BrokerWatch:
    """Finds a broker that lost the queue's messages (:meth:`check`) and sends their images again
    (:meth:`send_lost`), for the workers of ``settings.queue``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker = broker_identity(settings.broker_url)
        self.queue = settings.queue
        self.key = KEY_PREFIX + settings.queue
        self._redis = None
        self._warned_legacy: set[str] = set()
        self._warned_tokens: set[str] = set()

    def _client(self):  # type: ignore[no-untyped-def]
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.settings.broker_url, socket_timeout=BROKER_TIMEOUT_S,
                                               socket_connect_timeout=BROKER_TIMEOUT_S)
        return self._redis

    def check(self) -> bool:
        """Add one to the queue's count in the database and in the broker; True when the broker's was missing or
        behind, that is when it lost its data since the last check (the loss is then recorded for
        :meth:`send_lost`). The first check of a queue starts its count and finds nothing."""
        url = self.settings.resolved_database_url()
        ensure_schema(url)
        client = self._client()
        with session_scope(url) as session:
            advanced = broker_marks.advance(session, self.broker, self.queue)
            if advanced is None:
                token = broker_marks.start(session, self.broker, self.queue)
                if token is not None:
                    client.set(self.key, f"{token}:1")  # before the commit: a broker that refuses it leaves no count
                return False
            counter, token = advanced
            seen = client.get(self.key)
            seen_token, seen_count = _parse(seen)
            if seen_token is not None and seen_token != token:
                # another database's workers count on this broker under the same queue name: their messages and
                # ours mix, which is no loss to mend (sending everything again at every check would flood it)
                if seen_token not in self._warned_tokens:
                    self._warned_tokens.add(seen_token)
                    log.error("the broker %s holds another database's count for queue %s: workers of two "
                              "deployments with different databases share this queue name, and take each other's "
                              "batches; give each deployment its own DEBLUR_QUEUE or Redis database",
                              self.broker, self.queue)
                lost = False
            else:
                lost = seen_count is None or seen_count < counter - 1
            if lost:
                moment = broker_marks.note_loss(session, self.broker, self.queue)
                log.warning(
                    "the broker %s has lost queue %s's messages since the last check (it holds %s, the database "
                    "counted %d): restarted without persistence, flushed, or restored from an older snapshot; the "
                    "images waiting for a message sent before %s are sent again", self.broker, self.queue,
                    "no count" if seen_count is None else f"count {seen_count}", counter - 1,
                    moment.isoformat(timespec="seconds"))
            else:
                moment = broker_marks.loss_to_mend(session, self.broker, self.queue)
                if moment is not None and not self._jobs_to_mend(session, moment):
                    broker_marks.mended(session, self.broker, self.queue)
                    log.info("every image the broker's loss of queue %s's messages took has been sent again",
                             self.queue)
            client.set(self.key, f"{token}:{counter}")
        return lost

    def _jobs_to_mend(self, session, moment) -> list[str]:  # type: ignore[no-untyped-def]
        """This queue's jobs with images waiting for a message sent before ``moment``; jobs that recorded no queue
        are named in a warning (once) and left to ``deblur retry --stalled``."""
        jobs = []
        for job_id, spec in queries.jobs_waiting_since(session, moment):
            queue = (spec or {}).get("queue")
            if queue == self.queue:
                jobs.append(job_id)
            elif queue is None and job_id not in self._warned_legacy:
                self._warned_legacy.add(job_id)
                log.warning("job %s was submitted before jobs recorded their queue, and the broker has lost "
                            "messages: send its waiting images again with 'deblur retry %s --stalled'", job_id, job_id)
        return jobs

    def send_lost(self) -> int:
        """Send again the images of the queue's jobs that wait for a message the broker lost, in plain batches of
        each job's batch size; returns how many were sent. Each part is taken and sent in one transaction, sent
        before it commits (tried once: the rows are held meanwhile), so a broker that refuses it leaves the
        images for the next sweep."""
        from jobs.messages import ImageItem
        from producer.dispatch import send_plain_batches

        url = self.settings.resolved_database_url()
        ensure_schema(url)
        with session_scope(url) as session:
            moment = broker_marks.loss_to_mend(session, self.broker, self.queue)
            if moment is None:
                return 0
            job_ids = self._jobs_to_mend(session, moment)
        sent = 0
        for job_id in job_ids:
            try:
                while True:
                    with session_scope(url) as session:
                        rows = queries.take_waiting_since(session, job_id, moment, limit=SEND_AT_ONCE)
                        if rows:
                            job = queries.get_job(session, job_id)
                            items = [ImageItem(input=i, output=o, reference=r) for i, o, r in rows]
                            send_plain_batches(self.settings, job_id, job.kind, job.spec, items, retry=False)
                    sent += len(rows)
                    if len(rows) < SEND_AT_ONCE:
                        break
            except Exception:  # the broker or the database: the next sweep sends the rest
                log.exception("sending job %s's images again after the broker's loss failed; the next sweep tries "
                              "again", job_id)
        if sent:
            log.warning("sent %d image(s) again whose messages the broker lost", sent)
        return sent


def _parse(seen: bytes | None) -> tuple[str | None, int | None]:
    """The token and count a broker's key holds (``TOKEN:COUNT``); (None, None) for a missing or unreadable one."""
    if seen is None:
        return None, None
    token, _, count = seen.decode("ascii", errors="replace").partition(":")
    try:
        return token, int(count)
    except ValueError:
        return None, None
