"""Prometheus metrics for operators: the backlog, throughput, stalls and health of the whole queue.

Flower's ``/metrics`` describes Celery tasks and workers; an operator scaling
workers also needs what only the database and the broker know: how many
images are waiting and how old the oldest job is, how many images finished
(and failed) lately and how many megapixels that was, which images lost their
worker or stalled past the visibility timeout, and how many batches wait at
each priority in each queue with unfinished jobs (not only this process's
``DEBLUR_QUEUE``: a job keeps the queue it was submitted to).
:func:`render_metrics` reads those at scrape time and returns the Prometheus
text format; the API serves it at ``/metrics`` and ``deblur metrics`` prints
it or writes it for node_exporter's textfile collector.

A scrape never fails because a dependency is down: ``deblur_up`` says which
one did not answer (within :data:`SOURCE_TIMEOUT_S`) and that source's series
are left out, so an alert on ``deblur_up == 0`` fires instead of the scrape
going stale.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from db import queries
from db.engine import ensure_schema, session_scope
from db.queries import as_utc
from jobs.errors import describe_failure
from jobs.settings import Settings
from producer.tracking import format_duration

log = logging.getLogger(__name__)

RECENT_WINDOW_S = 900  # the "recently" of the throughput figures: long enough to span a few slow batches
SOURCE_TIMEOUT_S = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

T = TypeVar("T")


def call_with_time_limit(function: Callable[[], T], seconds: float) -> T:
    """``function()``, or :class:`TimeoutError` after ``seconds``.

    The call is left to finish in a daemon thread: a hung database or store must hold back neither the answer
    nor the process's exit (a pool's worker threads are joined at exit, so 'deblur metrics' from cron would wait
    for the hung call and pile up).
    """
    outcome: Future[T] = Future()

    def run() -> None:
        try:
            outcome.set_result(function())
        except BaseException as exc:  # handed to the caller, who raises it
            outcome.set_exception(exc)

    threading.Thread(target=run, name="time-limit", daemon=True).start()
    try:
        return outcome.result(timeout=seconds)
    except FutureTimeout:
        raise TimeoutError(f"no answer within {seconds:g} s") from None


def priority_list_name(queue: str, user_priority: int) -> str:
    """The Redis list that holds ``queue``'s batches submitted at ``user_priority`` (0 lowest … 9 most urgent)."""
    from kombu.transport.redis import Channel

    from jobs.celery_app import broker_priority

    step = broker_priority(user_priority)  # kombu's Redis transport keeps one list per step; step 0 is the queue's
    return f"{queue}{Channel.sep}{step}" if step else queue


@dataclass(frozen=True)
class BrokerSnapshot:
    """Batches waiting in the broker, by queue and user priority, and batches taken by workers but not yet
    acknowledged (one hash for every queue of the Redis database).

    ``by_queue`` holds the configured queue (``configured``) and every queue unfinished jobs were submitted to:
    jobs submitted with another ``DEBLUR_QUEUE`` wait there, and nothing else would show them.
    """

    configured: str
    by_queue: dict[str, dict[int, int]]
    unacked: int

    @property
    def waiting(self) -> dict[int, int]:
        """Batches waiting by priority, summed over every queue read (the API's ``waiting_batches``)."""
        total: dict[int, int] = {}
        for waiting in self.by_queue.values():
            for priority, count in waiting.items():
                total[priority] = total.get(priority, 0) + count
        return total


def queues_to_read(configured: str, recorded: Iterable[str | None]) -> list[str]:
    """``configured`` first, then the other queues of ``recorded`` (the queues unfinished jobs were submitted to),
    sorted; a job that predates recorded queues is sent again to the configured queue, so None counts there."""
    return [configured, *sorted({queue for queue in recorded if queue} - {configured})]


def broker_snapshot(settings: Settings, recorded: Iterable[str | None] = ()) -> BrokerSnapshot:
    """Read the lists of the configured queue and of the ``recorded`` ones from the Redis broker, in one round
    trip (a pipeline), however many queues there are."""
    import redis
    from kombu.transport.redis import Channel

    from jobs.celery_app import PRIORITY_LEVELS

    queues = queues_to_read(settings.queue, recorded)
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=SOURCE_TIMEOUT_S,
                                  socket_connect_timeout=SOURCE_TIMEOUT_S)
    try:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for priority in range(PRIORITY_LEVELS):
                pipe.llen(priority_list_name(queue, priority))
        pipe.hlen(Channel.unacked_key)
        *lengths, unacked = pipe.execute()
    finally:
        client.close()
    by_queue = {queue: {p: int(lengths[i * PRIORITY_LEVELS + p]) for p in range(PRIORITY_LEVELS)}
                for i, queue in enumerate(queues)}
    return BrokerSnapshot(configured=settings.queue, by_queue=by_queue, unacked=int(unacked))


