"""The HTTP API for backend teams: submit jobs, poll them, page through results.

``create_app(settings)`` builds a FastAPI application; ``deblur api`` serves it
with uvicorn. Every route under ``/v1`` speaks JSON, is described by pydantic
models (schema at ``/openapi.json``, interactive docs at ``/docs``) and, when
``DEBLUR_API_TOKEN`` or ``DEBLUR_API_CLIENTS`` is set, requires
``Authorization: Bearer <token>``: the shared token, or a client's own (see
``producer.api_clients``: its jobs are labelled ``api-client=NAME``, and a
read-only client gets 403 on every change).
``/healthz``, ``/openapi.json`` and ``/docs`` stay open for load balancers and
people; ``/metrics`` (Prometheus text, see ``producer.metrics``) is guarded
like ``/v1``.

Errors:

- a malformed body or query → 422 in FastAPI's shape, ``loc`` naming the field;
- a job the registry, storage or database refuses (unknown model, malformed or
  missing S3 URI, output inside the input, …) → 422 in the same shape, with
  the project's own message and the field it concerns;
- an unknown job id → 404 ``{"detail": "no job with id …"}``; a job id that is
  not a UUID → 422 naming the ``job_id`` path parameter;
- storage, broker or database unreachable → 503 naming what failed.

Metric values are floats, except PSNR of identical images, which is +inf and
is sent as the string ``"inf"`` (JSON has no infinity), as ``deblur results
--format json`` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from kombu.exceptions import OperationalError as BrokerError
from pydantic_core import PydanticCustomError
from sqlalchemy.exc import OperationalError as DatabaseError
from sqlalchemy.orm import Session

from db import queries
from db.engine import ensure_schema, session_scope
from jobs.errors import (
    ConfigurationError,
    InputError,
    InvalidModelSpecError,
    JobFinishedError,
    JobKeyReusedError,
    LicenseError,
    OutputsBusyError,
    TransientError,
    UnknownJobError,
    UnknownModelError,
    WeightsError,
    describe_failure,
)
from jobs.labels import API_CLIENT_LABEL, check_submitted_labels, parse_labels
from jobs.layout import parse_output_format
from jobs.statuses import IMAGE_STATUSES, JOB_STATUSES
from jobs.s3uri import parse_s3_uri
from jobs.settings import Settings
from models.catalog import MAX_ENSEMBLE_MEMBERS, REGISTRY
from models.registry import describe
from models.tone import LIGHT_HELP
from producer.api_clients import SHARED_TOKEN_CLIENT, ApiClient, ClientRegistry
from producer.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from producer.metrics import (
    RECENT_WINDOW_S,
    call_with_time_limit,
    queue_age_seconds,
    read_queue_state,
    render_metrics,
)
from producer.retry import retry_images
from producer.submit import MAX_WINDOW, JobRequest, preview, submit
from producer.tracking import (
    cancel_job,
    fetch_results,
    job_status,
    list_jobs as find_jobs,
    pause_job,
    ranking_metric,
    results_json,
    resume_job,
)
from producer.usage import DEFAULT_PERIOD, GROUPING_HELP, check_groupings, parse_moment, usage_report
from producer.verify import verify_outputs

log = logging.getLogger(__name__)

API_VERSION = "v1"
MAX_PAGE = 1000
HEALTH_TIMEOUT_S = 5.0
MAX_INPUTS = 100_000  # URIs in one request body; list more under a prefix
MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body larger than this is refused (413) before it is parsed
MAX_ERRORS_SHOWN = 20  # validation errors listed in one 422; the rest are counted
MAX_ECHO_CHARS = 200  # of a refused value quoted back in a 422
MAX_MESSAGE_CHARS = 2000  # of an error message (a message may quote the whole value it refuses)

# +inf (PSNR of identical images) travels as the string "inf".
MetricValue = float | Literal["inf", "-inf"] | None


# --------------------------------------------------------------------------- errors


def _shortened(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def _echo(value: Any) -> Any:
    """A refused value as a 422 may quote it back: JSON-safe (NaN and infinities as the strings "nan", "inf",
    "-inf", which JSON cannot carry as numbers) and short (a long string is cut, a list or object is described)."""
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, str):
        return _shortened(value, MAX_ECHO_CHARS)
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return f"(a list of {len(value)} item(s))"
    if isinstance(value, dict):
        return f"(an object of {len(value)} field(s))"
    return _shortened(repr(value), MAX_ECHO_CHARS)


def validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's 422 ``detail`` for ``errors`` (pydantic's), safe to send whatever was refused: each value
    quoted back JSON-safe and short (a body with NaN in it once got a 500, and one with 100,000 bad URIs a 16-MB
    answer), each once (a path parameter that two dependencies declare is refused by both), at most
    ``MAX_ERRORS_SHOWN`` errors, then one that counts the rest."""
    distinct: dict[tuple[str, str, str], dict[str, Any]] = {}
    for error in errors:
        distinct.setdefault((repr(error.get("loc")), str(error.get("msg")), str(error.get("type"))), error)
    errors = list(distinct.values())
    detail = [{"loc": list(error.get("loc", ())), "msg": _shortened(str(error.get("msg", ""))),
               "type": str(error.get("type", "value_error")),
               **({"input": _echo(error["input"])} if "input" in error else {}),
               **({"ctx": {str(k): _echo(v) for k, v in error["ctx"].items()}} if error.get("ctx") else {})}
              for error in errors[:MAX_ERRORS_SHOWN]]
    if len(errors) > MAX_ERRORS_SHOWN:
        detail.append({"loc": [], "msg": f"and {len(errors) - MAX_ERRORS_SHOWN} more error(s) like these",
                       "type": "value_error"})
    return detail


class BodySizeLimit:
    """ASGI middleware that refuses a request body over ``limit`` bytes with 413 before the route parses it,
    whether its size is announced (Content-Length) or not (chunked: the read stops at the limit)."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    def _message(self) -> str:
        return (f"the request body is over {self.limit // (1024 * 1024)} MB: list more images under an S3 prefix, "
                f"or submit them in several jobs")

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced = dict(scope.get("headers") or []).get(b"content-length", b"")
        if announced.isdigit() and int(announced) > self.limit:
            await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # raised inside the route's body read: FastAPI answers an HTTPException from there as it is
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)


# --------------------------------------------------------------------------- request bodies


def _check_input_uri(text: str) -> str:
    # Only S3 URIs: a manifest path would be read from the API server's own disk.
    try:
        parse_s3_uri(text)
    except InputError as exc:
        raise PydanticCustomError("value_error", str(exc)) from None
    return text


def _check_prefix_uri(text: str | None) -> str | None:
    if text is not None:
        try:
            parse_s3_uri(text, want_prefix=True)
        except InputError as exc:
            raise PydanticCustomError("value_error", str(exc)) from None
    return text


def _check_output_format(text: str | None) -> str | None:
    if text is not None:
        try:
            parse_output_format(text)
        except InputError as exc:
            raise PydanticCustomError("value_error", str(exc)) from None
    return text


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    try:
        return check_submitted_labels(labels)
    except InputError as exc:
        raise PydanticCustomError("value_error", str(exc).removeprefix("--label: ")) from None


def _check_model_spec(text: str) -> str:
    try:
        REGISTRY.parse(text)
    except InputError as exc:
        raise PydanticCustomError("value_error", str(exc)) from None
    return text


def _integral_float_as_int(value: Any) -> Any:
    """5.0 as 5: JSON has one number type, and some encoders write every number with a point; 5.5 is left for the
    strict check to refuse, as are true and "5"."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_integral_float_as_int)]
