"""``deblur doctor``: is this installation ready to run jobs, and if not, what to do next.

A newcomer's first job fails for a reason several layers down (a database
schema behind the release, a broker on another port, credentials the store
refuses, no worker on the queue, a worker of an older release). The doctor
asks each part in turn, with a short time limit each, and prints one line per
part: what it found, and for anything wrong, the command that fixes it.
Passwords in URLs are never printed.

Each check gives ``ok``, ``warn`` (jobs can run, but something deserves a
look) or ``fail`` (jobs will not run); the command exits 1 when any fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from deploy.stack import redact
from jobs.errors import ConfigurationError, describe_failure
from jobs.settings import Settings

CHECK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Finding:
    """One part's state: ``status`` is ok, warn or fail; ``hint`` says what to do when it is not ok."""

    part: str
    status: str
    detail: str
    hint: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _guarded(part: str, check: Callable[[], Finding], hint: str) -> Finding:
    """Run ``check``, turning an unexpected error (and a time-out) into a failed finding with ``hint``."""
    from producer.metrics import call_with_time_limit

    try:
        return call_with_time_limit(check, CHECK_TIMEOUT_S * 2)  # type: ignore[no-any-return]
    except Exception as exc:  # the doctor reports every failure, whatever raised it
        return Finding(part, "fail", describe_failure(exc), hint)


def check_database(settings: Settings) -> Finding:
    """Reachable, and its schema at this release's revision (not behind, not ahead)."""
    from db.engine import current_revision, head_revision

    url = settings.resolved_database_url()
    shown = redact(url)

    def check() -> Finding:
        current, head = current_revision(url), head_revision()
        if current == head:
            return Finding("database", "ok", f"{shown}: schema {head} (current)")
        if current is None:
            return Finding("database", "warn", f"{shown}: no schema yet",
                           "it is created on first use, or now with 'deblur db upgrade'")
        from alembic.script import ScriptDirectory

        from db.engine import alembic_config

        known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config(url)).walk_revisions()}
        if current not in known:
            return Finding("database", "fail", f"{shown}: schema {current} is newer than this release knows ({head})",
                           "upgrade this installation to the release the workers run")
        return Finding("database", "warn", f"{shown}: schema {current}, this release wants {head}",
                       "'deblur db upgrade' migrates it (the first submission would also do it)")

    return _guarded("database", check, f"check DEBLUR_DATABASE_URL ({shown}) and that the server runs; "
                                       "'deblur stack up' starts a local stack")


def check_broker(settings: Settings) -> Finding:
    """The Redis broker answers."""
    from jobs.celery_app import app_for

    shown = redact(settings.broker_url)

    def check() -> Finding:
        with app_for(settings).connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_S)
        return Finding("broker", "ok", f"{shown}: answers (queue {settings.queue!r})")

    return _guarded("broker", check, f"check DEBLUR_BROKER_URL ({shown}) and that Redis runs there "
                                     "('redis-server --port N', or 'deblur stack up')")


SILENT_WORKER = "a --pool solo worker busy with a batch does not answer: see 'deblur workers'"
"""Why a worker may be there although it did not answer: said wherever its silence is reported."""


