"""Submitting jobs: validate, write the job row, stream image rows, send batches.

Memory stays flat however many keys a prefix holds: the listing is consumed
page by page, image rows are written in chunks and one Celery task is sent per
small batch after its rows are committed (a worker must find them). No chords
or giant groups: the job row and its image rows are the source of truth.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kombu.exceptions import OperationalError as BrokerError

from db import queries
from db.engine import ensure_schema, session_scope
from jobs.errors import (
    InputError,
    InvalidModelSpecError,
    JobFinishedError,
    JobKeyReusedError,
    OutputsBusyError,
    TransientError,
)
from jobs.labels import check_submitted_labels
from jobs.s3uri import S3URI, parse_s3_uri
from jobs.messages import ImageItem, JobKind
from jobs.notify import announce_if_wanted, check_notify_url
from jobs.settings import Settings
from jobs.storage import READ_FORMATS, s3_client
from models.catalog import REGISTRY, parse_ensemble
from producer.dispatch import send_plain_batches, send_window_batches
from producer.inputs import Plan, build_plan, describe_ignored, digest
from producer.workers import batch_fields, check_workers_know

ROWS_PER_TRANSACTION = 1000
MAX_WINDOW = 1_000_000  # batches: more than any job holds in the broker at once; a bigger number is a mistake


@dataclass
class JobRequest:
    """Everything a deblur or evaluation job needs; mirrors the CLI options."""

    kind: JobKind
    inputs: list[str]
    output: str | None = None
    models: list[str] = field(default_factory=list)
    references: str | None = None
    gopro: bool = False
    strength: float = 1.0
    batch_size: int | None = None
    priority: int = 5
    strip_metadata: bool = False
    job_key: str | None = None
    align: bool = False
    crop_border: int = 0
    ensemble: str | None = None  # a saved ensemble's name (deblur ensemble fit); excludes ``models``
    light: str | None = None  # "linear": every member that can undoes the blur in linear light (real camera shake)
    notify_url: str | None = None  # POSTed a JSON summary each time the job finishes (jobs.notify)
    skip_existing: bool = False  # leave out images whose output already exists (a nightly run over a growing prefix)
    output_format: str | None = None  # write every output in this format (jobs.layout.OUTPUT_FORMATS), keys renamed
    quality: int | None = None  # JPEG and lossy WebP outputs: 1-100 instead of the input's own (JPEG) or 95
    sidecar: bool = False  # a provenance record (<output>.deblur.json) next to each output
    window: int | None = None  # batches in the broker at once (DEBLUR_JOB_WINDOW when None; 0: all at submission)
    labels: dict[str, str] = field(default_factory=dict)  # a team's own names for the job (jobs.labels)
    api_client: str | None = None  # the HTTP API's caller (producer.api_clients): labelled api-client=NAME

    def fingerprint(self) -> str:
        """SHA-256 of the request as sent, its key aside: a key sent again with another request is refused
        (:func:`submit`) rather than answered with a job that is not what was asked for."""
        fields = {name: value for name, value in dataclasses.asdict(self).items() if name != "job_key"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()

    def validated_models(self) -> list[str]:
        """Model specs in canonical text form (validated against the registry)."""
        if not 0.0 <= self.strength <= 1.0:
            raise InputError(f"--strength must be within 0..1, got {self.strength}")
        ensemble = parse_ensemble(self.models, strength=self.strength, light=self.light)
        for member in ensemble.members:
            _check_worker_paths(member.name, member.param_dict)
        return [m.to_text() for m in ensemble.members]


# model parameters that name a file: read by the workers, on their machines (models.catalog)
FILE_PARAMS = ("weights", "path")


def _check_worker_paths(model: str, params: Mapping[str, object]) -> None:
    """Refuse a relative file parameter (``weights=runs/u1/best.safetensors``): the workers resolve it against
    their own working folder, not the submitter's, so every image would fail. ``deblur restore`` runs here and
    takes relative paths."""
    for name in FILE_PARAMS:
        value = str(params.get(name) or "").strip()
        if value and not value.startswith("/"):
            raise InvalidModelSpecError(
                f"model {model!r}: {name}={value} is a relative path, which each worker would look for in its own "
                f"working folder: give the absolute path of a file the workers can read (e.g. "
                f"{name}=/shared/weights/{value.rsplit('/', 1)[-1]})")


@dataclass
class SubmitResult:
    """``job_id`` is empty when ``skip_existing`` left nothing to submit (then ``created`` is False)."""

    job_id: str
    created: bool
    total: int
    skipped: int = 0  # images left out because their output already existed
    ignored: dict[str, int] = field(default_factory=dict)  # files under a prefix that are no images, by kind
    listing: bool = False  # a key's job still being listed by the submission that made it: total is so far


@dataclass
class Preview:
    """What :func:`submit` would enqueue: the image count, how many ``skip_existing`` leaves out, the first items."""

    total: int
    skipped: int
    sample: list[ImageItem]
    ignored: dict[str, int] = field(default_factory=dict)  # as in :class:`SubmitResult`


@dataclass
class _Validated:
    request: JobRequest
    models: list[str]
    batch_size: int
    client: Any  # a boto3 S3 client
    plan: Plan

    def model_names(self) -> list[tuple[str, bool]]:
        """The registry names of the job's models (its ensemble's members), each with whether the job names its
        own file for it (``path=``, ``weights=``): then the workers' weights folder does not matter."""
        members = [REGISTRY.parse(text) for text in self.models]
        return [(m.name, any(m.param_dict.get(name) for name in FILE_PARAMS)) for m in members]

    def items(self, ignored: Counter[str] | None = None,
              tick: Callable[[], None] | None = None) -> tuple[Iterator[ImageItem], Callable[[], int]]:
        """The images to submit, and a function that tells how many were skipped so far.

        ``ignored`` counts the files under the prefixes that are no images, and ``tick`` is called for every
        key listed (see :meth:`Plan.items`).
        """
        items = self.plan.items(self.client, ignored, tick)
        if not self.request.skip_existing:
            return items, lambda: 0
        existing = self.plan.existing_outputs(self.client)
        skipped = [0]

        def fresh() -> Iterator[ImageItem]:
            for item in items:
                if item.output is not None and digest(item.output) in existing:
                    skipped[0] += 1
                else:
                    yield item

        return fresh(), lambda: skipped[0]


