"""Named ensembles: member weights fitted on an evaluation job, saved under a name.

``deblur ensemble fit JOB --name NAME`` writes one row; ``deblur submit
--ensemble NAME`` reads it back and runs its members with their weights. The
model shares :class:`db.schema.Base`, so one metadata (and one migration
history) covers every table.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.queries import iso_utc
from db.schema import Base, utcnow
from jobs.errors import InputError

NAME_MAX_LENGTH = 128


class UnknownEnsembleError(InputError):
    """No ensemble is saved under the given name."""


class EnsembleExistsError(InputError):
    """An ensemble with that name is already saved (and replacing was not asked for)."""


class NamedEnsemble(Base):
    __tablename__ = "ensembles"
    __table_args__ = (UniqueConstraint("name", name="uq_ensembles_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH))
    # "NAME[:PARAMS]:WEIGHT" spec texts, in the order of the source job's members
    members: Mapped[list[Any]] = mapped_column(JSON)
    source_job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True
    )
    psnr_fitted: Mapped[float | None] = mapped_column(Float, nullable=True)
    psnr_equal: Mapped[float | None] = mapped_column(Float, nullable=True)
    images: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "members": list(self.members),
            "source_job_id": self.source_job_id,
            "psnr_fitted": self.psnr_fitted,
            "psnr_equal": self.psnr_equal,
            "gain_db": None if self.psnr_fitted is None or self.psnr_equal is None
            else self.psnr_fitted - self.psnr_equal,
            "images": self.images,
            "created_at": iso_utc(self.created_at),
        }


def check_name(name: str) -> str:
    """A usable ensemble name: non-empty, at most 128 characters, no ':' or ','
    (so it can never be mistaken for a model spec)."""
    cleaned = name.strip()
    if not cleaned or len(cleaned) > NAME_MAX_LENGTH or any(c in cleaned for c in ":,") or cleaned != name:
        raise InputError(
            f"ensemble name {name!r} is not usable; use 1-{NAME_MAX_LENGTH} characters without ':', ',' "
            "or surrounding spaces, e.g. 'gopro-fit'"
        )
    return cleaned


def save_ensemble(
    session: Session,
    name: str,
    members: list[str],
    *,
    source_job_id: str | None,
    psnr_fitted: float | None,
    psnr_equal: float | None,
    images: int | None,
    replace: bool = False,
) -> NamedEnsemble:
    """Insert the ensemble, or overwrite the one with the same name when ``replace``."""
    check_name(name)
    if not members:
        raise InputError(f"ensemble {name!r} needs at least one member")
    row = session.scalar(select(NamedEnsemble).where(NamedEnsemble.name == name))
    if row is not None and not replace:
        raise EnsembleExistsError(
            f"an ensemble named {name!r} already exists (fitted on job {row.source_job_id}); "
            "choose another --name or pass --replace"
        )
    if row is None:
        row = NamedEnsemble(name=name)
        session.add(row)
    row.members = list(members)
    row.source_job_id = source_job_id
    row.psnr_fitted = psnr_fitted
    row.psnr_equal = psnr_equal
    row.images = images
    row.created_at = utcnow()
    session.flush()
    return row


def list_ensembles(session: Session) -> list[NamedEnsemble]:
    return list(session.scalars(select(NamedEnsemble).order_by(NamedEnsemble.name)))


def get_ensemble(session: Session, name: str) -> NamedEnsemble:
    """The ensemble saved as ``name``; the error lists the known names."""
    row = session.scalar(select(NamedEnsemble).where(NamedEnsemble.name == name))
    if row is None:
        known = [e.name for e in list_ensembles(session)]
        listing = ", ".join(known) if known else "none yet; fit one with 'deblur ensemble fit JOB --name NAME'"
        raise UnknownEnsembleError(f"unknown ensemble {name!r}; known: {listing}")
    return row