def check_workers(settings: Settings, asked: dict[str, set[str]] | None = None) -> Finding:
    """At least one worker consumes the queue, and none would drop this release's batches. Once the workers have
    answered, ``asked["queues"]`` holds every queue they consume (left out when they could not be asked)."""
    from jobs.messages import OPTIONAL_FIELDS
    from producer.workers import worker_states

    def check() -> Finding:
        answered = worker_states(settings, timeout=2.0, with_active=False)
        if asked is not None:
            asked["queues"] = {q for s in answered for q in s.queues}
        states = [s for s in answered if settings.queue in s.queues]
        # a node that answers but consumes nothing stopped itself after its device failed: it needs a restart
        stopped = ", ".join(s.name for s in answered if s.answered and not s.queues)
        restart = (f"restart {stopped}: they stopped consuming after a device failure (see their logs; a Kubernetes "
                   "liveness probe, 'deblur workers --check', restarts them)")
        if not states:
            if stopped:
                return Finding("workers", "fail", f"no worker consumes {settings.queue!r}; {stopped} answer but "
                               "consume nothing", restart)
            return Finding("workers", "warn", f"no worker that answered consumes {settings.queue!r}: jobs are "
                           "accepted and wait",
                           f"start one with 'deblur worker --queue {settings.queue}' (one process per GPU: --gpus "
                           f"auto); {SILENT_WORKER}")
        if stopped:
            return Finding("workers", "warn", f"{len(states)} on {settings.queue!r}; {stopped} consume nothing",
                           restart)
        outdated = [s for s in states if s.missing_fields(OPTIONAL_FIELDS)]
        names = ", ".join(s.name for s in states)
        if outdated:
            return Finding("workers", "warn", f"{len(states)} on {settings.queue!r} ({names}); outdated: "
                           + ", ".join(s.name for s in outdated),
                           "upgrade the outdated workers: they drop batches of jobs with a window "
                           "(see 'deblur workers')")
        return Finding("workers", "ok", f"{len(states)} on {settings.queue!r}: {names}")

    return _guarded("workers", check, "the broker must answer first")


def check_queues(settings: Settings, consumers: set[str] | None) -> Finding:
    """Every queue with unfinished jobs has a worker, and no broker's loss of messages is still being mended.

    ``consumers`` are the queues the answering workers consume (None: the broker could not be asked). A job waits
    on the queue it was submitted to, which need not be this installation's ``DEBLUR_QUEUE``: a queue whose
    workers all stopped holds its images back for good, and nothing else says so.
    """
    from db import broker_marks, queries
    from db.engine import current_revision, head_revision, session_scope
    from worker.broker_watch import broker_identity

    url = settings.resolved_database_url()

    def check() -> Finding:
        revision = current_revision(url)  # the doctor looks; it migrates nothing
        if revision is None:
            return Finding("queues", "ok", "no schema yet, so no job")
        with session_scope(url) as session:
            work = queries.waiting_by_queue(session)
            # a schema behind this release may not count losses yet (the database's finding says so)
            losses = [(queue, moment) for broker, queue, moment in broker_marks.unmended(session)
                      if broker == broker_identity(settings.broker_url)] if revision == head_revision() else []
        by_queue: dict[str, tuple[int, int]] = {}
        for queue, (jobs, waiting) in work.items():
            # a job that predates recorded queues is sent again to the queue of whoever retries it
            name = queue or settings.queue
            before = by_queue.get(name, (0, 0))
            by_queue[name] = (before[0] + jobs, before[1] + waiting)
        unserved = {name: counts for name, counts in by_queue.items()
                    if counts[1] and consumers is not None and name not in consumers}
        problems = [f"{name!r} has {jobs:,} unfinished job(s) with {waiting:,} image(s) waiting and no worker "
                    "consumes it" for name, (jobs, waiting) in sorted(unserved.items())]
        problems += [f"the broker lost queue {queue!r}'s messages ({moment.isoformat(timespec='seconds')}): its "
                     "workers are sending the waiting images again" for queue, moment in losses]
        if problems:
            hint = []
            if unserved:
                hint.append(f"start a worker for each ('deblur worker --queue NAME'), or cancel the jobs "
                            f"({SILENT_WORKER})")
            if losses:
                hint.append("the workers finish sending within a sweep or two (DEBLUR_CLAIM_LEASE); if this stays, "
                            "see their logs; give Redis an append-only file so a restart keeps its messages")
            return Finding("queues", "warn", "; ".join(problems), "; ".join(hint))
        if not by_queue:
            return Finding("queues", "ok", "no unfinished job")
        shown = ", ".join(f"{name!r} ({waiting:,} waiting in {jobs:,} job(s))"
                          for name, (jobs, waiting) in sorted(by_queue.items()))
        return Finding("queues", "ok", shown + ("" if consumers is not None else "; workers not asked"))

    return _guarded("queues", check, "the database must answer first")


