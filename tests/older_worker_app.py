"""A Celery app standing in for a worker of another deblur release, for the tests of ``deblur workers``.

It consumes the test's queue and answers Celery's own remote-control questions
(ping, active_queues). Without ``TEST_WORKER_FIELDS`` it does not answer
``deblur_info``, like a release from before that question; with it (a
comma-separated list) it answers with those optional batch fields, like a
release that lacks a field this one sends. It is sent no batches.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

app = Celery("deblur-other-release", broker=os.environ["DEBLUR_BROKER_URL"])
app.conf.task_default_queue = os.environ.get("DEBLUR_QUEUE", "deblur")

if "TEST_WORKER_FIELDS" in os.environ:
    from celery.worker.control import inspect_command

    from jobs.messages import MESSAGE_VERSION, WORKER_INFO_COMMAND

    @inspect_command(name=WORKER_INFO_COMMAND)
    def deblur_info(state: Any) -> dict[str, Any]:
        consumer = state.consumer.task_consumer
        return {"release": "0.0.1-test", "message_version": MESSAGE_VERSION,
                "message_fields": [f for f in os.environ["TEST_WORKER_FIELDS"].split(",") if f],
                "queues": [queue.name for queue in consumer.queues] if consumer else []}
