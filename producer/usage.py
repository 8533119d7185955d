"""``deblur usage``: what the queue's workers spent, by team, model, device, worker or period.

Teams that share one set of GPU workers need to know who used how much of them
(to charge it back, to plan capacity, to see which model costs what per
megapixel). The figures come from the per-image rows the workers write (see
:mod:`db.usage`), plus the rollups ``deblur db prune`` keeps of the jobs it
deletes, so a month's report does not shrink when old jobs are pruned.

Grouping keys (``--by``, any number, in order): ``label:KEY`` (a job label such
as ``label:team``; jobs without it show ``-``), ``job``, ``kind``, ``model``
(the job's model specs), ``device`` (``cpu``, ``cuda``, ``mps``: the kind,
without the GPU's index), ``worker`` (the Celery node name), ``day`` and
``month`` (UTC).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from db import usage as usage_queries
from db.engine import ensure_schema, session_scope
from db.queries import as_utc
from db.schema import utcnow
from db.usage import UsageRecord
from jobs.errors import InputError
from jobs.labels import check_labels
from jobs.settings import Settings
from producer.tracking import spreadsheet_safe

PLAIN_GROUPINGS = ("job", "kind", "model", "device", "worker", "day", "month")
GROUPING_HELP = "label:KEY, " + ", ".join(PLAIN_GROUPINGS)
DEFAULT_PERIOD = "30d"
NONE_SHOWN = "-"
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([mhdw])")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_moment(text: str, now: datetime | None = None, option: str = "--since") -> datetime:
    """A moment as the CLI and API take it: ``30d``, ``12h``, ``2w``, ``90m`` ago, or an ISO date or date-time.

    A date or a date-time without an offset is UTC. Raises :class:`InputError` naming the option otherwise.
    """
    text = text.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        amount, unit = relative.groups()
        try:
            return (now or utcnow()) - timedelta(seconds=float(amount) * _UNIT_SECONDS[unit])
        except OverflowError:  # 999999999d: before year 1
            raise InputError(f"{option} {text!r} reaches back before the calendar's start; use fewer days") from None
    try:
        moment = datetime.fromisoformat(text)  # Python 3.11 reads a trailing Z too
    except ValueError:
        raise InputError(f"{option} {text!r}: expected a time ago such as 30d, 12h, 2w or 90m, or a UTC date such "
                         "as 2026-11-01 (or 2026-11-01T08:00, 2026-11-01T08:00+01:00)") from None
    return as_utc(moment)


def check_groupings(by: Iterable[str]) -> list[str]:
    """``--by`` keys, checked; :class:`InputError` names a key that is not one and lists those that are."""
    checked = []
    for key in by:
        key = key.strip()
        if key.startswith("label:"):
            try:
                check_labels({key[len("label:"):]: ""})
            except InputError:
                raise InputError(f"--by {key!r}: after 'label:' comes a label's name (1-63 letters, digits, '_', "
                                 "'.', '-' or '/'), e.g. --by label:team") from None
        elif key not in PLAIN_GROUPINGS:
            raise InputError(f"--by {key!r}: not a grouping; use {GROUPING_HELP} (e.g. --by label:team --by month)")
        if key in checked:
            raise InputError(f"--by {key!r} is given twice")
        checked.append(key)
    return checked


@dataclass
class UsageLine:
    """One group's totals. ``worker_s`` is download + model + upload time, the worker's time on the images."""

    group: dict[str, str]
    jobs: int = 0
    done: int = 0
    failed: int = 0
    megapixels: float = 0.0
    inference_s: float = 0.0
    worker_s: float = 0.0
    _job_ids: set[str] = field(default_factory=set, repr=False)

    def add(self, record: UsageRecord) -> None:
        self._job_ids.add(record.job_id)
        self.jobs = len(self._job_ids)
        self.done += record.done
        self.failed += record.failed
        self.megapixels += record.megapixels
        self.inference_s += record.inference_s
        self.worker_s += record.download_s + record.inference_s + record.upload_s

    @property
    def model_s_per_megapixel(self) -> float | None:
        """Model seconds per megapixel restored (failed images' seconds included: they were spent too)."""
        return self.inference_s / self.megapixels if self.megapixels > 0 else None

    def to_dict(self) -> dict[str, Any]:
        per_mp = self.model_s_per_megapixel
        return {**self.group, "jobs": self.jobs, "images_done": self.done, "images_failed": self.failed,
                "megapixels": round(self.megapixels, 6), "model_seconds": round(self.inference_s, 3),
                "worker_seconds": round(self.worker_s, 3),
                "model_seconds_per_megapixel": None if per_mp is None else round(per_mp, 4)}


@dataclass
class UsageReport:
    """Usage over ``[since, until)`` grouped ``by`` those keys, with the grand total.

    ``rolled_up_days`` is set when pruned jobs' rollups contributed: they count by whole UTC days, so figures
    for a period that starts or ends mid-day may include a little more of a pruned job than the period holds.
    """

    since: datetime
    until: datetime
    by: list[str]
    lines: list[UsageLine]
    total: UsageLine
    rolled_up_days: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"since": self.since.isoformat(), "until": self.until.isoformat(), "by": self.by,
                "groups": [line.to_dict() for line in self.lines], "total": self.total.to_dict(),
                "includes_pruned_jobs": self.rolled_up_days}


