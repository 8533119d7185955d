"""The worker's own Celery app, with each image's restoration held until a file exists, for the tests of a batch
delivered twice.

``TEST_RESTORE_GATE`` names the file. A worker of this app claims its batch and
starts its image as the real one does, then waits for the file (two minutes at
most), so a test can keep a batch running past Redis's visibility timeout for
as long as it needs, whatever the machine's speed. With ``TEST_RESTORE_GATE_ONCE``
(another file's name) only the first restoration, in any process, waits.
"""

from __future__ import annotations

import os
import time
from typing import Any

from jobs.celery_app import app  # noqa: F401 - the app Celery's -A finds here
from worker import pipeline

_restore = pipeline.restore_work


def _gated_restore(work: Any, message: Any, *rest: Any) -> None:
    once = os.environ.get("TEST_RESTORE_GATE_ONCE")  # a marker file: only the first restoration waits
    if once:
        if os.path.exists(once):
            _restore(work, message, *rest)
            return
        open(once, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["TEST_RESTORE_GATE"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    _restore(work, message, *rest)


pipeline.restore_work = _gated_restore