STORAGE_HINT = ("check DEBLUR_S3_ENDPOINT_URL and the AWS_* credentials; name the buckets jobs use with --bucket "
                "(credentials that may not list every bucket are normal: then the bucket check is what counts)")
CREDENTIALS_HINT = ("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); for the local stack "
                    "('deblur stack up') set neither: its own are used")


def check_storage(settings: Settings, buckets: Sequence[str]) -> Finding:
    """The S3 endpoint answers with these credentials; each of ``buckets`` exists and may be read."""
    from botocore.exceptions import ClientError

    from jobs.errors import StorageNotFoundError, TransientError
    from jobs.storage import s3_client, translate

    where = settings.s3_endpoint_url or "AWS S3"

    def check() -> Finding:
        try:
            client = s3_client(settings)
        except TransientError as exc:  # incomplete credentials, refused before any request
            return Finding("storage", "fail", f"{where}: {describe_failure(exc.__cause__ or exc)}", CREDENTIALS_HINT)
        if not buckets:
            names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
            return Finding("storage", "ok", f"{where}: the credentials list {len(names)} bucket(s)")
        for bucket in buckets:
            try:
                client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                # said as 'deblur submit' says it (jobs.storage.check_bucket), with S3's own answer kept
                if not isinstance(translate(exc, bucket), StorageNotFoundError):
                    raise
                answer = exc.response.get("Error", {})
                said = " ".join(str(part) for part in (answer.get("Code"), answer.get("Message")) if part)
                return Finding("storage", "fail", f"{where}: bucket {bucket!r} does not exist or is not accessible "
                               f"(S3 answered {said or 'no'})",
                               "create it, or name the bucket jobs use with --bucket; if it exists, the AWS_* "
                               "credentials may not read it (check them and the bucket's policy)")
            client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        return Finding("storage", "ok", f"{where}: {', '.join(buckets)} readable")

    return _guarded("storage", check, STORAGE_HINT)


def check_api_clients(settings: Settings) -> Finding | None:
    """The API's clients file parses (when DEBLUR_API_CLIENTS is set); None when it is not set."""
    import os
    import stat

    from producer.api_clients import ClientRegistry

    if not settings.api_clients:
        return None
    try:
        registry = ClientRegistry(settings.api_clients, settings.api_token)
        clients = registry.clients()
    except ConfigurationError as exc:
        return Finding("api clients", "fail", str(exc), "mend the file: the API refuses every client until then")
    mode = os.stat(settings.api_clients).st_mode
    if mode & stat.S_IWOTH:
        return Finding("api clients", "warn", f"{settings.api_clients}: {len(clients)} client(s), writable by anyone",
                       f"chmod o-w {settings.api_clients}: whoever can write it can let themselves in")
    return Finding("api clients", "ok", f"{settings.api_clients}: {len(clients)} client(s)")


def diagnose(settings: Settings, buckets: Sequence[str] = ()) -> list[Finding]:
    """Every check, in the order a job needs the parts."""
    findings = [check_database(settings), check_broker(settings)]
    broker_ok = findings[-1].status == "ok"
    asked: dict[str, set[str]] = {}
    findings.append(check_workers(settings, asked) if broker_ok else
                    Finding("workers", "fail", "not asked: the broker does not answer", "fix the broker first"))
    findings.append(check_queues(settings, asked.get("queues")))
    findings.append(check_storage(settings, buckets))
    clients = check_api_clients(settings)
    if clients is not None:
        findings.append(clients)
    return findings


def as_json(findings: Sequence[Finding]) -> dict[str, Any]:
    """The findings as one JSON document, with ``ok`` false when any failed."""
    return {"ok": all(f.status != "fail" for f in findings), "checks": [f.to_dict() for f in findings]}
