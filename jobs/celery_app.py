"""The Celery application shared by producer (to send) and worker (to run).

JSON only (pickle refused), late acknowledgement with reject-on-worker-lost so
a dead worker's batch is redelivered, prefetch 1 so a slow GPU batch does not
hold others hostage, and task events on for Flower. There is no result
backend: progress and results live in SQL.
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

from jobs.messages import PROCESS_BATCH_TASK
from jobs.settings import Settings, load_settings

# Redis sorts priorities ascending (0 is served first); users speak 0..9 with 9 most urgent.
PRIORITY_LEVELS = 10


def broker_priority(user_priority: int) -> int:
    """Map a user priority (0 lowest .. 9 highest) to the Redis transport's order."""
    if not 0 <= user_priority < PRIORITY_LEVELS:
        raise ValueError(f"priority must be within 0..9, got {user_priority}")
    return PRIORITY_LEVELS - 1 - user_priority


def make_app(settings: Settings) -> Celery:
    app = Celery("deblur", broker=settings.broker_url, set_as_current=True, include=["worker.tasks"])
    visibility = int(os.environ.get("DEBLUR_VISIBILITY_TIMEOUT", "3600"))
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
            "visibility_timeout": visibility,
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "queue_order_strategy": "priority",
        },
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    return app


app = make_app(load_settings())
