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
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from jobs.errors import InputError
from jobs.messages import FIELDS_BEFORE_INFO, OPTIONAL_FIELDS, WORKER_INFO_COMMAND
from jobs.settings import Settings


@dataclass(frozen=True)
class WorkerState:
    """A worker node as it answered: the queues it consumes, the batches it is working on and, when asked, its
    release and the optional batch fields it knows (None: too old to say, see :func:`known_fields`)."""

    name: str
    answered: bool
    queues: tuple[str, ...] = ()
    active: int = 0
    release: str | None = None
    fields: tuple[str, ...] | None = None
    longest_running_s: float | None = None  # how long its oldest running batch has run (None: none, or not asked)
    # the registered models it cannot run, with why (None: too old to say, or not asked)
    models_unavailable: Mapping[str, str] | None = None

    @property
    def known_fields(self) -> tuple[str, ...]:
        """The optional batch fields this node understands (an old node that does not say knows the early ones)."""
        return self.fields if self.fields is not None else FIELDS_BEFORE_INFO

    def missing_fields(self, needed: Iterable[str] = tuple(OPTIONAL_FIELDS)) -> list[str]:
        """Those of ``needed`` this node would not understand: it drops a batch that carries one."""
        return sorted(set(needed) - set(self.known_fields))

    def problem(self, queue: str | None, needed: Iterable[str] = (), stuck_after: float | None = None) -> str | None:
        """Why this node is of no use to ``queue`` (None: to any queue, as a node consuming none is), or to batches
        with the ``needed`` fields, or has run one batch longer than ``stuck_after`` seconds; None when healthy."""
        if not self.answered:
            return "no answer: the worker is gone, wedged, or a solo pool busy with a batch"
        if stuck_after is not None and self.longest_running_s is not None and self.longest_running_s > stuck_after:
            return (f"stuck: a batch has run for {self.longest_running_s:.0f} s, longer than "
                    f"DEBLUR_VISIBILITY_TIMEOUT ({stuck_after:g} s), after which the broker gave it to another "
                    "worker (a hung GPU call, a blocked read); restart it")
        if not self.queues:
            return ("not consuming any queue: it stopped itself (a failed GPU, see its log); restart it")
        if queue is not None and queue not in self.queues:
            return (f"not consuming {queue!r}: it stopped itself (a failed GPU, see its log) or consumes "
                    f"{', '.join(self.queues) or 'nothing'}; restart it")
        missing = self.missing_fields(needed)
        if missing:
            return (f"outdated: release {self.release or 'older than this one'} does not know the batch field(s) "
                    f"{', '.join(missing)} this release sends and drops such batches; upgrade it")
        return None


def this_host() -> str:
    """The host part of this machine's Celery node names (``%h``)."""
    return socket.gethostname()


def worker_states(settings: Settings, names: list[str] | None = None, timeout: float = 5.0,
                  with_active: bool = True, with_release: bool = True) -> list[WorkerState]:
    """Ask ``names`` (every node that answers, when None) which queues they consume and, ``with_active``, what
    they run, and ``with_release``, their release and the batch fields they know. Named nodes that do not
    answer within ``timeout`` seconds are listed as not answering.

    A question to named nodes returns as soon as they have all answered; one to every node waits the whole
    ``timeout`` (nobody knows how many will answer). The questions are asked at once, so the wait is one
    ``timeout`` however many are asked.

    Raises:
        kombu.exceptions.OperationalError: the broker cannot be reached (nobody can be asked).
    """
    from celery.app.control import flatten_reply

    from jobs.celery_app import app_for

    app = app_for(settings)

    def ask(command: str) -> dict[str, Any]:
        # to named nodes, the answer comes as soon as they have all replied (the reply limit is their count)
        return flatten_reply(app.control.broadcast(command, destination=names or None, reply=True,
                                                   timeout=timeout) or [])

    commands = ["active_queues", *(["active"] if with_active else []),
                *([WORKER_INFO_COMMAND] if with_release else [])]
    with ThreadPoolExecutor(len(commands)) as pool:
        answers = dict(zip(commands, pool.map(ask, commands)))
    queues, active, info = answers["active_queues"], answers.get("active", {}), answers.get(WORKER_INFO_COMMAND, {})
    found = sorted(set(queues) | set(names or []))
    states = []
    for name in found:
        said = info.get(name)
        told = isinstance(said, dict) and "message_fields" in said  # an older node answers with an error
        states.append(WorkerState(
            name=name, answered=name in queues, queues=tuple(q["name"] for q in queues.get(name) or []),
            active=len(active.get(name) or []), longest_running_s=_longest_running(active.get(name) or []),
            release=said["release"] if told else None,
            fields=tuple(said["message_fields"]) if told else None,
            models_unavailable=_models_unavailable(said) if told else None))
    return states


