"""Which workers are up and consuming: ``deblur workers``, and a probe for containers (``--check``).

A worker answers Celery's control messages from its main process even while
its pool works on a batch, so a node that does not answer within the time
limit is gone or wedged. A node that answers but no longer consumes the queue
stopped itself after its GPU failed (``worker.tasks.stop_consuming``): alive,
but of no use until it is restarted. ``--check`` fails for both, so a
container's liveness probe restarts such a worker (with a fresh CUDA context)
instead of leaving it idle for good.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from jobs.settings import Settings


@dataclass(frozen=True)
class WorkerState:
    """A worker node as it answered: the queues it consumes and the batches it is working on."""

    name: str
    answered: bool
    queues: tuple[str, ...] = ()
    active: int = 0

    def problem(self, queue: str) -> str | None:
        """Why this node is of no use to ``queue``, or None when it is healthy."""
        if not self.answered:
            return "no answer: the worker is gone, wedged, or a solo pool busy with a batch"
        if queue not in self.queues:
            return (f"not consuming {queue!r}: it stopped itself (a failed GPU, see its log) or consumes "
                    f"{', '.join(self.queues) or 'nothing'}; restart it")
        return None


def this_host() -> str:
    """The host part of this machine's Celery node names (``%h``)."""
    return socket.gethostname()


def worker_states(settings: Settings, names: list[str] | None = None, timeout: float = 5.0,
                  with_active: bool = True) -> list[WorkerState]:
    """Ask ``names`` (every node that answers, when None) which queues they consume and, ``with_active``, what
    they run. Named nodes that do not answer within ``timeout`` seconds are listed as not answering.

    A question to named nodes returns as soon as they have all answered; one to every node waits the whole
    ``timeout`` (nobody knows how many will answer), once per question.

    Raises:
        kombu.exceptions.OperationalError: the broker cannot be reached (nobody can be asked).
    """
    from jobs.celery_app import app_for

    inspect = app_for(settings).control.inspect(destination=names or None, timeout=timeout)
    queues = inspect.active_queues() or {}
    active = (inspect.active() or {}) if with_active else {}
    found = sorted(set(queues) | set(names or []))
    return [WorkerState(name=name, answered=name in queues,
                        queues=tuple(q["name"] for q in queues.get(name) or []),
                        active=len(active.get(name) or []))
            for name in found]
