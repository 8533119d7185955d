"""The versioned JSON messages that travel through the broker.

Messages carry URIs and options, never pixels. The job row in SQL stays the
source of truth; a message only says which images a task must process and how.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MESSAGE_VERSION = 1
JobKind = Literal["deblur", "evaluate"]

PROCESS_BATCH_TASK = "deblur.process_batch"

OPTIONAL_FIELDS: dict[str, object] = {"output_format": None, "quality": None, "sidecar": False, "slot": False}
"""Batch fields added after version 1, with their defaults: left out of a payload when at the default, so that
workers which do not know them (and refuse unknown fields) still take every batch that does not use them, and
refuse those that do."""

WORKER_INFO_COMMAND = "deblur_info"
"""The remote-control question a worker answers with its release and the optional fields it knows
(:mod:`worker.control`)."""
CLAIMS_GONE_COMMAND = "deblur_claims_gone"
"""The remote-control question a worker answers with which of the given batch runs' claims were made by a process
of its own that no longer exists (:mod:`worker.control`): a second delivery of a batch, landing on another worker
after a pool process was killed, then takes the images at once instead of waiting out the lost run's lease."""
FIELDS_BEFORE_INFO = ("output_format", "quality", "sidecar", "slot")
"""The optional fields a worker too old to answer :data:`WORKER_INFO_COMMAND` is taken to know: those of the
release just before the question (windows' ``slot`` included). A worker older still, from before windows, cannot
be told apart from it, so windows need every worker on a release that has them (see the README)."""


def needs_newer_worker(payload: dict, error: Exception) -> bool:
    """Whether a batch this code refused (``error``) comes from a newer release rather than being malformed.

    A newer message version, or fields this code does not know and nothing else wrong, mean a newer producer
    sent it: a worker of that release can run it, so it goes back to the queue instead of being dropped.
    """
    version = payload.get("v") if isinstance(payload, dict) else None
    if isinstance(version, int) and version > MESSAGE_VERSION:
        return True
    if isinstance(error, ValidationError):
        problems = error.errors()
        return bool(problems) and all(problem["type"] == "extra_forbidden" for problem in problems)
    return False


def readable_part(payload: dict) -> BatchMessage | None:
    """What this code can read of a newer release's batch (its unknown fields left out), to fail its images by
    name when no newer worker took it; None when even that is not a batch."""
    try:
        known = {key: value for key, value in payload.items() if key in BatchMessage.model_fields}
        known["v"] = MESSAGE_VERSION
        known["images"] = [{key: value for key, value in item.items() if key in ImageItem.model_fields}
                           for item in payload.get("images") or []]
        return BatchMessage.model_validate(known)
    except (AttributeError, TypeError, ValidationError):
        return None


class ImageItem(BaseModel):
    """One image of a batch: where to read it, where to write it, what to compare with."""

    model_config = ConfigDict(extra="forbid")

    input: str
    output: str | None = None
    reference: str | None = None  # the sharp image, for evaluation jobs


class BatchMessage(BaseModel):
    """The body of a ``deblur.process_batch`` task."""

    model_config = ConfigDict(extra="forbid")

    v: int = Field(default=MESSAGE_VERSION)
    job_id: str
    kind: JobKind
    models: list[str] = Field(min_length=1)
    strength: float = Field(default=1.0, ge=0.0, le=1.0)
    strip_metadata: bool = False
    write_outputs: bool = True
    output_root: str | None = None  # the job's output prefix (member outputs of evaluations go under it)
    align: bool = False  # evaluations: RealBlur protocol (intensity matching + ECC homography) before metrics
    crop_border: int = Field(default=0, ge=0)  # evaluations: pixels ignored at each border
    images: list[ImageItem] = Field(min_length=1)
    output_format: str | None = None  # write outputs in this format instead of the input's (jobs.layout)
    quality: int | None = Field(default=None, ge=1, le=100)  # JPEG / lossy WebP outputs
    sidecar: bool = False  # write a provenance record next to each output (jobs.layout.sidecar_uri)
    slot: bool = False  # holds one of its job's window slots: finishing it sends the job's next batch

    def to_payload(self) -> dict:
        """The JSON task body, without the :data:`OPTIONAL_FIELDS` left at their defaults: a worker that does not
        know them yet takes every batch that does not use them (a batch handed over included)."""
        payload = self.model_dump(mode="json")
        for key, default in OPTIONAL_FIELDS.items():
            if payload[key] == default:
                del payload[key]
        return payload

    @classmethod
    def from_payload(cls, payload: dict) -> "BatchMessage":
        """Parse a received payload, refusing versions this code does not know."""
        version = payload.get("v")
        if version != MESSAGE_VERSION:
            raise ValueError(
                f"message version {version!r} is not supported by this worker (expects {MESSAGE_VERSION}); "
                "upgrade the worker or drain the queue with the matching version"
            )
        return cls.model_validate(payload)
