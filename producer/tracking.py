"""Reading progress and results from SQL for people and scripts."""

from __future__ import annotations

import csv
import io
import os
import json
import math
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy.orm import Session

from db import queries
from db.engine import ensure_schema, session_scope
from db.queries import as_utc, iso_utc
from db.schema import Job
from jobs.errors import InputError, JobFinishedError
from jobs.labels import check_labels
from jobs.layout import describe_output_format, parse_output_format
from jobs.notify import announce_if_wanted
from jobs.review import JUDGED_SHARP, NOT_RESTORED
from jobs.settings import Settings
from jobs.statuses import FINISHED_JOB_STATUSES


def cancel_job(settings: Settings, job_id: str) -> int:
    """Cancel a job: its pending images are skipped (running ones finish). Returns how many were skipped.

    A job submitted with a notify URL is announced as finished (cancelled) once; cancelling it again is harmless.

    Raises:
        UnknownJobError: no such job.
        JobFinishedError: the job is done or failed already; nothing is changed.
    """
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        job = queries.get_job(session, job_id)
        if job.status in {"done", "failed"}:
            raise JobFinishedError(f"job {job_id} already finished ({job.status}); nothing to cancel")
        again = job.status == "cancelled"
        skipped = queries.cancel_job(session, job_id)
        spec = dict(job.spec)
    if not again:
        announce_if_wanted(settings, job_id, spec)
    return skipped


def list_jobs(settings: Settings, labels: dict[str, str] | None = None, status: str | None = None,
              limit: int = 20, before: str | None = None) -> list[dict[str, Any]]:
    """The newest jobs first, each as ``id, kind, status, total, created_at, labels``; only those carrying all of
    ``labels`` and in ``status``, when given, and listed after the job ``before`` (the previous page's last)."""
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        return [{"id": j.id, "kind": j.kind, "status": j.status, "total": j.total,
                 "created_at": iso_utc(j.created_at), "labels": (j.spec or {}).get("labels") or {}}
                for j in queries.recent_jobs(session, limit, labels=check_labels(labels or {}), status=status,
                                             before=before)]


def pause_job(settings: Settings, job_id: str) -> bool:
    """Hold a job with a window back: no more of its batches are sent; those already sent still run.

    Returns False when it was paused already. Cancelling, retrying and verifying work on a paused job as on any.

    Raises:
        UnknownJobError: no such job.
        JobFinishedError: the job is done, failed or cancelled.
        InputError: the job has no window (every batch is in the broker already, so there is nothing to hold
            back), or it is still being submitted.
    """
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        job = queries.get_job(session, job_id)
        if job.status in queries.FINISHED_JOB_STATUSES:
            raise JobFinishedError(f"job {job_id} already finished ({job.status}); nothing to pause")
        if not (job.spec or {}).get("window"):
            raise InputError(f"job {job_id} has no window: all its batches went to the broker when it was submitted, "
                             "so there is nothing to hold back. Submit with --window N (or DEBLUR_JOB_WINDOW) to be "
                             "able to pause a job; cancel this one with 'deblur cancel'")
        if job.status == "submitting":
            raise InputError(f"job {job_id} is still being submitted; pause it once 'deblur status' shows it queued "
                             "or running")
        if queries.pause_job(session, job_id):
            return True
        status = queries.job_status_of(session, job_id)
        if status == "paused":
            return False
        raise JobFinishedError(f"job {job_id} is {status} now; nothing to pause")


def resume_job(settings: Settings, job_id: str) -> int | None:
    """Let a paused job send its batches again; returns how many were sent now to fill its window, or None when
    it was not paused.

    Raises:
        UnknownJobError: no such job.
        JobFinishedError: the job is done, failed or cancelled (as pausing it would).
    """
    from producer.dispatch import send_window_batches

    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        job = queries.get_job(session, job_id)
        if job.status in queries.FINISHED_JOB_STATUSES:
            raise JobFinishedError(f"job {job_id} already finished ({job.status}); nothing to resume")
        if not queries.resume_job(session, job_id):
            return None
        kind, spec = job.kind, dict(job.spec)
    return send_window_batches(settings, job_id, kind, spec)