class _Heartbeat:
    """Keeps a job that is being listed from looking abandoned (:func:`db.queries.fail_abandoned_submissions`)
    while the listing yields nothing for a long stretch: millions of keys already restored (``skip_existing``)
    or not images. Ticked for every key listed; writes at most once a minute, and only once the job exists."""

    INTERVAL_S = 60.0

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.job_id: str | None = None
        self._last = time.monotonic()

    def start(self, job_id: str) -> None:
        """The job row exists (its creation was its first sign of life): beat for it from now on."""
        self.job_id, self._last = job_id, time.monotonic()

    def tick(self) -> None:
        if self.job_id is None or time.monotonic() - self._last < self.INTERVAL_S:
            return
        self._last = time.monotonic()
        with session_scope(self.db_url) as session:
            queries.submission_progress(session, self.job_id)


def _chunks(items: Iterator[ImageItem], size: int) -> Iterator[list[ImageItem]]:
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


def _validate(request: JobRequest, settings: Settings) -> _Validated:
    """Every check that needs no write: models, options, URIs, buckets, keys, and colliding outputs."""
    from jobs.celery_app import broker_priority

    if request.ensemble is not None:
        from producer.ensembles import expand_request

        request = expand_request(request, settings)
    models = request.validated_models()
    batch_size = request.batch_size or settings.batch_size
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    try:
        broker_priority(request.priority)  # the batches take it from the spec (producer.dispatch.job_priority)
    except ValueError as exc:
        raise InputError(f"--priority: {exc}") from None
    if request.crop_border < 0:
        raise InputError(f"--crop-border must be >= 0, got {request.crop_border}")
    if request.kind == "deblur" and (request.align or request.crop_border):
        raise InputError("--align and --crop-border apply to evaluation jobs only")
    if request.kind == "deblur" and (request.references or request.gopro):
        raise InputError("--sharp and --gopro apply to evaluation jobs only: a deblur job has no sharp references "
                         "(submit an evaluation job to measure against them)")
    if request.kind == "deblur" and not request.output:
        raise InputError("--output is required: an S3 prefix such as s3://bucket/restored/")
    if request.kind == "evaluate" and (request.output_format or request.quality or request.sidecar):
        raise InputError("--output-format, --quality and --sidecar apply to deblur jobs only")
    check_submitted_labels(request.labels, request.api_client)
    if request.window is not None and not 0 <= request.window <= MAX_WINDOW:
        raise InputError(f"--window must be within 0..{MAX_WINDOW:,} batches (0: every batch at submission), got "
                         f"{request.window}")
    if request.quality is not None and not 1 <= request.quality <= 100:
        raise InputError(f"--quality must be within 1..100, got {request.quality}")
    client = s3_client(settings)
    plan = build_plan(
        client, request.inputs, request.output, request.references, request.gopro,
        require_output=request.kind == "deblur", output_format=request.output_format,
    )
    if request.kind == "evaluate" and plan.references is None and not plan.gopro and not any(
        s.kind == "manifest" for s in plan.sources
    ):
        raise InputError("an evaluation job needs --sharp PREFIX, --gopro, or a manifest of blurred,sharp pairs")
    if request.notify_url is not None:
        check_notify_url(request.notify_url, settings.notify_allowed_networks())
    if request.skip_existing and plan.output is None:
        raise InputError("--skip-existing needs --output: it leaves out images whose output already exists there")
    plan.check_outputs(client)
    return _Validated(request, models, batch_size, client, plan)


