"""The Celery application shared by producer (to send) and worker (to run).

JSON only (pickle refused), late acknowledgement with reject-on-worker-lost so
a dead worker's batch is redelivered (after ``DEBLUR_VISIBILITY_TIMEOUT``
and at most one restore sweep, see :func:`restore_sweep_seconds`; workers hand
long batches on before that, see
:func:`worker.pipeline.run_batch`), prefetch 1 so a slow GPU batch does not
hold others hostage, and task events on for Flower. There is no result
backend: progress and results live in SQL.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from jobs.messages import PROCESS_BATCH_TASK
from jobs.settings import Settings, load_settings

# Redis sorts priorities ascending (0 is served first); users speak 0..9 with 9 most urgent.
PRIORITY_LEVELS = 10
# The longest wait between two sweeps for batches whose worker died.
LONGEST_RESTORE_SWEEP_S = 60
# Seconds a command to Redis, and a connection to it, may take (consumers wait at most 1 s per BRPOP).
BROKER_SOCKET_TIMEOUT_S = 30
BROKER_CONNECT_TIMEOUT_S = 10


def restore_sweep_seconds(visibility_timeout: int) -> int:
    """Seconds between the Redis transport's sweeps for unacknowledged batches past their visibility timeout.

    kombu's own cadence is fixed at about 100 s whatever the timeout, so a
    dead worker's batch with an 8-s timeout would wait up to 108 s. A tenth of
    the timeout (at least 1 s, at most a minute) keeps the wait within 10 %
    of the timeout for short ones and costs one small Redis query per worker
    per minute for long ones.
    """
    return max(1, min(LONGEST_RESTORE_SWEEP_S, visibility_timeout // 10))


def broker_priority(user_priority: int) -> int:
    """Map a user priority (0 lowest .. 9 highest) to the Redis transport's order."""
    if not 0 <= user_priority < PRIORITY_LEVELS:
        raise ValueError(f"priority must be within 0..9, got {user_priority}")
    return PRIORITY_LEVELS - 1 - user_priority


def make_app(settings: Settings, set_as_current: bool = True) -> Celery:
    """A Celery app for ``settings`` (broker, queue, visibility timeout)."""
    app = Celery("deblur", broker=settings.broker_url, set_as_current=set_as_current, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        result_accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_queues=[Queue(settings.queue)],
        task_routes={PROCESS_BATCH_TASK: {"queue": settings.queue}},
        broker_transport_options={
            # a batch unacked this long (its worker died) is handed to another worker
            "visibility_timeout": settings.visibility_timeout,
            # ...and looked for this often, every time (kombu >= 5.7 reads both)
            "unacked_restore_interval": restore_sweep_seconds(settings.visibility_timeout),
            "unacked_restore_throttle": 1,
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "queue_order_strategy": "priority",
            # a broker that stops answering without closing the connection (a failover, a NAT or firewall
            # timeout) fails a publish after this long instead of holding its sender for good: a worker's
            # sweep publishes inside a database transaction (worker.sweeper), a producer mid-submission
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
        },
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # a pool child imports torch as it starts (a CUDA build: about 5 s cold); Celery's default of 4 s would
        # kill it and start another, for ever
        worker_proc_alive_timeout=60,
    )
    return app


app = make_app(load_settings())

_apps: dict[tuple[str, str], Celery] = {}


def app_for(settings: Settings) -> Celery:
    """The app to send with for ``settings``: the module app when it matches,
    else one made (and cached) for that broker and queue. Lets one process talk
    to several brokers, as tests and multi-tenant producers do."""
    if app.conf.broker_url == settings.broker_url and app.conf.task_default_queue == settings.queue:
        return app
    key = (settings.broker_url, settings.queue)
    if key not in _apps:
        _apps[key] = make_app(settings, set_as_current=False)
    return _apps[key]