def _models_unavailable(said: dict[str, Any]) -> dict[str, str] | None:
    """The models a node's answer says it cannot run (None when the answer predates saying so)."""
    models = said.get("models_unavailable")
    if not isinstance(models, dict):
        return None
    return {str(name): str(reason) for name, reason in models.items()}


def _longest_running(tasks: list[dict[str, Any]]) -> float | None:
    """Seconds the oldest of a node's running tasks has run, from the wall-clock start Celery reports for each
    (``time_start``); None when none runs or none says."""
    starts = [float(t["time_start"]) for t in tasks if isinstance(t, dict) and t.get("time_start")]
    return max(0.0, time.time() - min(starts)) if starts else None


def batch_fields(window: int = 0, output_format: str | None = None, quality: int | None = None,
                 sidecar: bool = False) -> list[str]:
    """The optional batch fields (:data:`jobs.messages.OPTIONAL_FIELDS`) a job's batches will carry."""
    used = {"slot": bool(window), "output_format": output_format is not None, "quality": quality is not None,
            "sidecar": sidecar}
    return sorted(name for name, carried in used.items() if carried)


def check_workers_know(settings: Settings, needed: Iterable[str], models: Iterable[tuple[str, bool]] = (),
                       timeout: float = 1.0) -> None:
    """Refuse a job whose batches carry the ``needed`` optional fields while a worker on the job's queue would
    not understand them (it would drop those batches), or that names ``models`` (name, whether the job names its
    own file for it) a worker on its queue cannot run (each image it took would fail): :class:`InputError`,
    :class:`WeightsError` or :class:`LicenseError`. A model given its own file (``path=``) is judged by its
    licence alone: the worker's weights folder plays no part.

    The workers are asked only when a field is newer than their self-description or a model needs an
    operator's setting-up (weights that do not ship, a non-commercial licence), so most submissions do not wait
    for the question. Only the nodes that answer within ``timeout`` seconds are checked: with none online the
    job is accepted, since the workers that start later run whatever they are deployed with. A broker that
    cannot be reached is left for the submission itself to report.
    """
    from kombu.exceptions import OperationalError as BrokerError

    from models.catalog import REGISTRY
    from models.registry import needs_worker_setup

    needed = sorted(set(needed) - set(FIELDS_BEFORE_INFO))
    set_up = sorted({(name, own_file) for name, own_file in models
                     if name in REGISTRY and needs_worker_setup(REGISTRY.get(name))})
    if not needed and not set_up:
        return
    try:
        states = [s for s in worker_states(settings, timeout=timeout, with_active=False)
                  if settings.queue in s.queues]
    except BrokerError:
        return
    _check_models_runnable(states, set_up, settings.queue)
    outdated = [s for s in states if s.missing_fields(needed)] if needed else []
    if outdated:
        names = ", ".join(f"{s.name} ({s.release or 'an older release'})" for s in outdated)
        raise InputError(f"worker(s) {names} on queue {settings.queue!r} do not know the batch field(s) "
                         f"{', '.join(needed)} this job's batches carry and would drop them; upgrade them first "
                         "(see 'deblur workers'), or submit without the options that need them")


def _check_models_runnable(states: list[WorkerState], models: list[tuple[str, bool]], queue: str) -> None:
    """Refuse ``models`` (name, whether the job names its own file) when a node of ``states`` (the queue's) says
    it cannot run one of them; a model with its own file only for want of the licence's opt-in."""
    from jobs.errors import LicenseError, WeightsError
    from models.registry import LICENCE_REASON

    unable = [(s, name, s.models_unavailable[name]) for s in states for name, own_file in models
              if s.models_unavailable and name in s.models_unavailable
              and (not own_file or s.models_unavailable[name].startswith(LICENCE_REASON))]
    if not unable:
        return
    shown = "; ".join(f"{s.name} cannot run {name}: {reason}" for s, name, reason in unable[:5])
    more = f" (and {len(unable) - 5} more)" if len(unable) > 5 else ""
    error = LicenseError if all(reason.startswith(LICENCE_REASON) for _, _, reason in unable) else WeightsError
    raise error(f"worker(s) on queue {queue!r} would fail each image of this job they took: {shown}{more}. Set "
                "them up (then submit again), or leave the model out")