def _check_no_live_job_writes_the_same(checked: _Validated, settings: Settings) -> None:
    """Refuse a job with an image whose output an unfinished job has still to write: both would write it, in
    whatever order they ran, and the one that finished first would keep 'done' over an output the other replaced
    (a nightly run started while last night's still runs into the same prefix, two models into one prefix). Only
    jobs whose output prefix overlaps this one's are read, and only then is this job listed again: other
    submissions pay one short query. A finished job's outputs may be written over: that is a job run again."""
    output = checked.plan.output
    if output is None:
        return
    db_url = settings.resolved_database_url()
    ensure_schema(db_url)
    with session_scope(db_url) as session:
        queries.fail_abandoned_submissions(session)  # a dead producer's job must not hold the prefix for ever
        overlapping = jobs_writing_into(session, output, job_key=checked.request.job_key)
        if not overlapping:
            return
        names = list(overlapping)
        position = {job_id: number for number, job_id in enumerate(names)}
        writer = {digest(uri): position[job_id] for job_id, uri in queries.outputs_still_to_write(session, names)}
    if not writer:
        return
    items, _ = checked.items()
    for item in items:
        taken = writer.get(digest(item.output or ""))
        if taken is not None:
            other = names[taken]
            raise OutputsBusyError(
                # the job's id early: an answer shortened for the API still names it (HttpClient reads it)
                f"output {item.output} is one job {other} ({overlapping[other]}) has still to write (the output "
                f"of {item.input}): the two jobs would write over each other's results. Wait for it ('deblur "
                f"status {other} --watch'), cancel it, or choose another output prefix", other, str(item.output))


def jobs_writing_into(session: Any, output: S3URI, *, job_key: str | None = None,
                      other_than: str | None = None) -> dict[str, str]:
    """The unfinished jobs (id -> status) whose output prefix lies within ``output`` or holds it, but the one
    keyed ``job_key`` and the job ``other_than``: those whose outputs a job writing into ``output`` (a new one,
    or one retried) could land on. One short query; their images are not read here."""
    return {job_id: status for job_id, status, prefix in queries.unfinished_job_outputs(session, job_key)
            if job_id != other_than and overlaps(output, prefix)}


def overlaps(output: S3URI, prefix: str) -> bool:
    """Whether the output prefix ``prefix`` (a job's spec) and ``output`` lie one within the other."""
    try:
        other = parse_s3_uri(prefix, want_prefix=True, exact=True)
    except InputError:  # a spec written by hand or by an older version: nothing to compare
        return False
    return output.contains(other) or other.contains(output)


def _no_images(request: JobRequest, ignored: Mapping[str, int]) -> InputError:
    found = f"; found only {describe_ignored(ignored)}" if ignored else ""
    return InputError(f"no images ({READ_FORMATS}) found in {', '.join(request.inputs)}{found}")


def _keyed_result(session: Any, keyed: Any) -> SubmitResult:
    """The answer to a key already used: its job, with the images it holds, counted so far while the submission
    that made it is still listing it (its total is set only at the end)."""
    if keyed.status == "submitting":
        return SubmitResult(keyed.id, False, sum(queries.status_counts(session, keyed.id).values()), listing=True)
    return SubmitResult(keyed.id, False, keyed.total)


def _check_same_request(keyed: Any, job_key: str | None, asked: str | None) -> None:
    """Refuse a request whose fingerprint is ``asked`` (:meth:`JobRequest.fingerprint`) when the job its key
    ``job_key`` made, ``keyed``, came from another request (a job made before requests were fingerprinted
    passes)."""
    first = (keyed.spec or {}).get("request_sha256")
    if first is not None and first != asked:
        raise JobKeyReusedError(
            f"job key {job_key!r} was used for another request (job {keyed.id}): the same key must come "
            "with the same inputs, output, models and options; use a new key for a new job")