"""An integer field of a request body: a whole number, with or without a point; not true, not "5", not 5.5."""


class JobSubmission(BaseModel):
    """A deblur or evaluation job; the fields mirror ``deblur submit`` / ``deblur evaluate``."""

    model_config = ConfigDict(extra="forbid", strict=True)  # true is no priority, "7" no number (WholeNumber)

    kind: Literal["deblur", "evaluate"] = Field(
        "deblur", description="deblur: restore and write outputs; evaluate: PSNR/SSIM against sharp references.")
    inputs: list[Annotated[str, AfterValidator(_check_input_uri)]] = Field(
        min_length=1, max_length=MAX_INPUTS,
        description="S3 keys (s3://bucket/scan.tif) or prefixes (s3://bucket/scans/, recursive). For an "
                    "evaluation job, the blurred images. Manifest files are a CLI feature: list the URIs here.",
        examples=[["s3://archive/scans/"]],
    )
    output: Annotated[str | None, AfterValidator(_check_prefix_uri)] = Field(
        None, description="S3 prefix for the restored images (required for deblur jobs); outputs mirror the "
                          "input's relative paths.", examples=["s3://archive/restored/"])
    models: list[Annotated[str, AfterValidator(_check_model_spec)]] = Field(
        default_factory=list, max_length=MAX_ENSEMBLE_MEMBERS,
        description=f"Model specs NAME[:PARAMS][:WEIGHT] (see GET /v1/models); several (up to "
                    f"{MAX_ENSEMBLE_MEMBERS}, each named once) form an ensemble. "
                    "Empty: the default ensemble.",
        examples=[["wiener:psf=motion:length=7,angle=30", "richardson-lucy:0.5"]],
    )
    sharp: Annotated[str | None, AfterValidator(_check_prefix_uri)] = Field(
        None, description="Evaluation jobs: S3 prefix of the sharp images, paired with inputs by relative path.")
    gopro: bool = Field(False, description="Evaluation jobs: GoPro layout, */blur/* paired with */sharp/*.")
    strength: float = Field(1.0, ge=0.0, le=1.0, description="1 = fully restored, 0 = the input unchanged.")
    batch_size: WholeNumber | None = Field(None, ge=1, le=10_000,
                                           description="Images per task (default: the server's).")
    priority: WholeNumber = Field(5, ge=0, le=9, description="0 (lowest) … 9 (most urgent).")
    window: WholeNumber | None = Field(
        None, ge=0, le=MAX_WINDOW,
        description="At most this many of the job's batches in the broker at once, the next sent as each finishes, "
                    "so jobs submitted later at the same priority take turns with this one; 0: every batch at once. "
                    "Unset: the server's DEBLUR_JOB_WINDOW.")
    labels: Annotated[dict[str, str], AfterValidator(_check_labels)] = Field(
        default_factory=dict, description="Labels of your own (up to 20), e.g. {\"team\": \"ingest\"}: returned "
                                          "with the job and in notifications; GET /v1/jobs?label=team=ingest "
                                          "selects by them.", examples=[{"team": "ingest", "collection": "1923"}])
    strip_metadata: bool = Field(False, description="Do not copy EXIF/ICC/XMP to the outputs.")
    align: bool = Field(False, description="Evaluation jobs: RealBlur protocol (intensity matching and ECC "
                                           "alignment to the sharp image) before measuring.")
    crop_border: WholeNumber = Field(0, ge=0, le=1000, description="Evaluation jobs: pixels ignored at each border.")
    light: Literal["encoded", "linear"] | None = Field(  # models.tone.LIGHT_CHOICES, spelled out for the schema
        None, description=LIGHT_HELP + " Unset: each model spec decides (light=...).")
    job_key: str | None = Field(
        None, min_length=1, max_length=255,
        description="Idempotency key (same as the Idempotency-Key header): a repeated key with the same body "
                    "returns the first job (200); with another body it is refused (409). "
                    "With a client's own token (DEBLUR_API_CLIENTS) the keys are that client's: another client's "
                    "equal key is another job.")
    notify_url: str | None = Field(
        None, max_length=2048,
        description="POSTed a JSON summary ({event, delivery, job}) each time the job finishes: done, failed or "
                    "cancelled. Signed with X-Deblur-Signature: sha256=HMAC when the workers have "
                    "DEBLUR_NOTIFY_SECRET; retried with back-off while the receiver is down or answers 5xx.",
        examples=["https://backend.example/hooks/deblur"])
    skip_existing: bool = Field(
        False, description="Leave out images whose output already exists under output (e.g. a nightly run that "
                           "restores only new scans). When that leaves none, no job is made: id is null (200).")
    output_format: Annotated[str | None, AfterValidator(_check_output_format)] = Field(
        None, description="Deblur jobs: write every output in this format (png, tiff, jp2, webp, jpeg, bmp), its "
                          "key's extension changed to match (scan.jpg → scan.png), e.g. png to keep restorations "
                          "of JPEGs lossless; or only some inputs: 'jpeg=png,webp=png'. An image the format "
                          "cannot hold (alpha as jpeg) fails alone. Unset: each input's format.",
        examples=["png", "jpeg=png,webp=png"])
    quality: WholeNumber | None = Field(None, ge=1, le=100, description="Deblur jobs: quality of JPEG and lossy WebP "
                                                                "outputs (unset: a JPEG input's own, else 95).")
    sidecar: bool = Field(False, description="Deblur jobs: write a provenance record (OUTPUT.deblur.json) next to "
                                             "each output: input and output SHA-256, models and weights' digests, "
                                             "settings, metrics, worker and time.")

    def to_request(self, job_key: str | None, api_client: str | None = None) -> JobRequest:
        return JobRequest(
            kind=self.kind, inputs=list(self.inputs), output=self.output, models=list(self.models),
            references=self.sharp, gopro=self.gopro, strength=self.strength, batch_size=self.batch_size,
            priority=self.priority, strip_metadata=self.strip_metadata, job_key=job_key,
            align=self.align, crop_border=self.crop_border, light=self.light, skip_existing=self.skip_existing,
            notify_url=self.notify_url, output_format=self.output_format, quality=self.quality,
            sidecar=self.sidecar, window=self.window, labels=dict(self.labels), api_client=api_client,
        )