def queue_age_seconds(moment: datetime | None, now: datetime) -> float:
    """Seconds from ``moment`` (naive: UTC, as SQLite stores it) to ``now``; 0 for no moment."""
    return 0.0 if moment is None else max(0.0, (now - as_utc(moment)).total_seconds())


def _gauge(name: str, documentation: str, value: float | None = None, labels: tuple[str, ...] = (),
           samples: dict[tuple[str, ...], float] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, value=value, labels=list(labels) if labels else None)
    for label_values, sample in (samples or {}).items():
        family.add_metric(list(label_values), sample)
    return family


@dataclass(frozen=True)
class QueueState:
    """The queue read at ``now``: the database's snapshot and the broker's, ``None`` where the source did not
    answer (``down`` names it, with the reason); a ``memory://`` broker has no lists and is not down."""

    now: datetime
    database: queries.OperationsSnapshot | None
    broker: BrokerSnapshot | None
    down: dict[str, str]


def read_queue_state(settings: Settings) -> QueueState:
    """Read the database and the broker, each within :data:`SOURCE_TIMEOUT_S`; never raises for a source that is
    down (it is logged and named in ``down``)."""
    now = datetime.now(timezone.utc)
    db_url = settings.resolved_database_url()
    down: dict[str, str] = {}

    def read(source: str, function: Callable[[], T]) -> T | None:
        try:
            return call_with_time_limit(function, SOURCE_TIMEOUT_S)
        except Exception as exc:  # any failure means "down"; a scrape must still answer
            down[source] = describe_failure(exc)
            log.warning("metrics: the %s did not answer: %s", source, down[source])
            return None

    def read_database() -> tuple[queries.OperationsSnapshot, set[str | None]]:
        ensure_schema(db_url)
        with session_scope(db_url) as session:
            snapshot = queries.operations_snapshot(
                session, stalled_before=now - timedelta(seconds=settings.visibility_timeout),
                recent_since=now - timedelta(seconds=RECENT_WINDOW_S))
            return snapshot, queries.queues_of_unfinished_jobs(session)

    found = read("database", read_database)
    # with the database down, only the configured queue's lists can be named
    database, recorded = found if found is not None else (None, set())
    broker = None
    if not settings.broker_url.startswith("memory://"):
        broker = read("broker", lambda: broker_snapshot(settings, recorded))
    return QueueState(now=now, database=database, broker=broker, down=down)


class QueueCollector(Collector):
    """Everything :func:`render_metrics` exposes, read afresh on every collection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.down: dict[str, str] = {}  # the sources that did not answer the last collection, with the reason

    def collect(self) -> Iterator[GaugeMetricFamily]:
        started = time.perf_counter()
        state = read_queue_state(self.settings)
        self.down = state.down
        snapshot, broker = state.database, state.broker
        yield _gauge("deblur_up", "1 if the source (database, broker) answered this scrape, else 0; "
                     "its series are missing while it is 0.", labels=("source",),
                     samples={(source,): float(source not in state.down) for source in ("database", "broker")})
        if snapshot is not None:
            yield from self._database_families(snapshot, state.now)
        if broker is not None:
            yield _gauge("deblur_broker_waiting_batches",
                         "Batches waiting in the broker for a worker, by queue (the configured one and every "
                         "queue unfinished jobs were submitted to) and the priority they were submitted at "
                         "(0 lowest, 9 most urgent).", labels=("queue", "priority"),
                         samples={(queue, str(p)): n for queue, waiting in broker.by_queue.items()
                                  for p, n in waiting.items()})
            yield _gauge("deblur_broker_unacked_batches",
                         "Batches taken by a worker and not yet acknowledged (all queues of this Redis database); "
                         "those of a dead worker return to the queue after the visibility timeout.",
                         value=broker.unacked)
        yield _gauge("deblur_recent_window_seconds",
                     "The window of the *_recently series: outcomes within this many seconds of the scrape.",
                     value=RECENT_WINDOW_S)
        yield _gauge("deblur_scrape_duration_seconds", "Seconds this scrape took to read the database and broker.",
                     value=time.perf_counter() - started)

    @staticmethod
    def _database_families(snap: queries.OperationsSnapshot, now: datetime) -> Iterator[GaugeMetricFamily]:
        yield _gauge("deblur_jobs", "Jobs by status (every job the database holds).", labels=("status",),
                     samples={(s,): n for s, n in snap.jobs.items()})
        yield _gauge("deblur_backlog_images",
                     "Images of unfinished jobs (submitting, queued, running, paused) by status: pending and "
                     "running are the work left.", labels=("status",),
                     samples={(s,): n for s, n in snap.backlog.items()})
        yield _gauge("deblur_oldest_unfinished_job_age_seconds",
                     "Seconds since the oldest unfinished job was submitted (0 with none).",
                     value=queue_age_seconds(snap.oldest_unfinished_created, now))
        yield _gauge("deblur_stalled_images",
                     "Images running for longer than the visibility timeout whose worker stopped renewing their "
                     "lease, and that neither the workers' sweep nor the broker sent again: no worker of their "
                     "queue runs, the job predates recorded queues, or the broker's lists were flushed. "
                     "'deblur retry JOB --stalled' re-enqueues them.",
                     value=snap.stalled)
        yield _gauge("deblur_worker_lost_images",
                     "Images of unfinished jobs whose worker died at least once since their last outcome (a crash, "
                     "an OOM kill); an image that kills 3 workers is failed as poison.", value=snap.worker_lost)
        yield _gauge("deblur_images_finished_recently",
                     f"Images that reached an outcome in the last {RECENT_WINDOW_S} s, by outcome.",
                     labels=("status",), samples={(s,): n for s, n in snap.finished_recently.items()})
        yield _gauge("deblur_megapixels_restored_recently",
                     f"Megapixels of the images restored in the last {RECENT_WINDOW_S} s.",
                     value=snap.megapixels_recently)
        yield _gauge("deblur_inference_seconds_recently",
                     f"Model seconds spent on the images restored in the last {RECENT_WINDOW_S} s (divide by "
                     "deblur_images_finished_recently{status=\"done\"} for seconds per image).",
                     value=snap.inference_s_recently)


@dataclass(frozen=True)
class Exposition:
    """A scrape's text (Prometheus format) and the sources that did not answer it."""

    text: str
    down: dict[str, str]