def _group_value(key: str, record: UsageRecord) -> str:
    if key.startswith("label:"):
        return record.labels.get(key[len("label:"):], NONE_SHOWN)
    if key == "job":
        return record.job_id
    if key == "kind":
        return record.kind
    if key == "model":
        return record.models or NONE_SHOWN
    if key == "device":
        return (record.device or NONE_SHOWN).split(":", 1)[0]
    if key == "worker":
        return record.worker or NONE_SHOWN
    if key == "day":
        return record.day.isoformat()
    if key == "month":
        return record.day.isoformat()[:7]
    raise InputError(f"--by {key!r}: not a grouping; use {GROUPING_HELP}")  # pragma: no cover - checked before


def group_usage(records: Iterable[UsageRecord], by: Sequence[str]) -> tuple[list[UsageLine], UsageLine]:
    """Fold records into one line per distinct value of the ``by`` keys (sorted by them), and the total."""
    lines: dict[tuple[str, ...], UsageLine] = {}
    total = UsageLine(group={})
    for record in records:
        values = tuple(_group_value(key, record) for key in by)
        line = lines.get(values)
        if line is None:
            line = lines[values] = UsageLine(group=dict(zip(by, values)))
        line.add(record)
        total.add(record)
    return [lines[key] for key in sorted(lines)], total


def usage_report(settings: Settings, since: datetime, until: datetime | None = None, by: Sequence[str] = (),
                 labels: Mapping[str, str] | None = None, kind: str | None = None) -> UsageReport:
    """What the images that finished in ``[since, until)`` used, grouped ``by`` (see the module's keys).

    Only jobs of ``kind`` and carrying every one of ``labels`` count, when given. Images of jobs still running
    count as they finish. Raises :class:`InputError` for an unknown grouping, a bad label or an empty period.
    """
    since, until = as_utc(since), as_utc(until or utcnow())
    if until <= since:
        raise InputError(f"--until ({until.isoformat()}) must come after --since ({since.isoformat()})")
    if kind is not None and kind not in ("deblur", "evaluate"):
        raise InputError(f"--kind {kind!r}: use deblur or evaluate")
    groupings = check_groupings(by)
    wanted = check_labels(dict(labels or {}))
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        records = usage_queries.recorded_usage(session, since, until, kind=kind, labels=wanted)
        rolled_up = usage_queries.rolled_up_usage(session, since, until, kind=kind, labels=wanted)
    # a job pruned between the two reads is in both: its images were read first, so its rollup goes
    live_jobs = {record.job_id for record in records}
    rolled_up = [record for record in rolled_up if record.job_id not in live_jobs]
    lines, total = group_usage([*records, *rolled_up], groupings)
    return UsageReport(since=since, until=until, by=groupings, lines=lines, total=total,
                       rolled_up_days=bool(rolled_up))


USAGE_COLUMNS = ("jobs", "images_done", "images_failed", "megapixels", "model_seconds", "worker_seconds",
                 "model_seconds_per_megapixel")


def usage_csv(report: UsageReport) -> str:
    """One CSV row per group (the grouping keys first, then :data:`USAGE_COLUMNS`), and no total row, so that a
    spreadsheet's column sums are the totals; with no group (no usage in the period) only the header. Without
    ``by`` the one row is the total, written even when it is all zeros, as the table shows it.

    Cells that a spreadsheet would run as a formula (a label value starting with =, +, - or @) get a leading
    single quote: :func:`producer.tracking.spreadsheet_safe`, the usual CSV-injection defence."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*report.by, *USAGE_COLUMNS], lineterminator="\n")
    writer.writeheader()
    for line in report.lines if report.by else [report.total]:
        writer.writerow({key: "" if value is None else spreadsheet_safe(value)
                         for key, value in line.to_dict().items()})
    return buffer.getvalue()


def format_duration(seconds: float) -> str:
    """Seconds as a person reads them: ``42.0 s``, ``12.5 min``, ``3.2 h``."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def table_cells(line: UsageLine) -> list[str]:
    """The figures of one line as the terminal table shows them."""
    per_mp = line.model_s_per_megapixel
    return [f"{line.jobs:,}", f"{line.done:,}", f"{line.failed:,}", f"{line.megapixels:,.1f}",
            format_duration(line.inference_s), format_duration(line.worker_s),
            "-" if per_mp is None else f"{per_mp:.2f}"]


TABLE_HEADERS = ("jobs", "done", "failed", "MP", "model time", "worker time", "model s/MP")


def period_text(since: datetime, until: datetime) -> str:
    """``2026-11-07 09:00 → 2026-12-07 09:00 UTC``."""
    return f"{since:%Y-%m-%d %H:%M} → {until:%Y-%m-%d %H:%M} UTC"

