"""A Python client for backend teams: submit, track, read results, cancel, retry.

>>> from producer.client import Client
>>> client = Client()                       # settings from the environment
>>> job = client.submit(["s3://archive/scans/"], output="s3://archive/restored/",
...                     models=["l0-blind", "seed002-unet:0.5"], job_key="nightly-2026-11-22")
>>> client.wait(job)["counts"]
{'pending': 0, 'running': 0, 'done': 120, 'failed': 0, 'cancelled': 0}
>>> rows = client.results(job, status="failed")

It needs no torch. Errors are :class:`jobs.errors.DeblurError` subclasses;
:class:`jobs.errors.InputError` means the request itself is wrong. It talks to
the database and the broker directly; a service that can only reach the HTTP
API uses :class:`producer.http_client.HttpClient`, which has the same calls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from jobs.settings import Settings, load_settings
from producer.retry import retry_images
from producer.submit import JobRequest, submit
from producer.tracking import (
    cancel_job,
    fetch_results,
    is_finished,
    job_status,
    list_jobs,
    pause_job,
    resume_job,
)
from producer.usage import DEFAULT_PERIOD, UsageReport, parse_moment, usage_report
from producer.verify import Verification, verify_outputs


class Client:
    """Talks to the database and broker named by ``settings`` (default: the environment)."""

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self.settings = settings or load_settings(**overrides)

    def submit(
        self,
        inputs: Sequence[str],
        output: str,
        models: Sequence[str] = (),
        *,
        strength: float = 1.0,
        batch_size: int | None = None,
        priority: int = 5,
        strip_metadata: bool = False,
        job_key: str | None = None,
        skip_existing: bool = False,
        notify_url: str | None = None,
        output_format: str | None = None,
        quality: int | None = None,
        sidecar: bool = False,
        window: int | None = None,
        labels: dict[str, str] | None = None,
    ) -> str:
        """Submit a deblur job; returns its id. Validation errors raise before anything is enqueued.

        With ``skip_existing``, images whose output already exists are left out; if that leaves none, no job is
        made and the id returned is empty. ``output_format`` ("png", "tiff", …) writes every output in that
        format with its key's extension changed; ``quality`` sets JPEG and lossy WebP outputs' quality;
        ``sidecar`` writes a provenance record (``OUTPUT.deblur.json``) next to each output; ``window`` keeps at
        most that many of the job's batches in the broker (``DEBLUR_JOB_WINDOW`` when None), so jobs take turns;
        ``labels`` are your own names for the job (``{"team": "ingest"}``), to find it again with :meth:`jobs`.
        """
        request = JobRequest(kind="deblur", inputs=list(inputs), output=output, models=list(models),
                             strength=strength, batch_size=batch_size, priority=priority,
                             strip_metadata=strip_metadata, job_key=job_key, skip_existing=skip_existing,
                             notify_url=notify_url, output_format=output_format, quality=quality,
                             sidecar=sidecar, window=window, labels=dict(labels or {}))
        return submit(request, self.settings).job_id

    def evaluate(
        self,
        blurred: Sequence[str],
        sharp: str | None = None,
        models: Sequence[str] = (),
        *,
        gopro: bool = False,
        output: str | None = None,
        batch_size: int | None = None,
        priority: int = 5,
        job_key: str | None = None,
        window: int | None = None,
        labels: dict[str, str] | None = None,
    ) -> str:
        """Submit an evaluation job (PSNR/SSIM per image for input, members and ensemble)."""
        request = JobRequest(kind="evaluate", inputs=list(blurred), references=sharp, gopro=gopro, output=output,
                             models=list(models), batch_size=batch_size, priority=priority, job_key=job_key,
                             window=window, labels=dict(labels or {}))
        return submit(request, self.settings).job_id

    def jobs(self, labels: dict[str, str] | None = None, status: str | None = None,
             limit: int = 20) -> list[dict[str, Any]]:
        """The newest jobs first (id, kind, status, total, created_at, labels); only those with all of ``labels``
        and in ``status``, when given."""
        return list_jobs(self.settings, labels, status, limit)

    def usage(self, since: datetime | str = DEFAULT_PERIOD, until: datetime | str | None = None,
              by: Sequence[str] = (), labels: dict[str, str] | None = None, kind: str | None = None) -> UsageReport:
        """What the images that finished in ``[since, until)`` used, grouped ``by`` (``label:team``, ``model``,
        ``device``, ``worker``, ``day``, ``month``, ...), as ``deblur usage`` shows it; ``since`` and ``until``
        take datetimes or its texts (``30d``, ``2026-11-01``). ``report.to_dict()`` is its JSON."""
        start = parse_moment(since) if isinstance(since, str) else since
        end = parse_moment(until, option="--until") if isinstance(until, str) else until
        return usage_report(self.settings, start, end, by, labels, kind)

    def status(self, job_id: str) -> dict[str, Any]:
        """State, counts per status, images/s and ETA."""
        return job_status(self.settings, job_id)

    def wait(self, job_id: str, timeout: float | None = None, interval: float = 1.0) -> dict[str, Any]:
        """Block until the job is done, failed or cancelled; raises TimeoutError after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.status(job_id)
            if is_finished(info):
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['status']} after {timeout}s: {info['counts']}")
            time.sleep(interval)

    def results(self, job_id: str, status: str | None = None, limit: int | None = None,
                offset: int = 0, history: bool = False) -> list[dict[str, Any]]:
        """One dict per image: input, output, status, error, timings, metrics; with ``history``, also its
        ``earlier_attempts`` (a failure before a retry: when, how, why, where)."""
        return fetch_results(self.settings, job_id, status=status, limit=limit, offset=offset, history=history)

    def cancel(self, job_id: str) -> int:
        """Cancel a job; returns how many pending images will be skipped (JobFinishedError if it finished)."""
        return cancel_job(self.settings, job_id)

    def pause(self, job_id: str) -> bool:
        """Hold a job submitted with a window back (see ``deblur pause``); False if it was paused already."""
        return pause_job(self.settings, job_id)

    def resume(self, job_id: str) -> int | None:
        """Let a paused job send its batches again; how many were sent now, or None if it was not paused."""
        return resume_job(self.settings, job_id)

    def retry(self, job_id: str, failed: bool = True, stalled_after: int | None = None) -> int:
        """Re-enqueue failed (and, with ``stalled_after`` seconds, stalled) images."""
        return retry_images(self.settings, job_id, failed=failed, stalled_after=stalled_after)

    def verify(self, job_id: str, mark_failed: bool = False, quick: bool = False) -> Verification:
        """Read back every done image's output and compare its SHA-256 with the one recorded when it was written.

        With ``mark_failed``, missing and changed outputs become failed images for :meth:`retry`. With
        ``quick``, the SHA-256 the store keeps for an output is compared instead of reading it back, where the
        store keeps one (``Verification.by_store_checksum`` counts those).
        """
        return verify_outputs(self.settings, job_id, mark_failed=mark_failed, quick=quick)