def render_metrics(settings: Settings) -> Exposition:
    """The Prometheus text exposition of the queue described by ``settings``, read now."""
    collector = QueueCollector(settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return Exposition(text=text, down=dict(collector.down))


def describe_queue(state: QueueState) -> list[str]:
    """A few lines for people (``deblur status`` without a job): the work left, what finished lately, what is
    stuck, and the broker's waiting batches by priority (and by queue: :func:`describe_broker`)."""
    lines: list[str] = []
    db = state.database
    if db is not None:
        waiting, running = db.backlog["pending"], db.backlog["running"]
        unfinished = sum(db.jobs[s] for s in queries.UNFINISHED_JOB_STATUSES)
        line = f"queue: {waiting:,} images waiting and {running:,} running in {unfinished:,} unfinished jobs"
        if unfinished:
            age = queue_age_seconds(db.oldest_unfinished_created, state.now)
            line += f" (the oldest submitted {format_duration(age)} ago)"
        if db.jobs.get("paused"):
            line += f"; {db.jobs['paused']:,} paused ('deblur resume JOB')"
        lines.append(line)
        done, failed = db.finished_recently["done"], db.finished_recently["failed"]
        recent = f"last {RECENT_WINDOW_S // 60} min: {done:,} restored, {failed:,} failed"
        if done:
            recent += (f"; {_per_minute(done)} images/min, {_per_minute(db.megapixels_recently)} MP/min, "
                       f"{db.inference_s_recently / done:.1f} model s per image")
        lines.append(recent)
        if db.stalled:
            lines.append(f"stalled: {db.stalled:,} images have run longer than the visibility timeout, their "
                         "worker stopped renewing their lease and nothing sent them again (no worker of their queue "
                         "runs, the job predates recorded queues, or the broker's lists were flushed); 'deblur retry "
                         "JOB --stalled' sends them again")
        if db.worker_lost:
            lines.append(f"{db.worker_lost:,} images lost their worker (a crash or an OOM kill) and wait for "
                         "redelivery; see the workers' logs")
    if state.broker is not None:
        lines.append(describe_broker(state.broker))
    for source, reason in state.down.items():
        lines.append(f"the {source} did not answer: {reason}")
    return lines


def describe_broker(broker: BrokerSnapshot) -> str:
    """The broker's line of ``deblur status``: the batches waiting in every queue with work, by priority, and by
    queue as soon as any wait outside the configured queue (a job submitted with another ``DEBLUR_QUEUE``, which
    this installation's workers may not consume)."""
    waiting = broker.waiting
    total = sum(waiting.values())
    details = [", ".join(f"priority {p}: {n:,}" for p, n in sorted(waiting.items(), reverse=True) if n)]
    by_queue = {queue: sum(counts.values()) for queue, counts in broker.by_queue.items()}
    if any(n for queue, n in by_queue.items() if queue != broker.configured):
        details.append("by queue: " + ", ".join(f"{queue!r} {n:,}" for queue, n in by_queue.items() if n))
    return (f"broker: {total:,} batches waiting" + (f" ({'; '.join(details)})" if total else "")
            + f", {broker.unacked:,} taken by workers")


def _per_minute(count: float) -> str:
    """``count`` over the recent window as a rate a minute, with the digits a small rate needs (0.046, not 0.0)."""
    rate = count / RECENT_WINDOW_S * 60
    return f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}" if rate >= 0.1 else f"{rate:.3f}"
