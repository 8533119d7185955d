"""A Celery app standing in for a worker of a deblur release older than the workers' self-description.

It consumes the test's queue and answers Celery's own remote-control questions
(ping, active_queues), but not ``deblur_info``, as such a worker does. Used by
``tests/test_workers_command.py``; it is sent no batches.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("deblur-older-release", broker=os.environ["DEBLUR_BROKER_URL"])
app.conf.task_default_queue = os.environ.get("DEBLUR_QUEUE", "deblur")