def preview(request: JobRequest, settings: Settings, sample: int = 5) -> Preview:
    """Validate ``request`` and list what :func:`submit` would enqueue, writing and enqueueing nothing.

    Raises what :func:`submit` raises for an invalid job, including a job with no images at all.
    """
    checked = _validate(request, settings)
    _check_no_live_job_writes_the_same(checked, settings)
    check_workers_know(settings, (), checked.model_names())  # a model a worker on the queue cannot run
    ignored: Counter[str] = Counter()
    items, skipped = checked.items(ignored)
    total, first = 0, []
    # an input named twice (a key and its prefix, a manifest row repeated) is one image, as the job's rows make
    # it; kept as 8-byte digests, as the output check does
    seen: set[bytes] = set()
    for item in items:
        key = digest(item.input)
        if key in seen:
            continue
        seen.add(key)
        total += 1
        if len(first) < sample:
            first.append(item)
    if total == 0 and skipped() == 0:
        raise _no_images(request, ignored)
    return Preview(total, skipped(), first, dict(ignored))


def submit(
    request: JobRequest,
    settings: Settings,
    progress: Callable[[int], None] | None = None,
) -> SubmitResult:
    """Validate ``request``, then write and enqueue the job. Returns its id.

    Nothing is written when validation fails. With a ``job_key`` already
    used, the first job is returned at once: nothing is validated, listed or
    enqueued. With
    ``skip_existing``, images whose output exists are left out, and when
    that leaves none, nothing is written and the result's ``job_id`` is empty.
    """
    from jobs.celery_app import app_for

    app = app_for(settings)
    db_url = settings.resolved_database_url()
    ensure_schema(db_url)
    asked = request.fingerprint() if request.job_key else None  # the request as sent, before validation
    if request.job_key:
        with session_scope(db_url) as session:
            keyed = queries.job_with_key(session, request.job_key)
            if keyed is not None:  # the same key returns the first job, even when nothing would be left to submit
                _check_same_request(keyed, request.job_key, asked)
                return _keyed_result(session, keyed)
    checked = _validate(request, settings)
    _check_no_live_job_writes_the_same(checked, settings)
    request, models, batch_size, plan = checked.request, checked.models, checked.batch_size, checked.plan
    ignored: Counter[str] = Counter()
    heartbeat = _Heartbeat(db_url)
    items, skipped = checked.items(ignored, heartbeat.tick)
    first = next(items, None)
    if first is None:
        if skipped():
            return SubmitResult("", False, 0, skipped(), dict(ignored))
        raise _no_images(request, ignored)

    window = settings.job_window if request.window is None else request.window
    # no worker on the queue may be one that drops the batches' optional fields (asked only for fields newer
    # than the workers' self-description: none yet) or that cannot run a member (asked only for models whose
    # weights do not ship or whose licence needs an opt-in)
    check_workers_know(settings, batch_fields(window=window, output_format=request.output_format,
                                              quality=request.quality, sidecar=request.sidecar),
                       checked.model_names())
    spec: dict[str, Any] = {
        "inputs": list(request.inputs),
        "output": str(plan.output) if plan.output else None,
        "references": str(plan.references) if plan.references else None,
        "gopro": request.gopro,
        "models": models,
        "strength": request.strength,
        "batch_size": batch_size,
        "priority": request.priority,
        "strip_metadata": request.strip_metadata,
        "align": request.align,
        "crop_border": request.crop_border,
        "ensemble": request.ensemble,
        "light": request.light,
        "skip_existing": request.skip_existing,
        "notify_url": request.notify_url,
        "output_format": request.output_format,
        "quality": request.quality,
        "sidecar": request.sidecar,
        "window": window,
        "labels": check_submitted_labels(request.labels, request.api_client),
        # the queue its batches go to: a retry, a window's next batch and the workers' sweep for abandoned images
        # send to it too, whatever queue the process sending them consumes or was set to
        "queue": settings.queue,
    }
    if asked is not None:
        spec["request_sha256"] = asked
    with session_scope(db_url) as session:
        job, created = queries.create_job(session, request.kind, spec, request.job_key)
        job_id = job.id
    if not created:  # the key's first job was made meanwhile, by a submission sent at the same time
        _check_same_request(job, request.job_key, asked)
        with session_scope(db_url) as session:
            return _keyed_result(session, queries.get_job(session, job_id))
    heartbeat.start(job_id)

    total = 0  # images listed and written
    queued = 0  # images whose batch the broker took (a window's are counted when listed)
    batch_number = 0
    unsent_from: int | None = None  # the first batch written but not sent (a job without a window), while sending
    try:
        with app.producer_or_acquire() as producer:
            for chunk in _chunks(itertools.chain([first], items), ROWS_PER_TRANSACTION):
                batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
                with session_scope(db_url) as session:
                    if queries.submission_progress(session, job_id) in ("cancelled", "failed"):
                        break  # cancelled meanwhile, or failed as abandoned: list no further
                    sent_at = queries.database_now(session)  # once per chunk: a round trip on PostgreSQL
                    for offset, batch in enumerate(batches):
                        inserted = queries.insert_images(
                            session, job_id,
                            [{"input_uri": i.input, "output_uri": i.output, "reference_uri": i.reference}
                             for i in batch],
                            batch=batch_number + offset, sent_at=sent_at,
                        )
                        # an image named twice has one row, written the first time: its batch alone sends it
                        batches[offset] = [i for i in batch if i.input in inserted]
                    if window:
                        queries.record_listed_batches(session, job_id, batch_number + len(batches))
                # written now: without a window, each batch counts as unsent until the broker takes it
                unsent_from = None if window else batch_number
                if window:  # as many as the window has room for; finishing batches send the rest
                    send_window_batches(settings, job_id, request.kind, spec, producer=producer)
                    queued += len(chunk)
                else:
                    for batch in batches:  # each already the job's batch size at most: one message each
                        send_plain_batches(settings, job_id, request.kind, spec, batch, producer=producer)
                        queued += len(batch)  # counted once the broker took it
                        unsent_from = (unsent_from or 0) + 1
                    unsent_from = None
                batch_number += len(batches)
                total += len(chunk)
                if progress:
                    progress(total)
    except BaseException as exc:
        with session_scope(db_url) as session:
            # failed first (the key released, so submitting again with it starts afresh): a windowed job's
            # finishing batches send no further one from now on
            queries.set_job_state(session, job_id, status="failed", job_key=None)
            if window:  # the batches the window had not sent yet will never be: the workers send only for live jobs
                unsent_from = queries.get_job(session, job_id).batches_sent
            if unsent_from is not None:
                # written, never sent: cancelled, as the user is told, so nothing takes them for sent (a broker
                # found to have lost its messages sends a failed job's waiting images again: worker.broker_watch)
                queries.cancel_unsent_batches(session, job_id, unsent_from)
            counts = queries.status_counts(session, job_id)
            queued = sum(counts.values()) - counts["cancelled"]  # what the user is told: sent, not merely written
            queries.set_job_state(session, job_id, total=sum(counts.values()),
                                  error=f"{queries.SUBMISSION_INTERRUPTED} after {queued} images were queued "
                                        f"(they are restored; the rest were not submitted): {exc!r}")
        if isinstance(exc, BrokerError):
            what = (f"the first {queued} images were queued and may still be restored: submit again with "
                    "--skip-existing to leave out those already restored" if queued
                    else "nothing was queued: submit again")
            raise TransientError(
                f"the broker did not take job {job_id}'s tasks ({exc}): the job is marked failed and {what}, "
                "once Redis is running or DEBLUR_BROKER_URL points at a running one") from exc
        raise
    status: str | None = None
    finished = False
    with session_scope(db_url) as session:
        counts = queries.status_counts(session, job_id)
        distinct = sum(counts.values())
        started = counts["running"] + counts["done"] + counts["failed"] > 0
        listed = queries.finish_submission(session, job_id, distinct, "running" if started else "queued")
        if listed:
            finished = queries.finish_if_complete(session, job_id)  # the workers were quicker than the listing
        else:
            # cancelled while it was being listed (or failed as abandoned): the listing stopped. A cancelled job's
            # images written after the cancellation, whose batches the workers drop, are cancelled too instead of
            # pending for good; an abandoned one's enqueued images are still restored, as its error says.
            status = queries.job_status_of(session, job_id)
            if status == "cancelled":
                queries.cancel_pending_images(session, job_id)
            queries.set_job_state(session, job_id, total=sum(queries.status_counts(session, job_id).values()))
    if status == "failed":  # raised once its total is committed: the images it queued are still restored
        raise TransientError(
            f"job {job_id} was marked failed while this producer was still listing it (another "
            f"submission took it for abandoned): {queued} images were queued and are restored, the rest "
            "were not submitted; submit again with --skip-existing")
    if status == "cancelled":  # a success it was not: the rest of the input was never listed
        raise JobFinishedError(
            f"job {job_id} was cancelled while this producer was still listing it: {distinct} images were listed "
            "and cancelled with it, the rest were not submitted; submit again to restore them")
    if finished:
        announce_if_wanted(settings, job_id, spec)
    return SubmitResult(job_id, True, distinct, skipped(), dict(ignored))
