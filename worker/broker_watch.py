"""A broker that lost its messages is found within minutes, and the images they carried are sent again.

Redis keeps the queue's messages in memory. One restarted without persistence,
flushed by hand, or brought back from a snapshot older than its last writes has
lost every message sent since, and nothing tells the workers: the images those
messages carried stay pending for good (before this, only ``deblur retry
--stalled`` sent them again, once an operator noticed the backlog alert).

Each worker's main process, at every sweep
(:class:`worker.sweeper.AbandonedImageSweeper`, every ``DEBLUR_CLAIM_LEASE``
seconds), takes the queue's next count from the database and writes it to a key
of the broker (``deblur:broker-mark:QUEUE:DIGEST``, DIGEST naming the address
the workers use; it holds the database's token and the largest count written),
in one atomic step that also returns what the key held (a Lua script: a broker
restarting between a read and a write cannot slip in). The database keeps the
largest count confirmed written. A broker that holds no key, or less than
that, lost its data since (:meth:`BrokerWatch.check`): the moment is recorded
first, then the key written again, so a worker that dies in between leaves the
loss to be found again, not forgotten. One worker of
the queue at a time (a lease in the database) then sends again, in plain
batches, the images of the queue's jobs waiting for a message sent before that
moment (:meth:`BrokerWatch.send_lost`): pending, and for a windowed job in a
batch already sent. Send times are stamped by the database's clock before each
send, so no worker's or producer's clock decides what was lost. Nothing is lost
when a message survived after all: its second delivery finds the images done
or held, and takes nothing (:func:`db.queries.claim_images`). No transaction
waits on the broker.

What it does not see: messages sent between a snapshot and the broker's
crash when no sweep wrote the key in between (with Redis's append-only file,
as ``deploy/`` configures it, at most a second of writes); a loss before a
queue's first worker ever ran (there is no count to compare yet; once a worker
has served it, a loss while its workers are all stopped is found by the next
one's first sweep; ``deblur doctor`` names queues with waiting work and no
worker); jobs submitted before jobs recorded their queue, which are left to
``deblur retry --stalled`` (a warning names them).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

from db import broker_marks, queries
from db.engine import ensure_schema, session_scope
from jobs.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "deblur:broker-mark:"
BROKER_TIMEOUT_S = 5.0  # each script call on the broker (connecting, and waiting for its answer)
SEND_AT_ONCE = 5000  # images read, sent and stamped per step of a resend
MENDING_LEASE_S = 300.0  # how long one worker sends a loss's images before another may take over
# a loss stays open this long after it was found, however soon its images were sent again: a transaction that
# stamped images before the loss and sent them to the broker just before it lost them may still be committing
# (the sweep for abandoned images sends before it commits), and its images must be sent again too
MEND_GRACE_S = 120.0
# a count this young and never confirmed may be one whose first write is still on its way (the worker that
# started it writes it next): a key missing then is no loss; older, it is compared (its write's confirmation
# failed, and a broker that lost the key since lost what was sent meanwhile)
FIRST_WRITE_GRACE_S = 6 * BROKER_TIMEOUT_S

# KEYS[1]: the key; ARGV: token, count, confirmed count, mode. "check" writes only when the key holds this
# database's token with at least the confirmed count (a missing key counts 0); "seed" writes whatever it holds.
# The key keeps the largest count written, so workers writing out of order never make it go back. Returns what
# the key held ('' for nothing) and the verdict: ok, behind (missing, unreadable or short) or other (another
# database's token).
COMPARE_AND_WRITE = """
local old = redis.call('GET', KEYS[1])
local token, count = nil, nil
if old then
  local sep = string.find(old, ':', 1, true)
  if sep then
    token = string.sub(old, 1, sep - 1)
    count = tonumber(string.sub(old, sep + 1))
  end
else
  token, count = ARGV[1], 0
end
if ARGV[4] == 'check' then
  if count == nil then return {old, 'behind'} end
  if token ~= ARGV[1] then return {old, 'other'} end
  if count < tonumber(ARGV[3]) then return {old or '', 'behind'} end
