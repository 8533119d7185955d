"""How long ``deblur usage`` takes on an archive's year of history, and whether pruning changes its answer.

Fills a fresh database with FINISHED jobs of IMAGES done images each, one job a
day going back FINISHED days from today, each labelled with one of four teams. Then, per
period (7, 30 and 365 days), it prints the median time of a whole
``usage_report`` grouped by team with the index on the images' finish times,
without it (dropped in the run) and with it again (rebuilt), so the order
of the runs shows too. Last it prunes every
job finished more than 90 days ago (their usage goes to the rollups) and asks
the 365-day question again: the totals must not change, and the time says what
reading rollups costs.

    python bench/bench_usage.py [--postgres URL] [--finished 400] [--images 2500]

Without --postgres it uses a SQLite file; with an admin URL (e.g.
postgresql+psycopg://postgres@127.0.0.1:5432/test) it creates and drops a
database of its own.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PERIODS_DAYS = (7, 30, 365)
TEAMS = ("ingest", "archive", "science", "web")


def time_report(settings, days: int, repeat: int) -> tuple[float, dict]:  # type: ignore[no-untyped-def]
    """Median seconds of ``usage_report`` over the ``days`` whole UTC days before today's start, by team, and its
    total (whole days, because that is what a pruned job's rollup can be asked for exactly)."""
    from db.schema import utcnow
    from producer.usage import usage_report

    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    times, total = [], {}
    for _ in range(repeat):
        started = time.perf_counter()
        report = usage_report(settings, today - timedelta(days=days), today, by=["label:team"])
        times.append(time.perf_counter() - started)
        total = report.total.to_dict()
    return statistics.median(times), total


def main() -> None:
    from sqlalchemy import text

    from bench.bench_metrics import add_jobs, analyze, history_arguments, temporary_database

    args = history_arguments(__doc__.split("\n\n")[0], finished=400, images=2500, repeat=5)
    from db.engine import ensure_schema, get_engine
    from jobs.settings import load_settings
    from producer.prune import prune_jobs

    with temporary_database(args.postgres) as url:
        os.environ["DEBLUR_DATABASE_URL"] = url
        settings = load_settings()
        ensure_schema(url)
        started = time.perf_counter()
        step = 20
        for first in range(0, args.finished, step):
            # job j finished 399 - j days ago: shift so that the newest finished today
            add_jobs(url, min(step, args.finished - first), args.images, finished=True, teams=TEAMS,
                     first=first + 400 - args.finished)
            print(f"\rhistory: {min(first + step, args.finished)}/{args.finished} jobs", end="", flush=True)
        analyze(url)
        print(f" ({time.perf_counter() - started:.0f} s to fill); "
              f"{'PostgreSQL' if args.postgres else 'SQLite'}, {args.finished * args.images:,} images")

        indexed = {days: time_report(settings, days, args.repeat) for days in PERIODS_DAYS}
        with get_engine(url).begin() as c:
            c.execute(text("DROP INDEX ix_images_finished_at"))
        analyze(url)
        unindexed = {days: time_report(settings, days, args.repeat) for days in PERIODS_DAYS}
        with get_engine(url).begin() as c:
            c.execute(text("CREATE INDEX ix_images_finished_at ON images (finished_at)"))
        analyze(url)
        reindexed = {days: time_report(settings, days, args.repeat) for days in PERIODS_DAYS}
        print(f"usage by team, median of {args.repeat}: with the index / without it / with it again")
        for days in PERIODS_DAYS:
            (with_s, total), (without_s, _), (again_s, _) = indexed[days], unindexed[days], reindexed[days]
            print(f"  last {days:>3} days: {total['images_done']:>9,} images  {with_s * 1000:8.1f} / "
                  f"{without_s * 1000:8.1f} / {again_s * 1000:8.1f} ms")

        started = time.perf_counter()
        pruned = prune_jobs(settings, 90)
        print(f"pruned {pruned.jobs} jobs ({pruned.images:,} images) in {time.perf_counter() - started:.0f} s")
        analyze(url)
        after_s, after_total = time_report(settings, 365, args.repeat)
        before_s, before_total = indexed[365]
        print(f"  last 365 days after pruning: {after_total['images_done']:,} images in {after_s * 1000:.1f} ms "
              f"(before {before_s * 1000:.1f} ms); totals unchanged: {after_total == before_total}")


if __name__ == "__main__":
    main()