def full_job_id(settings: Settings, text: str) -> str:
    """The id of the job a person named by ``text`` on the command line: the whole id or a unique start of it
    (:func:`db.queries.resolve_job_id`). Scripts and the HTTP API pass whole ids."""
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        return queries.resolve_job_id(session, text)


def job_status(settings: Settings, job_id: str) -> dict[str, Any]:
    """A job's state, counts per image status, throughput and ETA."""
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        job = queries.get_job(session, job_id)
        counts, review = queries.status_and_review_counts(session, job_id)
        info = {
            "id": job.id,
            "kind": job.kind,
            "status": job.status,
            "total": max(job.total, sum(counts.values())),
            "counts": counts,
            "error": job.error,
            "spec": job.spec,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            # still 'submitting' with no progress past the point where a resubmission takes its key over
            "submission_stalled": job.status == "submitting" and _older_than(job.updated_at,
                                                                             queries.SUBMISSION_STALE_S),
        }
        info["review"] = review  # done images to look at (jobs.review)
        if (job.spec or {}).get("window"):  # batches listed, sent so far and in flight (producer.dispatch)
            info["batches"] = {"window": int(job.spec["window"]), "listed": job.batches_listed,
                               "sent": job.batches_sent, "in_flight": job.batches_in_flight}
        finished = counts["done"] + counts["failed"] + counts["cancelled"]
        info["finished"] = finished
        info["images_per_s"] = rate = _current_rate(session, job, counts)
        remaining = info["total"] - finished
        # a finished job is waited for no more, even a cancelled one whose last running image still ends
        info["eta_s"] = (None if rate is None else 0.0 if remaining <= 0 or job.status in FINISHED_JOB_STATUSES
                         else remaining / rate)
    for key in ("created_at", "started_at", "finished_at"):
        info[key] = iso_utc(info[key])
    return info


RATE_WINDOW_S = 600  # a job's throughput is its pace over the last ten minutes of its run


def _current_rate(session: Session, job: Job, counts: dict[str, int]) -> float | None:
    """Images per second reaching an outcome over the last ``RATE_WINDOW_S`` of the job's run (up to now, or to
    its finish), from the later of that window's start and the earliest start of the images finished in it; None
    when none finished in it (the pace is not known now).

    Not since the job started: a retried job keeps its first start, and its finishes of a day ago would make
    today's pace look a hundred times slower. Starting at the first start of the images counted gives a retry's
    images the minute they have taken, not the window's quiet minutes before it.
    """
    if job.started_at is None or counts["done"] + counts["failed"] == 0:
        return None
    end = as_utc(job.finished_at or datetime.now(timezone.utc))
    since = max(as_utc(job.started_at), end - timedelta(seconds=RATE_WINDOW_S))
    count, first_start = queries.recent_finishes(session, job.id, since, end)
    if not count:
        return None
    if first_start is not None:
        since = max(since, as_utc(first_start))
    return count / max((end - since).total_seconds(), 1e-6)


def _older_than(moment: datetime | None, seconds: float) -> bool:
    if moment is None:
        return False
    return (datetime.now(timezone.utc) - as_utc(moment)).total_seconds() > seconds


def is_finished(info: dict[str, Any]) -> bool:
    return info["status"] in FINISHED_JOB_STATUSES


POLL_INTERVAL_S = 1.0
"""How often :func:`watch` reads the job's state."""
IDLE_WARNING_S = 30.0
"""With images pending and none started for this long, :func:`watch` asks the workers on the job's queue why."""
IDLE_REPEAT_S = 300.0
"""And asks again, at most this often, while nothing starts."""
PLAIN_EVERY_S = 30.0
"""Not on a terminal (a file, a CI log): a progress line at least this often while the job runs..."""
PLAIN_MIN_GAP_S = 10.0
"""...and one when the counts change, but no more often than this."""