end
local keep = 0
if token == ARGV[1] and count ~= nil then keep = count end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. string.format('%d', math.max(keep, tonumber(ARGV[2]))))
return {old or '', 'ok'}
"""


def broker_identity(url: str) -> str:
    """The broker's address without credentials, spelt one way (``redis://host:6379/0``: the default port and
    database written out), so workers whose URLs differ only in how they say it share one count."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.scheme == "unix" or not parts.hostname:
        database = (query.get("db") or query.get("virtual_host") or ["0"])[0] or "0"
        return f"{parts.scheme}://{parts.path}?db={database}"
    database = (parts.path or "/").lstrip("/") or (query.get("db") or ["0"])[0] or "0"
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}/{database}"


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
        # one key per address the workers use: a broker reached under two addresses keeps two counts, each with
        # its own row, instead of two rows whose counts fight over one key
        self.key = f"{KEY_PREFIX}{settings.queue}:{hashlib.sha256(self.broker.encode()).hexdigest()[:12]}"
        self.mend_grace_s = MEND_GRACE_S
        self.holder = uuid.uuid4().hex  # this watch, as the holder of a mending lease
        self._warned_legacy: set[str] = set()
        self._warned_tokens: set[bytes] = set()

    def _write(self, token: str, count: int, confirmed: int, mode: str) -> tuple[bytes, str]:
        """Run :data:`COMPARE_AND_WRITE` on the broker, through a connection made as Celery's own are (the same
        URL options, TLS included); returns what the key held and the verdict."""
        from jobs.celery_app import app_for

        options = {"socket_timeout": BROKER_TIMEOUT_S, "socket_connect_timeout": BROKER_TIMEOUT_S}
        with app_for(self.settings).connection_for_write(transport_options=options) as connection:
            client = connection.default_channel.client
            old, verdict = client.eval(COMPARE_AND_WRITE, 1, self.key, token, count, confirmed, mode)
        return bytes(old or b""), verdict.decode() if isinstance(verdict, bytes) else str(verdict)

    def check(self) -> bool:
        """Take the queue's next count and write it to the broker; True when the broker held no count, or less
        than was confirmed written, that is when it lost its data since (the loss is then recorded for
        :meth:`send_lost`). The first check of a queue starts its count and finds nothing."""
        url = self.settings.resolved_database_url()
        ensure_schema(url)
        with session_scope(url) as session:
            advanced = broker_marks.advance(session, self.broker, self.queue)
            if advanced is None:
                token = broker_marks.start(session, self.broker, self.queue)
                if token is None:  # another worker started the count: the next round compares
                    return False
                advanced = (1, 0, token, 0.0)
        counter, confirmed, token, age = advanced
        if confirmed == 0 and age < FIRST_WRITE_GRACE_S:
            # a count just started, by this round or another worker's a moment ago: nothing to compare yet, and a
            # key another database left (one replaced since) is taken over
            self._write(token, counter, 0, "seed")
            self._confirm(url, counter)
            return False
        # an older count whose first write was never confirmed (its database step failed) still compares: the key
        # may have been written, and a broker that lost it since lost what was sent meanwhile (if the write itself
        # failed, this costs the queue's waiting images a second message, nothing more)
        confirmed = max(confirmed, 1)
        old, verdict = self._write(token, counter, confirmed, "check")
        if verdict == "other":
            other = old.partition(b":")[0]
            if other not in self._warned_tokens:
                self._warned_tokens.add(other)
                log.error("the broker %s holds another database's count for queue %s: workers of two deployments "
                          "with different databases share this queue name, and take each other's batches; give "
                          "each deployment its own DEBLUR_QUEUE or Redis database (a key left by a database "
                          "replaced since: delete %s)", self.broker, self.queue, self.key)
            return False
        if verdict == "ok":
            self._confirm(url, counter)
            return False
        with session_scope(url) as session:  # recorded before the key is written again: a crash finds it again
            moment, losses, fresh = broker_marks.note_loss(session, self.broker, self.queue)
        with session_scope(url) as session:
            waiting = self._jobs_to_mend(session, moment)
        # a local stack restarted with nothing waiting is no news: said quietly
        log.log(logging.WARNING if waiting else logging.INFO,
                "the broker %s has lost queue %s's messages since the last check (it holds %s, %d was written): "
                "restarted without persistence, flushed, or restored from an older snapshot; the images of %d job(s) "
                "waiting for a message sent before %s are sent again", self.broker, self.queue,
                "no count" if not old else f"{old.decode(errors='replace')!r}", confirmed, len(waiting),
                moment.isoformat(timespec="seconds"))
        # a count taken now: another worker may have confirmed a larger one since this check took its own
        self._write(token, fresh, confirmed, "seed")
        self._confirm(url, fresh)
        with session_scope(url) as session:
            broker_marks.loss_rewritten(session, self.broker, self.queue, losses)
        return True

    def _confirm(self, url: str, counter: int) -> None:
        with session_scope(url) as session:
            broker_marks.confirm(session, self.broker, self.queue, counter)

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
        each job's batch size, if no other worker of the queue is doing it; returns how many were sent.

        Each step reads up to :data:`SEND_AT_ONCE` images, sends them (each message tried once), then stamps
        them with the time read before the send, so the next step and the next pass leave them. Nothing is held
        in the database while the broker is asked. A step whose send fails leaves its images for the next pass;
        one that dies after sending sends them twice, which loses nothing. The loss is over once nothing of it
        waits (unless another was found meanwhile)."""
        from jobs.messages import ImageItem
        from producer.dispatch import send_plain_batches

        url = self.settings.resolved_database_url()
        ensure_schema(url)
        with session_scope(url) as session:
            taken = broker_marks.take_mending(session, self.broker, self.queue, self.holder, MENDING_LEASE_S)
        if taken is None:
            return 0
        moment, losses = taken
        sent, complete = 0, False
        try:
            with session_scope(url) as session:
                job_ids = self._jobs_to_mend(session, moment)
            failed = False
            for job_id in job_ids:
                try:
                    while True:
                        with session_scope(url) as session:
                            # never before the loss's moment (a clock stepped back): stamped so, the images would
                            # be read again by the next step, for ever
                            stamp = max(queries.database_now(session), moment)
                            rows = queries.waiting_since(session, job_id, moment, limit=SEND_AT_ONCE)
                            job = queries.get_job(session, job_id)
                            kind, spec = job.kind, job.spec
                        if not rows:
                            break
                        items = [ImageItem(input=i, output=o, reference=r) for _, i, o, r in rows]
                        send_plain_batches(self.settings, job_id, kind, spec, items, retry=False)
                        with session_scope(url) as session:
                            stamped = queries.mark_sent(session, [row[0] for row in rows], stamp, moment)
                            still = broker_marks.renew_mending(session, self.broker, self.queue, self.holder,
                                                               MENDING_LEASE_S)
                        sent += len(rows)
                        if not still:
                            raise LeaseLost("another worker took over sending the lost images")
                        if len(rows) < SEND_AT_ONCE or not stamped:  # (claimed meanwhile: the next pass looks)
                            break
                except LeaseLost:
                    failed = True
                    break
                except Exception:  # the broker or the database: the next pass sends the rest
                    failed = True
                    log.exception("sending job %s's images again after the broker's loss failed; the next sweep "
                                  "tries again", job_id)
            if not failed:
                with session_scope(url) as session:
                    complete = (not self._jobs_to_mend(session, moment)
                                and queries.database_now(session) - moment > timedelta(seconds=self.mend_grace_s))
        finally:
            try:
                with session_scope(url) as session:
                    broker_marks.end_mending(session, self.broker, self.queue, self.holder, losses, mended=complete)
            except Exception:  # the database: the lease runs out by itself
                log.warning("could not end the lease on sending queue %s's lost images; it runs out in %.0f s",
                            self.queue, MENDING_LEASE_S)
        if sent:
            log.warning("sent %d image(s) again whose messages the broker lost", sent)
        if complete:
            log.info("every image the broker's loss of queue %s's messages took has been sent again", self.queue)
        return sent


class LeaseLost(Exception):
    """A worker's mending lease ran out and another worker took it over: the rest is that one's to send."""