class RetryRequest(BaseModel):
    """Which images of a job to send again (their outputs are overwritten)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # true is no priority, "7" no number (WholeNumber)

    failed: bool = Field(True, description="Re-enqueue the images that failed.")
    stalled: bool = Field(False, description="Re-enqueue images pending or running for over stalled_after seconds.")
    stalled_after: WholeNumber = Field(3600, ge=1, le=10 * 365 * 86400,
                               description="Seconds after which a pending/running image is stalled.")

    @model_validator(mode="after")
    def _something_selected(self) -> RetryRequest:
        if not self.failed and not self.stalled:
            raise PydanticCustomError("value_error", "say what to retry: failed, stalled or both must be true")
        return self


# --------------------------------------------------------------------------- responses


class JobCreated(BaseModel):
    id: str | None = Field(description="The job id (a UUID); null when skip_existing left no image to submit.")
    created: bool = Field(description="false when an idempotency key returned an earlier job, or no job was made.")
    total: int = Field(description="Images in the job (so far, when submitting is true).")
    submitting: bool = Field(False, description="true when an idempotency key returned a job its first submission "
                                                "is still listing: total counts the images listed so far.")
    skipped: int = Field(0, description="Images left out by skip_existing because their output already existed.")
    ignored: dict[str, int] = Field(
        default_factory=dict, description="Files under the input prefixes that were left out because they are no "
                                          "images deblur reads, counted by extension ('.heic': 1231), and kernel "
                                          "PNGs an earlier job wrote ('kernel PNG').")
    status_url: str | None


JobStatusName = Literal["submitting", "queued", "running", "paused", "done", "failed", "cancelled"]
ImageStatusName = Literal["pending", "running", "done", "failed", "cancelled"]
JobKindName = Literal["deblur", "evaluate"]
assert get_args(JobStatusName) == JOB_STATUSES and get_args(ImageStatusName) == IMAGE_STATUSES  # one list each


class ErrorMessage(BaseModel):
    """A refusal or failure told in one sentence (401, 403, 404, 409, 413, 503)."""

    detail: str


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: body, query or path, then the field (and item index).")
    msg: str
    type: str
    input: Any = Field(None, description="The value refused, shortened (NaN and infinities as strings).")
    ctx: dict[str, Any] | None = None


class ValidationRefusal(BaseModel):
    """422: what is malformed or refused, each naming its field; a long list ends with one counting the rest."""

    detail: list[FieldError]


class JobListItem(BaseModel):
    id: str
    kind: JobKindName
    status: JobStatusName
    total: int
    created_at: str
    labels: dict[str, str] = Field(default_factory=dict)
    status_url: str


class JobStatus(BaseModel):
    id: str
    kind: JobKindName
    status: JobStatusName = Field(description="submitting, queued, running, paused, done, failed or cancelled.")
    total: int
    counts: dict[str, int] = Field(description="Images per status: pending, running, done, failed, cancelled.")
    finished: int = Field(description="Images done, failed or cancelled.")
    images_per_s: float | None = Field(description="Throughput since the first image started.")
    eta_s: float | None = Field(description="Estimated seconds until every image is finished.")
    error: str | None
    spec: dict[str, Any] | None = Field(description="The job as submitted (models canonicalised).")
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    submission_stalled: bool = Field(
        False, description="Still submitting with no progress for over 10 minutes: its producer probably died "
                           "mid-listing. The next submission marks it failed; submitting again with the same job key "
                           "gives the key to a new job.")
    batches: dict[str, int] | None = Field(
        None, description="Jobs with a window: the window, and batches listed, sent so far and in flight (in the "
                          "broker or running). Null without a window.")
    review: dict[str, int] = Field(
        default_factory=dict,
        description="Done images a person should look at, per reason: not_restored (blur detected but no kernel "
                    "estimate held, returned as it came) and judged_sharp (no blur worth removing found). "
                    "GET images_url?review=true lists them.")
    images_url: str
    summary_url: str


class EarlierAttempt(BaseModel):
    finished_at: str | None
    status: str = Field(description="done or failed.")
    error: str | None = Field(description="Why it failed (null for attempts kept before errors were).")
    worker: str | None
    device: str | None
    inference_s: float | None


class ImageResult(BaseModel):
    id: int
    input: str
    output: str | None = Field(description="The restored image; null unless done.")
    reference: str | None
    kernel: str | None = Field(description="Estimated blur kernel, when the model produced one.")
    status: ImageStatusName
    error: str | None
    attempts: int
    width: int | None
    height: int | None
    format: str | None
    bit_depth: int | None
    download_s: float | None
    inference_s: float | None
    upload_s: float | None
    device: str | None
    worker: str | None
    model_versions: dict[str, Any] | None
    input_sha256: str | None = Field(None, description="SHA-256 of the input as the worker read it.")
    output_sha256: str | None = Field(None, description="SHA-256 of the output as written; null unless done. "
                                                        "'deblur verify' checks it against the stored object.")
    review: str | None = Field(None, description="Why a person should look at this done image: not_restored or "
                                                 "judged_sharp (the blind model returned it as it came); null when "
                                                 "there is no reason.")
    started_at: str | None
    finished_at: str | None
    metrics: dict[str, MetricValue] = Field(
        description="The ensemble's metrics by name (psnr, ssim, …) and the input's as input_<name>.")
    metrics_by_model: dict[str, dict[str, MetricValue]] = Field(
        description="Every model's metrics, including 'input' and 'ensemble'.")
    earlier_attempts: list[EarlierAttempt] | None = Field(
        None, description="With history=true: the outcomes the image had before this one, oldest first.")


class ImagePage(BaseModel):
    job_id: str
    items: list[ImageResult]
    limit: int
    offset: int
    total: int = Field(description="Images matching the filter (capped at worst when given).")
    next_offset: int | None = Field(description="offset of the next page; null on the last page.")
    next_after: int | None = Field(None, description="after for the next page (the last item's id); null on the "
                                                     "last page and with worst.")


class SummaryRow(BaseModel):
    model: str = Field(description="A member model, 'ensemble' or 'input'.")
    name: str = Field(description="Metric name (psnr, ssim, …).")
    mean: MetricValue
    count: int = Field(description="Done images the mean is over.")
    non_finite: int = Field(0, description="Infinite values left out of the mean (a PSNR is infinite where an "
                                           "image equals its reference); when every value is, the mean is that "
                                           "infinity and count counts them.")


class JobSummary(BaseModel):
    job_id: str
    status: str
    metrics: list[SummaryRow]


class PreviewItem(BaseModel):
    input: str
    output: str | None
    reference: str | None = None


class JobPreview(BaseModel):
    total: int = Field(description="Images the job would hold.")
    skipped: int = Field(0, description="Images skip_existing would leave out.")
    ignored: dict[str, int] = Field(default_factory=dict, description="As in the answer to POST /jobs.")
    sample: list[PreviewItem] = Field(description="The first images, with where their outputs would go.")


class CancelResult(BaseModel):
    id: str
    status: str
    cancelled: int = Field(description="Pending images that will be skipped; running images still finish.")


class PauseResult(BaseModel):
    id: str
    status: str = Field(description="The job's status now: paused, or queued/running after a resume.")
    changed: bool = Field(description="False when the job was paused (or not paused) already.")
    sent: int = Field(0, description="Resume: batches sent at once to fill the job's window.")


class RetryResult(BaseModel):
    id: str
    requeued: int


class VerifyRequest(BaseModel):
    """How to check a job's outputs (``deblur verify``)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # true is no priority, "7" no number (WholeNumber)

    quick: bool = Field(True, description="Compare the SHA-256 the store kept from each upload (a HEAD request, no "
                                          "egress) instead of reading every output back; outputs whose store keeps "
                                          "none are read anyway.")
    mark_failed: bool = Field(False, description="Record missing and changed outputs as failed images, ready for "
                                                 "POST .../retry.")