def watch(settings: Settings, job_id: str, console: Console, interval: float | None = None,
          timeout: float | None = None) -> dict[str, Any]:
    """Show the job's progress until it finishes; returns the final status.

    On a terminal, a live progress bar. Elsewhere (output to a file or a CI log, where a bar would only be drawn
    at the end) a plain line when the counts change (at most every ``PLAIN_MIN_GAP_S``) and at least every
    ``PLAIN_EVERY_S``. When images are pending and none has started for ``IDLE_WARNING_S``, the workers of the
    job's queue are asked (as 'deblur doctor' asks) and a line says whether any consumes it.
    """
    interval = POLL_INTERVAL_S if interval is None else interval
    info = job_status(settings, job_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    idle = _IdleWatch(settings, console)
    if not console.is_terminal:
        plain = _PlainProgress(console)
        while True:
            info = job_status(settings, job_id)
            plain.show(info, last=is_finished(info))
            if is_finished(info) or (deadline is not None and time.monotonic() > deadline):
                return info
            idle.check(info)
            time.sleep(interval)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(job_id[:8], total=info["total"] or None, detail="")
        while True:
            info = job_status(settings, job_id)
            detail = escape(_progress_detail(info))  # the status in brackets, not read as a style
            progress.update(task, total=info["total"] or None, completed=info["finished"], detail=detail)
            if is_finished(info):
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            idle.check(info)
            time.sleep(interval)
    return info


def _progress_detail(info: dict[str, Any]) -> str:
    c = info["counts"]
    rate, eta = info["images_per_s"], info["eta_s"]
    return (f"done {c['done']}  failed {c['failed']}  pending {c['pending'] + c['running']}"
            + (f"  {rate:.2f} img/s" if rate else "")
            + (f"  ETA {format_duration(eta)}" if eta else "")
            + f"  [{info['status']}]")


class _PlainProgress:
    """Progress lines for an output that is not a terminal: no bar, no redrawing, one line at a time."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.monotonic()
        self.shown: tuple[Any, ...] | None = None
        self.shown_at = -math.inf

    def show(self, info: dict[str, Any], last: bool = False) -> None:
        now = time.monotonic()
        state = (info["status"], info["total"], *sorted(info["counts"].items()))
        changed = state != self.shown
        due = (now - self.shown_at >= PLAIN_EVERY_S
               or (changed and now - self.shown_at >= PLAIN_MIN_GAP_S) or (last and changed))
        if not due:
            return
        self.shown, self.shown_at = state, now
        self.console.print(f"{info['id'][:8]}  {info['finished']}/{info['total']} finished  "
                           f"{_progress_detail(info)}  {format_duration(now - self.started)} elapsed",
                           markup=False, highlight=False, soft_wrap=True)


class _IdleWatch:
    """Notices a job none of whose pending images has started for ``IDLE_WARNING_S`` and says why, once, and
    again at most every ``IDLE_REPEAT_S`` while it stays so: usually no worker consumes the job's queue."""

    def __init__(self, settings: Settings, console: Console) -> None:
        self.settings = settings
        self.console = console
        self.seen: tuple[Any, ...] | None = None
        self.since = time.monotonic()
        self.wait = IDLE_WARNING_S

    def check(self, info: dict[str, Any]) -> None:
        c = info["counts"]
        now = time.monotonic()
        seen = (c["done"], c["failed"], c["cancelled"], c["running"], c["pending"], info["status"])
        waiting = c["pending"] > 0 and c["running"] == 0 and info["status"] not in {"paused", *FINISHED_JOB_STATUSES}
        if seen != self.seen or not waiting:
            self.seen, self.since, self.wait = seen, now, IDLE_WARNING_S
            return
        if now - self.since < self.wait:
            return
        self.wait = now - self.since + IDLE_REPEAT_S
        self.console.print(idle_job_note(self.settings, info, now - self.since), soft_wrap=True, highlight=False)


def idle_job_note(settings: Settings, info: dict[str, Any], waited: float) -> str:
    """Rich markup telling why nothing of a job has started for ``waited`` seconds: the workers of its queue are
    asked as 'deblur doctor' asks them (:func:`producer.doctor.check_workers`), so a worker that does not answer
    in time is not called absent for certain."""
    from dataclasses import replace

    from producer.doctor import check_workers

    queue = (info.get("spec") or {}).get("queue") or settings.queue
    finding = check_workers(replace(settings, queue=queue))
    head = f"job {info['id'][:8]}: no image has started for {format_duration(waited)}"
    if finding.status == "ok":  # served: the workers are busy with work queued before this job's
        return escape(f"note: {head}; the workers on {queue!r} may be busy with earlier batches ({finding.detail}); "
                      "'deblur status' shows the whole queue")
    return "[yellow]warning:[/yellow] " + escape(f"{head}. {finding.detail}. → {finding.hint}")


def format_duration(seconds: float | None) -> str:
    """``1h05m``, ``3m07s`` or ``42s``; ``?`` for an unknown or endless time."""
    if seconds is None or math.isinf(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def failure_reasons(settings: Settings, job_id: str, limit: int = 3) -> list[tuple[str, int]]:
    """The ``limit`` most frequent errors of the job's failed images, with their counts
    (:func:`db.queries.failure_reasons`)."""
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        return queries.failure_reasons(session, job_id, limit)


def print_status(info: dict[str, Any], console: Console, failures: list[tuple[str, int]] | None = None) -> None:
    """A job's state for people; ``failures`` (:func:`failure_reasons`) says why its failed images failed."""
    c = info["counts"]
    console.print(f"[bold]job[/bold] {info['id']}  ({info['kind']})  status: [bold]{info['status']}[/bold]")
    console.print(
        f"images: {info['total']}  done {c['done']}  failed {c['failed']}  running {c['running']}  "
        f"pending {c['pending']}  cancelled {c['cancelled']}"
    )
    if info["images_per_s"]:
        eta = "" if is_finished(info) else f"  ETA: {format_duration(info['eta_s'])}"  # nothing left to wait for
        console.print(f"throughput: {info['images_per_s']:.2f} images/s{eta}")
    spec = info["spec"] or {}
    # user text (model specs, labels, prefixes, errors) is escaped or printed without markup: '[draft]' stays
    console.print(f"models: {escape(', '.join(spec.get('models', [])))}  strength: {spec.get('strength', 1.0)}")
    if spec.get("labels"):
        console.print("labels: " + " ".join(f"{k}={v}" for k, v in spec["labels"].items()), soft_wrap=True,
                      markup=False, highlight=False)
    if info.get("batches"):
        b = info["batches"]
        console.print(f"window: {b['window']} batches at a time; {b['sent']} of {b['listed']} sent, "
                      f"{b['in_flight']} in the broker or running")
    if spec.get("output"):
        written = describe_written_as(spec["output_format"]) if spec.get("output_format") else ""
        records = ", each with a provenance record" if spec.get("sidecar") else ""
        console.print(f"output: {escape(spec['output'])}{written}{records}")
    review = {reason: n for reason, n in (info.get("review") or {}).items() if n}
    if review:
        what = {NOT_RESTORED: "blurred but not restored (no kernel estimate held)",
                JUDGED_SHARP: "judged sharp (no blur worth removing found)"}
        parts = [f"{n} {what.get(reason, reason)}" for reason, n in review.items()]
        console.print(f"[yellow]to review:[/yellow] {'; '.join(parts)}; returned as they came. List them with "
                      f"'deblur results {info['id'][:8]} --review'", soft_wrap=True, highlight=False)
    if info["status"] == "paused":
        console.print("[yellow]paused:[/yellow] no more of its batches are sent (those sent before still run); "
                      f"'deblur resume {info['id'][:8]}' sends the rest", soft_wrap=True)
    if info["error"]:
        console.print(f"[red]error:[/red] {escape(info['error'])}", soft_wrap=True, highlight=False)
    if failures:
        console.print(f"[red]failed:[/red] {c['failed']} of {info['total']} images; the most frequent reasons:",
                      highlight=False)
        for error, count in failures:
            shown = error if len(error) <= 300 else error[:299] + "…"
            console.print(f"  {count} × {escape(shown)}", soft_wrap=True, highlight=False)
        console.print(f"  every one: 'deblur results {info['id'][:8]} --failed'; once fixed: "
                      f"'deblur retry {info['id'][:8]} --failed'", soft_wrap=True, highlight=False)
    if info.get("submission_stalled"):
        console.print(f"[yellow]stalled:[/yellow] no submission progress for over {queries.SUBMISSION_STALE_S // 60} "
                      "minutes; its producer probably died mid-listing, so some images were never enqueued. Submit "
                      "again (with the same --job-key, the key goes to a new job); the next submission marks this "
                      "one failed.")


def describe_written_as(output_format: str) -> str:
    """What follows a job's output prefix to say its ``--output-format``: ``' as PNG'`` for one format, or
    ``' (JPEG as PNG, WEBP as PNG; other formats as they are)'`` for a mapping of some inputs' formats."""
    try:
        mapping = parse_output_format(output_format)
    except InputError:  # stored by an earlier release that took what this one refuses: shown as it was given
        return escape(f" (--output-format {output_format})")
    described = escape(describe_output_format(output_format))
    return f" as {described}" if None in mapping else f" ({described}; other formats as they are)"


def default_metric(kind: str) -> str:
    """The ensemble metric ``--worst`` ranks a job of ``kind`` by when none is named: the one
    :func:`producer.report.image_score` scores its images by (PSNR for evaluation jobs; deblur jobs have no
    reference, so the Laplacian variance, their sharpness measure)."""
    return "psnr" if kind == "evaluate" else "laplacian_variance"


def ranking_metric(settings: Settings, job_id: str, metric: str | None = None) -> str:
    """The metric to rank ``job_id``'s images by: ``metric``, or :func:`default_metric` for its kind.

    Raises:
        UnknownJobError: no such job.
        InputError: the job's images have no such ensemble metric (a misspelt ``--metric``, or psnr asked of a
            deblur job); the message lists the names they have. Ranking by a missing metric would return the
            images in id order, looking ranked.
    """
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        job = queries.get_job(session, job_id)
        chosen = metric or default_metric(job.kind)
        names = [n for n in queries.headline_metric_names(session, job_id) if not n.startswith("input_")]
    if names and chosen not in names:  # with no metrics yet (nothing done) there is nothing to refuse or rank
        have = f"its images have {', '.join(names)}"
        raise InputError(f"--metric {chosen!r}: job {job_id} ({job.kind}) has no such metric to rank by; {have}")
    return chosen


def fetch_results(settings: Settings, job_id: str, status: str | None = None, worst: int | None = None,
                  metric: str | None = None, limit: int | None = None, offset: int = 0,
                  review: bool = False, after_id: int | None = None, history: bool = False) -> list[dict[str, Any]]:
    """A job's per-image rows (see :func:`db.queries.image_rows`); ``review`` keeps the images to look at, and
    ``after_id`` starts after that image (pages that neither skip nor repeat). ``worst`` keeps the N with the
    lowest ensemble ``metric`` (default: :func:`default_metric` of the job's kind; not checked here, see
    :func:`ranking_metric`). ``history`` adds each image's ``earlier_attempts``."""
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        job = queries.get_job(session, job_id)
        order = None
        if worst is not None:
            order = ("ensemble", metric or default_metric(job.kind))
            limit = worst
        return queries.image_rows(session, job_id, status=status, limit=limit, offset=offset, order_by_metric=order,
                                  review=review, after_id=after_id, history=history)


def metric_columns(settings: Settings, job_id: str) -> list[str]:
    """The metric columns of a job's CSV results, the same on every page: the names any of its images has
    (:func:`db.queries.headline_metric_names`), sorted."""
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        return queries.headline_metric_names(session, job_id)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def results_json(rows: list[dict[str, Any]]) -> str:
    """One object per image: input, output, status, error, metrics by name (JSON-safe: inf → "inf")."""
    return json.dumps([_json_safe(row) for row in rows], indent=2)


def _metric_names(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for name in row["metrics"]:
            if name not in names:
                names.append(name)
    return names


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that a spreadsheet will not run as a formula (CSV injection): text starting with = + - @, a tab
    or a carriage return gets a leading single quote, the usual defence, which spreadsheets show as text. Numbers
    (``-inf`` too) and the lone ``-`` shown for a missing value are left as they are. The cells hold text from
    users and clients (S3 keys, errors that quote them, label values, model specs), so a label value such as
    ``=HYPERLINK(...)`` would otherwise become a live formula in whoever opens the export."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS) or value == "-":
        return value
    try:
        float(value)
        return value  # a number such as -0.5 or -inf
    except ValueError:
        return "'" + value


def results_csv(rows: list[dict[str, Any]], names: list[str] | None = None, history: bool = False) -> str:
    """The rows as CSV with a column per metric in ``names`` (:func:`metric_columns`, so that pages of one job
    line up); without them, the rows' own names, sorted. ``history`` adds two columns, on every page: how many
    earlier attempts each image had, and the failed ones' times and reasons."""
    names = sorted(_metric_names(rows)) if names is None else names
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    # 'review' last: scripts that read the earlier columns by position keep working
    writer.writerow(["input", "output", "status", "error", "width", "height", "inference_s", *names, "review",
                     *(["earlier_attempts", "earlier_errors"] if history else [])])
    for row in rows:
        writer.writerow([spreadsheet_safe(cell) for cell in (  # keys and errors are user text: no formulas
            row["input"], row["output"] or "", row["status"], row["error"] or "", row["width"] or "",
            row["height"] or "", _fmt(row["inference_s"]), *(_fmt(row["metrics"].get(n)) for n in names),
            row.get("review") or "", *(_history_cells(row.get("earlier_attempts") or []) if history else ()))])
    return buffer.getvalue()


def _history_cells(attempts: list[dict[str, Any]]) -> tuple[str, str]:
    """An image's earlier attempts as two CSV cells: how many, and each failed one's time and reason."""
    errors = " | ".join(f"{a['finished_at']}: {a['error'] or 'no reason kept'}"
                        for a in attempts if a["status"] == "failed")
    return str(len(attempts)), errors


def describe_history(attempts: list[dict[str, Any]]) -> str:
    """An image's earlier attempts in a few words for a table cell, e.g. ``2, last failed: out of memory``."""
    if not attempts:
        return ""
    last = attempts[-1]
    reason = f": {last['error']}" if last["status"] == "failed" and last["error"] else ""
    return f"{len(attempts)}, last {last['status']}{reason}"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:.4f}"
    return str(value)


SHORT_NAMES = {"laplacian_variance": "sharpness", "blur_effect": "blur", "disagreement": "disagree",
               "ssim_channel_mean": "ssim_ch", "ssim_3d": "ssim3d"}


def _common_prefix(uris: list[str]) -> str:
    if not uris:
        return ""
    prefix = os.path.commonprefix(uris)
    return prefix[: prefix.rfind("/") + 1]


def results_table(rows: list[dict[str, Any]], console: Console) -> None:
    """Compact per-image table: paths relative to the common prefix, one column
    per metric showing ``input → output`` where both exist."""
    names = [n for n in _metric_names(rows) if not n.startswith("input_")]
    names = [n for n in names if n not in {"ssim_3d"}]  # 'ssim' already is the 3-D figure
    prefix = _common_prefix([r["input"] for r in rows])
    # keys, errors and prefixes are user text: Text cells and escaped titles, so 'scan[draft].png' shows as is
    table = Table(show_lines=False, title=Text(f"images under {prefix}") if prefix else None, title_justify="left")
    any_error = any(r["error"] for r in rows)
    any_review = any(r.get("review") for r in rows)
    any_earlier = any(r.get("earlier_attempts") for r in rows)
    headers = ["image", "status", "size", "sec", *(SHORT_NAMES.get(n, n) for n in names)]
    for column in (headers + (["review"] if any_review else []) + (["error"] if any_error else [])
                   + (["earlier"] if any_earlier else [])):
        table.add_column(column, overflow="fold", no_wrap=column not in {"image", "error", "earlier"})
    out_prefix = _common_prefix([r["output"] for r in rows if r["output"]])
    for row in rows:
        size = f"{row['width']}x{row['height']}" if row["width"] else ""
        cells = []
        for name in names:
            before, after = row["metrics"].get(f"input_{name}"), row["metrics"].get(name)
            if name == "laplacian_variance" and before and after is not None:
                cells.append(f"×{after / before:.2f}")  # sharpness gain is what matters
            elif before is not None:
                cells.append(f"{_short(before)}→{_short(after)}")
            else:
                cells.append(_short(after))
        tail = ([row.get("review") or ""] if any_review else []) + (
            [Text(row["error"] or "", style="red")] if any_error else []) + (
            [Text(describe_history(row.get("earlier_attempts") or []))] if any_earlier else [])
        table.add_row(Text(row["input"].removeprefix(prefix)), row["status"], size,
                      _short(row["inference_s"]), *cells, *tail)
    console.print(table)
    if out_prefix:
        console.print(f"outputs under {escape(out_prefix)}")


def _short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
