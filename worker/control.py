"""What a worker says about itself when asked: its release, the batch fields it understands and the models it
cannot run, and which batch runs' processes of its own are gone.

Workers upgrade one by one, and a worker of an older release drops a batch whose
message carries a field it does not know (a window's ``slot``, say), which
leaves that batch's images waiting for ``deblur retry --stalled``. So every
worker answers the remote-control question :data:`jobs.messages.WORKER_INFO_COMMAND`
with the optional batch fields it knows; ``deblur workers`` shows them, and a
submission that needs a field refuses to start while a worker on its queue
does not know it (see :mod:`producer.workers`). A worker older than this
question answers it with an error, which says as much. Likewise a job naming
a model whose weights a worker on its queue lacks, or whose non-commercial
licence it was not allowed, is refused before anything is enqueued: each of
its images would fail there.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from celery.worker.control import inspect_command

from jobs.messages import CLAIMS_GONE_COMMAND, MESSAGE_VERSION, OPTIONAL_FIELDS, WORKER_INFO_COMMAND
from worker.claims import holder_process_gone


def release() -> str:
    """This installation's deblur version, or ``unknown`` when it runs from a source tree."""
    try:
        return version("deblur")
    except PackageNotFoundError:
        return "unknown"


def unavailable_models() -> dict[str, str]:
    """The registered models this worker cannot run, with why: weights missing from its weights folder, or a
    non-commercial licence it was not allowed to use. Read afresh on each question: a 'deblur models pull' on
    this machine counts at once."""
    from models.catalog import REGISTRY  # torch-free: the question is answered at once, even the first time
    from models.registry import needs_worker_setup, unavailable_reason

    reasons = {info.name: unavailable_reason(info) for info in REGISTRY if needs_worker_setup(info)}
    return {name: reason for name, reason in reasons.items() if reason}


@inspect_command(name=WORKER_INFO_COMMAND)
def deblur_info(state: Any) -> dict[str, Any]:
    """Answered from the worker's main process, even while its pool works on a batch."""
    consumer = state.consumer.task_consumer
    return {"release": release(), "message_version": MESSAGE_VERSION, "message_fields": sorted(OPTIONAL_FIELDS),
            "queues": [queue.name for queue in consumer.queues] if consumer else [],
            "models_unavailable": unavailable_models()}


@inspect_command(name=CLAIMS_GONE_COMMAND, args=[("claims", list)], signature="[CLAIM ...]")
def deblur_claims_gone(state: Any, claims: list[str] | None = None) -> dict[str, list[str]]:
    """The claims among ``claims`` whose process is certainly gone from this machine (a pool process killed, say).

    Answered from the worker's main process, which outlives its pool processes. Only this worker's own claims mean
    anything here (the process ids are this machine's); the asker keeps the answer for those. A worker whose
    main process is busy (``--pool solo``) does not answer, and the asker then waits out the lease.
    """
    return {"gone": [claim for claim in claims or [] if isinstance(claim, str) and holder_process_gone(claim)]}
