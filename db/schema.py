"""SQLAlchemy 2 schema: jobs, their images, and per-image metrics.

The job row and its image rows are the source of truth for progress: the
broker only carries work. An image is unique per (job, input URI), so a
redelivered batch updates its rows instead of duplicating them. A metric is
unique per (image, model, name); ``model`` is ``input`` for the unrestored
image, a model's spec key for a member, or ``ensemble``.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from jobs.statuses import IMAGE_STATUSES, JOB_STATUSES, TERMINAL_IMAGE_STATUSES  # noqa: F401 - re-exported

INPUT_MODEL = "input"
ENSEMBLE_MODEL = "ensemble"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_job_id)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="submitting", index=True)
    job_key: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    total: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # a job submitted with a window (spec["window"] batches in the broker at once): batches listed so far, sent so
    # far (in batch order), and sent but not yet finished
    batches_listed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    batches_sent: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    batches_in_flight: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    images: Mapped[list["Image"]] = relationship(back_populates="job", cascade="all, delete-orphan")


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("job_id", "input_uri", name="uq_images_job_input"),
        Index("ix_images_job_status", "job_id", "status"),
        Index("ix_images_job_batch", "job_id", "batch"),  # a windowed job's next batch, read when it is sent
        Index("ix_images_finished_at", "finished_at"),  # 'deblur usage' reads the outcomes of a period
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    input_uri: Mapped[str] = mapped_column(String(2048))
    output_uri: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    reference_uri: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    kernel_uri: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    batch: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    format: Mapped[str | None] = mapped_column(String(8), nullable=True)
    bit_depth: Mapped[int | None] = mapped_column(Integer, nullable=True)
    download_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    inference_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    upload_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    device: Mapped[str | None] = mapped_column(String(32), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    model_versions: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # fixity: the input as the worker read it and the output as it wrote it ('deblur verify' checks the latter)
    input_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    output_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # starts since the last outcome or retry: each one that never reached an outcome lost its worker
    unfinished_starts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # why a person should look at this done image (jobs.review: the blind model returned it as it came), or None
    review: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # every page's pixels (a multi-page TIFF's width and height are its first page's); None: width × height
    pixels: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # the run of a batch task that holds this running image, and until when: another delivery of the same batch
    # (a redelivery past the broker's visibility timeout, say) leaves it to that run while it renews the lease
    claim: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # when the message that carries this pending image was sent, by the database's clock, stamped before the send:
    # a broker found to have lost its messages (worker.broker_watch) lost those sent before then. NULL: a row from
    # before this was kept, taken for sent long ago
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    job: Mapped[Job] = relationship(back_populates="images")


class BrokerMark(Base):
    """The count a queue's workers write to the broker, to tell when the broker lost its messages.

    Each worker's sweep (:mod:`worker.broker_watch`) takes the next ``counter`` and writes it to a key in the
    broker, which only ever keeps the largest; ``confirmed`` is the largest count known to have been written. A
    broker that restarted without persistence, was flushed, or came back from an older snapshot holds no key or a
    smaller count than ``confirmed``, and has lost the messages sent since with it: ``lost_before`` then records
    when that was found (``losses`` counts such findings), and the images of the queue's jobs waiting for a
    message sent before it are sent again by one worker at a time (``mending_by``, until ``mending_until``). One
    row (and one key) per broker address (with no credentials) and queue, so deployments with brokers of their
    own can share one database.
    """

    __tablename__ = "broker_marks"
    __table_args__ = (UniqueConstraint("broker", "queue", name="uq_broker_marks_broker_queue"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    broker: Mapped[str] = mapped_column(String(512))
    queue: Mapped[str] = mapped_column(String(255))
    counter: Mapped[int] = mapped_column(BigInteger, default=0)
    confirmed: Mapped[int] = mapped_column(BigInteger, default=0)
    # written to the broker with the count: a broker holding another token's count serves another database's
    # workers on the same queue name (a misconfiguration), which is not a loss
    token: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # when the broker was last found to have lost messages, until every image waiting from before then is sent
    lost_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    losses: Mapped[int] = mapped_column(Integer, default=0)
    mending_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    mending_by: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the lease's holder


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("image_id", "model", "name", name="uq_metrics_image_model_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(512))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)


class EarlierAttempt(Base):
    """An image's outcome that a later one replaced on its row: a failed attempt retried, an output ``deblur
    verify`` found missing. Kept (its finish time, device, worker, pixels, seconds and error) so ``deblur usage``
    counts every attempt the workers made, in the period it was made, not only each image's last, and ``deblur
    results --history`` shows what happened to an image before; deleted with its job (after
    :func:`db.usage.roll_up_job` has counted it)."""

    __tablename__ = "earlier_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    status: Mapped[str] = mapped_column(String(16))
    device: Mapped[str | None] = mapped_column(String(32), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    pixels: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    download_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    inference_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    upload_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # which image, and why the attempt failed ('deblur results --history'); rows kept before these: NULL
    image_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class UsageRollup(Base):
    """What a pruned job's images used, per UTC day, device and worker, so ``deblur usage`` outlives ``db prune``.

    ``deblur db prune`` writes these rows in the transaction that deletes the job; ``deblur usage`` adds them to
    what it reads from the images still recorded. ``models`` is the job's model specs joined by `` + ``.
    """

    __tablename__ = "usage_rollups"
    __table_args__ = (Index("ix_usage_rollups_day", "day"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    day: Mapped[date] = mapped_column(Date)
    job_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(16))
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    models: Mapped[str] = mapped_column(Text)
    device: Mapped[str | None] = mapped_column(String(32), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    megapixels: Mapped[float] = mapped_column(Float, default=0.0)
    download_s: Mapped[float] = mapped_column(Float, default=0.0)
    inference_s: Mapped[float] = mapped_column(Float, default=0.0)
    upload_s: Mapped[float] = mapped_column(Float, default=0.0)