class VerifyResult(BaseModel):
    """What verification found; ``missing`` and ``changed`` list the first 100 (input, output) pairs."""

    id: str
    checked: int
    intact: int
    unrecorded: int = Field(description="Present, but written before checksums were recorded: existence only.")
    by_store_checksum: int = Field(description="Judged by the store's checksum, without reading the output.")
    missing: list[tuple[str, str]]
    changed: list[tuple[str, str]]
    problems: int


class ModelParam(BaseModel):
    name: str
    type: str
    default: Any
    help: str


class ModelDescription(BaseModel):
    name: str = Field(description="The NAME to use in a model spec.")
    family: str
    license: str
    noncommercial: bool
    weights_present: bool
    weights_file: str | None
    summary: str
    size_rules: str
    size_multiple: int
    tile_size: int | None
    dtypes: list[str]
    produces_kernel: bool
    params: list[ModelParam]


class QueueSummary(BaseModel):
    """The whole queue, for backends deciding when to submit (the figures of ``deblur status`` and /metrics)."""

    jobs: dict[str, int] | None = Field(description="Jobs by state; null when the database did not answer.")
    images: dict[str, int] | None = Field(
        description="Images of unfinished jobs (paused ones included) by state: pending and running are the work "
                    "left.")
    oldest_unfinished_job_age_s: float | None
    stalled_images: int | None = Field(description="Running past the visibility timeout ('retry --stalled').")
    worker_lost_images: int | None = Field(description="Back in the queue after their worker died.")
    finished_recently: dict[str, int] | None = Field(description="Outcomes within recent_window_s, by outcome.")
    megapixels_recently: float | None
    recent_window_s: int
    waiting_batches: dict[str, int] | None = Field(
        description="Batches waiting in the broker by the priority they were submitted at (0-9); null when the "
                    "broker did not answer.")
    unacked_batches: int | None = Field(description="Batches taken by workers and not yet acknowledged.")
    down: dict[str, str] = Field(description="Sources that did not answer, with the reason.")


class UsageGroup(BaseModel):
    """One group's totals; its grouping keys (``label:team``, ``model``, ``month``, ...) come first."""

    model_config = ConfigDict(extra="allow")

    jobs: int
    images_done: int
    images_failed: int
    megapixels: float = Field(description="Of the images restored (failed ones count none).")
    model_seconds: float = Field(description="The models' time, failed images' included.")
    worker_seconds: float = Field(description="Model time plus reading the inputs and writing the outputs.")
    model_seconds_per_megapixel: float | None


