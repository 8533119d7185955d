"""``deblur db prune``: forget finished jobs older than a retention period.

At archive scale the database grows by a job row, an image row per image and
a dozen metric rows per image per model; years of nightly runs make tens of
millions of rows that nobody reads. Pruning deletes the rows of jobs that
finished (done, failed or cancelled) before the cutoff, one job per
transaction, and never touches storage: the restored images, their kernels and
the inputs stay where they are. Ensembles fitted on a pruned evaluation job
keep their weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from db import queries
from db.engine import ensure_schema, session_scope
from db.schema import utcnow
from jobs.settings import Settings


@dataclass
class Pruned:
    """Jobs (and their images) deleted, or that would be with ``dry_run``; ``kept`` were retried meanwhile;
    ``held_back`` finished in time but have images still pending or running, oldest first."""

    jobs: int = 0
    images: int = 0
    kept: int = 0
    held_back: list[str] = field(default_factory=list)


def cutoff_for(days: float, now: datetime | None = None) -> datetime:
    """The moment ``days`` before ``now``: jobs that finished before it are pruned.

    Raises:
        ValueError: ``days`` is 0 or less (every finished job, even one cancelled a second ago, would go).
    """
    if not days > 0:  # NaN too
        raise ValueError(f"a retention period cannot be negative or zero, got {days} days: give the days a "
                         "finished job is kept, e.g. --older-than 90")
    return (now or utcnow()) - timedelta(days=days)


def prune_jobs(settings: Settings, older_than_days: float, dry_run: bool = False,
               progress: Callable[[int, int], None] | None = None) -> Pruned:
    """Delete every job that finished more than ``older_than_days`` ago (more than 0) and has no image still
    pending or running, with its images and metrics.

    ``progress`` is told (jobs done, jobs to do) after each job. With ``dry_run`` nothing is deleted and the
    figures say what would be.
    """
    url = settings.resolved_database_url()
    ensure_schema(url)
    before = cutoff_for(older_than_days)
    with session_scope(url) as session:
        candidates = queries.prunable_jobs(session, before)
        found = Pruned(held_back=queries.jobs_held_back(session, before))
    for index, (job_id, images) in enumerate(candidates, start=1):
        if dry_run:
            found.jobs, found.images = found.jobs + 1, found.images + images
        else:
            with session_scope(url) as session:
                deleted = queries.delete_finished_job(session, job_id, before)
            if deleted is None:
                found.kept += 1
            else:
                found.jobs, found.images = found.jobs + 1, found.images + deleted
        if progress is not None:
            progress(index, len(candidates))
    return found