class UsageSummary(BaseModel):
    """What the workers spent over ``[since, until)``, per group and in all (``deblur usage``)."""

    since: datetime
    until: datetime
    by: list[str]
    groups: list[UsageGroup]
    total: UsageGroup
    includes_pruned_jobs: bool = Field(
        description="Pruned jobs' rollups contributed; they count by whole UTC days.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(description="'ok' or what went wrong, per dependency.")


# --------------------------------------------------------------------------- helpers

JobId = Annotated[uuid.UUID, Path(description="The job id (a UUID) returned by POST /v1/jobs.")]

# Our error messages quote CLI options; map them to the body field they concern.
# the longer option first where one begins another (--output-format before --output)
_OPTION_FIELDS = {"--strength": "strength", "--batch-size": "batch_size", "--priority": "priority",
                  "--window": "window", "--output-format": "output_format", "--quality": "quality",
                  "--sidecar": "sidecar", "--output": "output", "--sharp": "sharp", "--gopro": "gopro",
                  "--crop-border": "crop_border", "--align": "align", "--skip-existing": "skip_existing"}
_MODEL_ERRORS = (UnknownModelError, InvalidModelSpecError, LicenseError, WeightsError)
# the command line's flags that submission's messages name, as the API's fields (the rest are spelt alike)
_FLAG_FIELDS = {**{option[2:]: name for option, name in _OPTION_FIELDS.items()},
                "model": "models", "label": "labels", "notify": "notify_url", "job-key": "job_key"}
# a flag as the messages write it (followed by a space or punctuation), not '--sharp' inside a user's own key
_FLAG = re.compile(r"(?<![\w-])--(%s)(?=[\s:,;)]|$)" % "|".join(sorted(map(re.escape, _FLAG_FIELDS), key=len,
                                                                     reverse=True)))


def _submission_refused(exc: InputError, body: JobSubmission) -> RequestValidationError:
    """The 422 answer for a submission (or preview) that validation refused, located at the field it concerns
    and worded in the API's field names ('skip_existing needs output', not '--skip-existing needs --output')."""
    field = _error_field(exc, body)
    message = _FLAG.sub(lambda flag: _FLAG_FIELDS[flag.group(1)], str(exc))
    return _validation_error(("body", field) if field else ("body",), message)


def scoped_key(key: str | None, client: ApiClient) -> str | None:
    """The job key as stored for ``client``: each client's keys are its own (another's 'nightly-1' is another
    job), hashed when the name and key together would be too long to store."""
    if not key or not client.name:
        return key
    scoped = f"{API_CLIENT_LABEL}/{client.name}/{key}"
    return scoped if len(scoped) <= 255 else (
        f"{API_CLIENT_LABEL}/{client.name}/sha256:{hashlib.sha256(key.encode()).hexdigest()}")


def _openapi_with_common_answers(app: FastAPI) -> dict[str, Any]:
    """The schema FastAPI derives, with the answers every guarded route can give (401 without a valid token,
    503 when a service is down, 403 to a read-only client on a change, 413 for a body over the limit), which its
    routes do not declare one by one; built once."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                         routes=app.routes)
    message = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorMessage"}}}
    common = {
        "401": "Missing or wrong bearer token.",
        "503": "Storage, the broker or the database does not answer (Retry-After says when to try again).",
    }
    for path, operations in schema.get("paths", {}).items():
        if not (path.startswith(f"/{API_VERSION}/") or path == "/metrics"):
            continue
        for method, operation in operations.items():
            answers = operation.setdefault("responses", {})
            extra = dict(common)
            if method in ("post", "put", "patch", "delete"):
                extra["403"] = "This client may only read, or asked past its limits (DEBLUR_API_CLIENTS)."
                extra["413"] = f"The body is over {MAX_BODY_BYTES // (1024 * 1024)} MB."
            for code, description in extra.items():
                answers.setdefault(code, {"description": description, "content": message})
    app.openapi_schema = schema
    return schema


def _error_field(exc: InputError, body: JobSubmission) -> str | None:
    """The body field an InputError from submission concerns, when the message tells."""
    if isinstance(exc, _MODEL_ERRORS):
        return "models"
    message = str(exc)
    for option, name in _OPTION_FIELDS.items():
        if message.startswith(option) or f"needs {option}" in message:
            return name
    if message.startswith("output"):
        return "output"
    if message.startswith("sharp prefix"):
        return "sharp"
    if message.startswith("notify URL"):
        return "notify_url"
    if message.startswith(("input", "no images", "no input")):
        return "inputs"
    bucket = re.match(r"bucket '([^']+)'", message)
    if bucket:
        fields = (("inputs", body.inputs), ("output", [body.output]), ("sharp", [body.sharp]))
        for name, uris in fields:
            if any(u and u.startswith(f"s3://{bucket.group(1)}/") or u == f"s3://{bucket.group(1)}" for u in uris):
                return name
    return None


def _validation_error(loc: tuple[str | int, ...], message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def _json_ready(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # results_json is the one place that turns +inf into "inf"; reuse it rather than copy it.
    return json.loads(results_json(rows))  # type: ignore[no-any-return]


def _probe(check: Callable[[], None]) -> str:
    """Run ``check`` with a time limit; 'ok' or a one-line reason."""
    try:
        call_with_time_limit(check, HEALTH_TIMEOUT_S)
    except TimeoutError as exc:
        return str(exc)
    except Exception as exc:  # any failure means "down"; the type and first line say why
        return describe_failure(exc)
    return "ok"


# --------------------------------------------------------------------------- the app


def create_app(settings: Settings) -> FastAPI:
    """The API for ``settings`` (database, broker, S3, token); serve it with any ASGI server."""
    db_url = settings.resolved_database_url()
    prefix = f"/{API_VERSION}"

    app = FastAPI(
        title="deblur",
        version=API_VERSION,
        summary="Submit deblur and evaluation jobs over images in S3, follow them and read per-image metrics.",
        description=__doc__,
    )

    @contextmanager
    def session() -> Iterator[Session]:
        ensure_schema(db_url)
        with session_scope(db_url) as s:
            yield s

    bearer = HTTPBearer(auto_error=False, description="A client's token (DEBLUR_API_CLIENTS, see 'deblur api-client "
                                                      "add') or the shared DEBLUR_API_TOKEN.")
    registry = ClientRegistry(settings.api_clients, settings.api_token)

    # a default rather than Annotated: postponed annotations cannot see the local ``bearer``
    def caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiClient:  # noqa: B008
        """Who is asking: the client whose token this is (401 for none or an unknown one)."""
        if not registry.required:
            return SHARED_TOKEN_CLIENT
        try:
            client = registry.authenticate(credentials.credentials) if credentials is not None else None
        except ConfigurationError:
            raise HTTPException(503, "the API's clients file (DEBLUR_API_CLIENTS) cannot be read or parsed; "
                                     "see the API server's log", headers={"Retry-After": "5"}) from None
        if client is None:
            raise HTTPException(
                401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' with your client's token "
                     "or the shared DEBLUR_API_TOKEN", headers={"WWW-Authenticate": "Bearer"},
            )
        return client

    def submitter(client: ApiClient = Depends(caller)) -> ApiClient:  # noqa: B008
        """A caller that may change things (scope submit); 403 for a read-only client."""
        if not client.may_submit:
            raise HTTPException(403, f"client {client.name!r} may only read (scope 'read' in DEBLUR_API_CLIENTS); "
                                     "submitting, cancelling, pausing, retrying and verifying need scope 'submit'")
        return client

    def owner_of(job_id: JobId) -> str | None:
        """The client that submitted the job (its api-client label), or None; 404 for no such job."""
        with session() as s:
            return ((queries.get_job(s, str(job_id)).spec or {}).get("labels") or {}).get(API_CLIENT_LABEL)

    def job_changer(job_id: JobId, client: ApiClient = Depends(submitter)) -> ApiClient:  # noqa: B008
        """A caller that may change this job: the client that submitted it, or the shared token (any job). To a
        client that sees only its own jobs, another's does not exist (404)."""
        if client.name is None:
            return client
        owner = owner_of(job_id)
        if owner != client.name and not client.sees_all:
            raise queries.unknown_job(str(job_id))  # word for word what a job that does not exist answers
        if owner != client.name:
            by = "another client" if owner else "the command line or the shared token"
            raise HTTPException(403, f"job {job_id} was submitted by {by}: only the client that submitted a job "
                                     "(or the shared DEBLUR_API_TOKEN) may change it")
        return client

    def job_reader(job_id: JobId, client: ApiClient = Depends(caller)) -> ApiClient:  # noqa: B008
        """A caller that may read this job: any, unless its client sees only its own jobs (others answer 404,
        as if they did not exist)."""
        if client.sees_all:
            return client
        if owner_of(job_id) != client.name:
            raise queries.unknown_job(str(job_id))  # word for word what a job that does not exist answers
        return client

    def client_limits(body: JobSubmission, client: ApiClient) -> JobSubmission:
        """``body`` within what ``client`` may submit: a job that names no priority gets the client's highest (or
        less), one above it is refused (403), and its window is capped by the client's."""
        if client.max_priority is not None and "priority" not in body.model_fields_set:
            body = body.model_copy(update={"priority": min(body.priority, client.max_priority)})
        if client.max_priority is not None and body.priority > client.max_priority:
            raise HTTPException(403, f"client {client.name!r} may submit jobs up to priority {client.max_priority} "
                                     f"(its max_priority in DEBLUR_API_CLIENTS); this one asks for {body.priority}")
        return body.model_copy(update={"window": client.limited_window(body.window)})

    guarded = [Depends(caller)]
    readers = [Depends(job_reader)]
    changers = [Depends(job_changer)]

    app.add_middleware(BodySizeLimit)
    app.openapi = lambda: _openapi_with_common_answers(app)  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    def _malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_errors(list(exc.errors()))}, status_code=422)

    @app.exception_handler(UnknownJobError)
    def _unknown_job(_: Request, exc: UnknownJobError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(JobKeyReusedError)
    def _key_reused(_: Request, exc: JobKeyReusedError) -> JSONResponse:
        return JSONResponse({"detail": _shortened(str(exc))}, status_code=409)

    @app.exception_handler(JobFinishedError)  # before InputError, its base: a conflict, not a malformed request
    def _job_finished(_: Request, exc: JobFinishedError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(InputError)
    def _input_error(_: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": [], "msg": _shortened(str(exc)), "type": "value_error"}]},
                            status_code=422)

    @app.exception_handler(TransientError)
    def _transient(_: Request, exc: TransientError) -> JSONResponse:
        return JSONResponse({"detail": _shortened(str(exc))}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(BrokerError)
    def _broker_down(_: Request, exc: BrokerError) -> JSONResponse:
        log.warning("broker unreachable: %s", exc)
        return JSONResponse({"detail": f"the broker (Redis) is unreachable: {exc}"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(DatabaseError)
    def _database_down(_: Request, exc: DatabaseError) -> JSONResponse:
        # the driver's message can quote SQL and parameters: keep it in the server log only
        log.warning("database error: %s", exc)
        return JSONResponse({"detail": f"the database is unreachable or refused the query "
                                       f"({type(exc.orig).__name__}); see the API server's log"},
                            status_code=503, headers={"Retry-After": "5"})

    def urls(job_id: str) -> dict[str, str]:
        return {"status_url": f"{prefix}/jobs/{job_id}", "images_url": f"{prefix}/jobs/{job_id}/images",
                "summary_url": f"{prefix}/jobs/{job_id}/summary"}

    @app.post(
        f"{prefix}/jobs", response_model=JobCreated, status_code=201, tags=["jobs"],
        responses={200: {"model": JobCreated, "description": "The key was used before: the first job."},
                   409: {"model": ErrorMessage,
                         "description": "The key was used before with another request (its first job is not this "
                                        "one, so nothing is made; use a new key), or an unfinished job has still "
                                        "to write one of this job's outputs."},
                   422: {"model": ValidationRefusal,
                         "description": "A field is malformed or refused (unknown model, missing bucket, …)."}},
    )
    def create_job(
        body: Annotated[JobSubmission, Body()],
        response: Response,
        idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255,
                                                      description="Same as job_key in the body.")] = None,
        client: ApiClient = Depends(submitter),  # noqa: B008
    ) -> JobCreated:
        """Validate and enqueue a job (201); a repeated idempotency key returns the first job (200).

        Nothing is written or enqueued when validation fails. Listing a large
        prefix streams page by page, so this call can take a while for
        millions of keys.
        """
        if idempotency_key and body.job_key and idempotency_key != body.job_key:
            raise _validation_error(("body", "job_key"), f"job_key {body.job_key!r} differs from the "
                                    f"Idempotency-Key header {idempotency_key!r}; send one of them")
        body = client_limits(body, client)
        asked_key = idempotency_key or body.job_key
        key = scoped_key(asked_key, client)
        try:
            result = submit(body.to_request(key, api_client=client.name), settings)
        except JobKeyReusedError as exc:  # 409, quoting the key as the client sent it, not as it is stored
            raise JobKeyReusedError(str(exc).replace(repr(key), repr(asked_key))) from None
        except JobFinishedError:
            raise  # 409: a job cancelled while it was listed, not a bad field
        except OutputsBusyError as exc:
            raise busy_outputs(exc, client) from None
        except InputError as exc:
            raise _submission_refused(exc, body) from None
        if not result.created:
            response.status_code = 200
        if not result.job_id:  # skip_existing left nothing to do
            return JobCreated(id=None, created=False, total=0, skipped=result.skipped, ignored=result.ignored,
                              status_url=None)
        response.headers["Location"] = urls(result.job_id)["status_url"]
        return JobCreated(id=result.job_id, created=result.created, total=result.total, skipped=result.skipped,
                          ignored=result.ignored, status_url=urls(result.job_id)["status_url"],
                          submitting=result.listing)

    def busy_outputs(exc: OutputsBusyError, client: ApiClient,
                     advice: str = "choose another output prefix, or wait") -> HTTPException:
        """409 for outputs another unfinished job has still to write; a client that may not read that job is not
        told its id (to it, another client's job does not exist), only that its outputs are taken."""
        if client.name is None or client.sees_all or owner_of(uuid.UUID(exc.other_job)) == client.name:
            return HTTPException(409, _shortened(str(exc)))
        return HTTPException(409, f"output {exc.output} is one an unfinished job of another client has still to "
                                  f"write: the two jobs would write over each other's results; {advice}")

    @app.post(f"{prefix}/jobs/preview", response_model=JobPreview, tags=["jobs"])
    def preview_job(body: Annotated[JobSubmission, Body()],
                    sample: Annotated[int, Query(ge=0, le=MAX_PAGE)] = 5,
                    client: ApiClient = Depends(submitter)) -> JobPreview:  # noqa: B008
        """Validate a job as POST /jobs would and say what it would hold; nothing is written or enqueued.

        Invalid jobs get the same 403 and 422 answers as POST /jobs (the client's priority limit and labels
        included). Lists the whole input, so this call takes as long as submitting the job would.
        """
        body = client_limits(body, client)
        try:  # the key as POST /jobs would store it: a re-send of a keyed job is not its own obstacle
            seen = preview(body.to_request(scoped_key(body.job_key, client), api_client=client.name), settings,
                           sample=sample)
        except OutputsBusyError as exc:
            raise busy_outputs(exc, client) from None
        except InputError as exc:
            raise _submission_refused(exc, body) from None
        return JobPreview(total=seen.total, skipped=seen.skipped, ignored=seen.ignored,
                          sample=[PreviewItem(**item.model_dump()) for item in seen.sample])

    @app.get(f"{prefix}/jobs", response_model=list[JobListItem], dependencies=guarded, tags=["jobs"])
    def list_jobs(
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
        label: Annotated[list[str] | None, Query(description="KEY=VALUE: only jobs with this label (repeat: all of "
                                                             "them).")] = None,
        status: Annotated[Literal[JOB_STATUSES] | None,  # type: ignore[valid-type]
                          Query(description="Only jobs in this state.")] = None,
        mine: Annotated[bool, Query(description="Only jobs submitted with your client token (label "
                                                f"{API_CLIENT_LABEL}).")] = False,
        before: Annotated[uuid.UUID | None, Query(
            description="The id of the last job of the previous page: the next page starts after it (newest "
                        "first; none is skipped or repeated while jobs arrive).")] = None,
        client: ApiClient = Depends(caller),  # noqa: B008
    ) -> list[JobListItem]:
        """The most recent jobs, newest first; with ``label``, ``status`` and ``mine``, only those that match.
        Page with ``before``: the last id of one page asks for the next."""
        try:
            wanted = parse_labels(label or [])
        except InputError as exc:
            raise _validation_error(("query", "label"), str(exc)) from None
        if mine or not client.sees_all:
            if client.name is None:
                raise _validation_error(("query", "mine"), "mine=true needs a client's own token (DEBLUR_API_CLIENTS, "
                                                           "see 'deblur api-client add'); this request has none")
            if wanted.get(API_CLIENT_LABEL, client.name) != client.name:
                return []  # another client's jobs, asked by one that sees its own only: none it may see
            wanted[API_CLIENT_LABEL] = client.name
        try:
            found = find_jobs(settings, wanted, status, limit, before=str(before) if before else None)
        except UnknownJobError:
            raise _validation_error(("query", "before"), f"no job with id {before}: pass the id of the last job "
                                                         "of the previous page") from None
        return [JobListItem(**job, status_url=urls(job["id"])["status_url"]) for job in found]

    @app.get(f"{prefix}/jobs/{{job_id}}", response_model=JobStatus, dependencies=readers, tags=["jobs"],
             responses={404: {"model": ErrorMessage, "description": "No job with this id."}})
    def get_job(job_id: JobId,
                spec: Annotated[bool, Query(description="false: leave the spec out (null), e.g. when polling a job "
                                                        "submitted with 100,000 URIs, whose spec is megabytes")] = True,
                ) -> JobStatus:
        """A job's state, counts per image status, throughput (images/s) and ETA."""
        info = job_status(settings, str(job_id))
        if not spec:
            info = {**info, "spec": None}
        links = urls(info["id"])
        return JobStatus(**info, images_url=links["images_url"], summary_url=links["summary_url"])

    @app.get(f"{prefix}/jobs/{{job_id}}/images", response_model=ImagePage, dependencies=readers, tags=["results"],
             responses={404: {"model": ErrorMessage, "description": "No job with this id."}})
    def list_images(
        job_id: JobId,
        status: Annotated[Literal["pending", "running", "done", "failed", "cancelled"] | None,
                          Query(description="Only images with this status.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page size.")] = 100,
        offset: Annotated[int, Query(ge=0, le=2**62, description="Images to skip (use next_offset; next_after "
                                                                 "pages without skipping or repeating).")] = 0,
        after: Annotated[int | None, Query(ge=0, le=2**62, description="Only images after this image id (use "
                                                                      "next_after): pages that neither skip nor "
                                                                      "repeat an image whose status changes "
                                                                      "between them.")] = None,
        worst: Annotated[int | None, Query(ge=1, description="Only the N images with the lowest metric "
                                                             "(ensemble), worst first.")] = None,
        metric: Annotated[str | None, Query(min_length=1, description="Metric that worst sorts by, lowest first "
                                                                  "(default: psnr for evaluation jobs, "
                                                                  "laplacian_variance for deblur jobs); one the "
                                                                  "job's images lack is refused.")] = None,
        review: Annotated[bool, Query(description="Only done images flagged for review (the blind model returned "
                                                  "them as they came; see the job's review counts).")] = False,
        history: Annotated[bool, Query(description="Add each image's earlier attempts (a failure before a retry, "
                                                   "an output verify found missing).")] = False,
    ) -> ImagePage:
        """Page through a job's per-image results and metrics (ordered by image, or worst first)."""
        key = str(job_id)
        with session() as s:
            queries.get_job(s, key)
            if review:  # only done images are flagged
                matching = sum(queries.review_counts(s, key).values()) if status in (None, "done") else 0
            else:
                counts = queries.status_counts(s, key)
                matching = counts[status] if status else sum(counts.values())
        if after is not None and (worst is not None or offset):
            raise _validation_error(("query", "after"), "after pages in image order: it cannot be combined with "
                                                        "worst or offset")
        if worst is not None:
            try:
                metric = ranking_metric(settings, key, metric)
            except InputError as exc:
                raise _validation_error(("query", "metric"), str(exc)) from None
            matching = min(matching, worst)
            take = max(0, min(limit, worst - offset))
            rows = fetch_results(settings, key, status=status, worst=take, metric=metric, offset=offset,
                                 review=review, history=history) if take else []
        else:
            rows = fetch_results(settings, key, status=status, limit=limit, offset=offset, review=review,
                                 after_id=after, history=history)
        end = offset + len(rows)
        more = len(rows) == limit and (after is not None or end < matching)
        return ImagePage(job_id=key, items=[ImageResult(**row) for row in _json_ready(rows)], limit=limit,
                         offset=offset, total=matching,
                         next_offset=end if more and after is None else None,
                         next_after=rows[-1]["id"] if more and worst is None else None)

    @app.get(f"{prefix}/jobs/{{job_id}}/summary", response_model=JobSummary, dependencies=readers,
             tags=["results"], responses={404: {"model": ErrorMessage, "description": "No job with this id."}})
    def summary(job_id: JobId) -> JobSummary:
        """Mean of every metric per model (input, each member, ensemble) over the done images."""
        key = str(job_id)
        with session() as s:
            job = queries.get_job(s, key)
            rows = queries.metric_summary(s, key)
            status = job.status
        rows.sort(key=lambda r: (r["model"], r["name"]))
        return JobSummary(job_id=key, status=status, metrics=[SummaryRow(**r) for r in _json_ready(rows)])

    @app.post(f"{prefix}/jobs/{{job_id}}/cancel", response_model=CancelResult, dependencies=changers,
              tags=["jobs"], responses={404: {"model": ErrorMessage, "description": "No job with this id."},
                                        409: {"model": ErrorMessage, "description": "The job already finished."}})
    def cancel(job_id: JobId) -> CancelResult:
        """Cancel a job: pending images are skipped, images already running finish.

        Cancelling a cancelled job again is harmless; a job that already
        finished (done or failed) answers 409.
        """
        key = str(job_id)
        return CancelResult(id=key, status="cancelled", cancelled=cancel_job(settings, key))

    @app.post(f"{prefix}/jobs/{{job_id}}/pause", response_model=PauseResult, dependencies=changers, tags=["jobs"],
              responses={404: {"model": ErrorMessage, "description": "No job with this id."},
                         409: {"model": ErrorMessage, "description": "The job finished."},
                         422: {"model": ValidationRefusal,
                               "description": "The job has no window, or is still being submitted."}})
    def pause(job_id: JobId) -> PauseResult:
        """Hold a job submitted with a window back: no more of its batches are sent; those sent still run."""
        key = str(job_id)
        return PauseResult(id=key, status="paused", changed=pause_job(settings, key))

    @app.post(f"{prefix}/jobs/{{job_id}}/resume", response_model=PauseResult, dependencies=changers,
              tags=["jobs"], responses={404: {"model": ErrorMessage, "description": "No job with this id."},
                                        409: {"model": ErrorMessage, "description": "The job finished."}})
    def resume(job_id: JobId) -> PauseResult:
        """Let a paused job send its batches again, at once as many as its window holds."""
        key = str(job_id)
        sent = resume_job(settings, key)
        with session() as s:
            status = queries.job_status_of(s, key) or "unknown"
        return PauseResult(id=key, status=status, changed=sent is not None,
                           sent=sent or 0)

    @app.post(f"{prefix}/jobs/{{job_id}}/retry", response_model=RetryResult, tags=["jobs"],
              responses={404: {"model": ErrorMessage, "description": "No job with this id."},
                         409: {"model": ErrorMessage, "description": "Another unfinished job has still to write "
                                                                     "an output of an image to retry."}})
    def retry(job_id: JobId, body: Annotated[RetryRequest | None, Body()] = None,
              client: ApiClient = Depends(job_changer)) -> RetryResult:  # noqa: B008
        """Re-enqueue a job's failed and/or stalled images; outputs go to the same keys.

        Without a body, the failed images are retried. Refused (409), retrying nothing, while another
        unfinished job has still to write one of their outputs.
        """
        body = body or RetryRequest()
        key = str(job_id)
        try:
            n = retry_images(settings, key, failed=body.failed,
                             stalled_after=body.stalled_after if body.stalled else None)
        except OutputsBusyError as exc:
            raise busy_outputs(exc, client, "wait for it to finish, then retry") from None
        return RetryResult(id=key, requeued=n)

    @app.post(f"{prefix}/jobs/{{job_id}}/verify", response_model=VerifyResult, dependencies=changers,
              tags=["results"], responses={404: {"model": ErrorMessage, "description": "No job with this id."}})
    def verify(job_id: JobId, body: Annotated[VerifyRequest | None, Body()] = None) -> VerifyResult:
        """Check that every done image's output is still in storage as written (fixity).

        Answers when every output was checked: with ``quick`` (the default) one HEAD request each, so a job of
        tens of thousands of images takes minutes; the command line's ``deblur verify`` shows progress.
        """
        body = body or VerifyRequest()
        key = str(job_id)
        found = verify_outputs(settings, key, mark_failed=body.mark_failed, quick=body.quick)
        return VerifyResult(id=key, checked=found.checked, intact=found.intact, unrecorded=found.unrecorded,
                            by_store_checksum=found.by_store_checksum, missing=found.missing[:100],
                            changed=found.changed[:100], problems=found.problems)

    @app.get(f"{prefix}/models", response_model=list[ModelDescription], dependencies=guarded, tags=["models"])
    def list_models() -> list[dict[str, Any]]:
        """Every registered model: family, licence, whether its weights are present, parameters."""
        return [dict(describe(info)) for info in REGISTRY]

    @app.get("/metrics", dependencies=guarded, tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format; deblur_up names a source that did not answer."}})
    def metrics() -> Response:
        """The queue's Prometheus metrics: backlog, recent throughput, stalled images, waiting batches.

        Read at scrape time from the database and the broker (see ``deblur
        metrics --help`` and ``deploy/alerts.yml``). A source that is down gives
        ``deblur_up{source=...} 0``, not an error, so alerts on it can fire.
        Needs the bearer token when ``DEBLUR_API_TOKEN`` is set (Prometheus:
        ``authorization: {credentials_file: ...}``).
        """
        return Response(render_metrics(settings).text, media_type=METRICS_CONTENT_TYPE)

    @app.get(f"{prefix}/queue", response_model=QueueSummary, dependencies=guarded, tags=["operations"])
    def queue_summary() -> QueueSummary:
        """The whole queue now: work left, outcomes of the last minutes, stalls, batches waiting by priority.

        Answers even when the database or the broker is down: its fields are null and ``down`` says why.
        """
        state = read_queue_state(settings)
        db, broker = state.database, state.broker
        return QueueSummary(
            jobs=db.jobs if db else None, images=db.backlog if db else None,
            oldest_unfinished_job_age_s=queue_age_seconds(db.oldest_unfinished_created, state.now) if db else None,
            stalled_images=db.stalled if db else None, worker_lost_images=db.worker_lost if db else None,
            finished_recently=db.finished_recently if db else None,
            megapixels_recently=db.megapixels_recently if db else None, recent_window_s=RECENT_WINDOW_S,
            waiting_batches={str(p): n for p, n in broker.waiting.items()} if broker else None,
            unacked_batches=broker.unacked if broker else None, down=state.down)

    @app.get(f"{prefix}/usage", response_model=UsageSummary, tags=["operations"])
    def usage(
        since: Annotated[str, Query(description="Start: a time ago (30d, 12h, 2w, 90m) or a UTC date or "
                                                "date-time (2026-11-01, 2026-11-01T08:00Z).")] = DEFAULT_PERIOD,
        until: Annotated[str | None, Query(description="End (not included), as since. Default: now.")] = None,
        by: Annotated[list[str] | None, Query(description=f"Group by (repeat to nest): {GROUPING_HELP}.")] = None,
        label: Annotated[list[str] | None, Query(description="KEY=VALUE: only jobs with this label (repeat: all "
                                                             "of them).")] = None,
        kind: Annotated[Literal["deblur", "evaluate"] | None, Query(description="Only jobs of this kind.")] = None,
        client: ApiClient = Depends(caller),  # noqa: B008
    ) -> dict[str, Any]:
        """Images, megapixels and worker time spent per team, model, device, worker or period, for charge-back
        and capacity planning; pruned jobs included (see ``deblur usage --help``). A client that sees only its own
        jobs gets only their usage."""
        checks = (("since", lambda: parse_moment(since, option="since")),
                  ("until", lambda: None if until is None else parse_moment(until, option="until")),
                  ("by", lambda: check_groupings(by or [])), ("label", lambda: parse_labels(label or [])))
        parsed = {}
        for name, check in checks:
            try:
                parsed[name] = check()
            except InputError as exc:
                raise _validation_error(("query", name), str(exc)) from None
        if not client.sees_all:
            parsed["label"][API_CLIENT_LABEL] = client.name
        try:
            report = usage_report(settings, parsed["since"], parsed["until"], parsed["by"], parsed["label"], kind)
        except InputError as exc:
            raise _validation_error(("query", "until"), str(exc)) from None
        return report.to_dict()

    @app.get("/healthz", response_model=Health, tags=["operations"],
             responses={503: {"model": Health, "description": "A dependency is down; checks says which."}})
    def healthz(response: Response) -> Health:
        """Whether the database and the broker answer (no auth, for load balancers and probes)."""
        from jobs.celery_app import app_for

        def database() -> None:
            from sqlalchemy import text

            from db.engine import get_engine

            with get_engine(db_url).connect() as connection:
                connection.execute(text("SELECT 1"))

        def broker() -> None:
            with app_for(settings).connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=HEALTH_TIMEOUT_S)

        checks = {"database": _probe(database), "broker": _probe(broker)}
        healthy = all(v == "ok" for v in checks.values())
        if not healthy:
            response.status_code = 503
        return Health(status="ok" if healthy else "unavailable", checks=checks)

    return app
