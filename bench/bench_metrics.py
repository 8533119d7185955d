"""How long a Prometheus scrape of the queue's metrics takes on an archive's worth of history.

Fills a fresh database with FINISHED jobs of IMAGES done images each (the
history a year of archive work leaves) and a few unfinished jobs (the backlog:
pending, running, recently done), then times the SQL part of a scrape
(``queries.operations_snapshot``; the broker's part, one LLEN per priority
list, does not grow with history). Prints the median of several scrapes, and the
same figure with the history left out, so the ratio shows whether a scrape
reads the history (it should not: it reads the jobs index and the images of
unfinished or recently finished jobs).

    python bench/bench_metrics.py [--postgres URL] [--finished 200] [--images 5000]

Without --postgres it uses a SQLite file. With --postgres URL (an admin URL such
as postgresql+psycopg://postgres@127.0.0.1:5432/test) it creates and drops a
database of its own.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text

from db import queries
from db.engine import ensure_schema, get_engine, session_scope
from db.schema import Image, Job, utcnow

BACKLOG_JOBS = 3
BACKLOG_IMAGES = 2000


def add_jobs(url: str, count: int, images: int, finished: bool, teams: Sequence[str] = (), first: int = 0) -> None:
    """``count`` jobs of ``images`` images: finished days ago (job ``first + j`` finished ``399 - first - j``
    days ago), or unfinished with a mixed backlog; with ``teams``, each job carries a ``team`` label, in turn."""
    engine = get_engine(url)
    now = utcnow()
    for j in range(first, first + count):
        job_id = str(uuid.uuid4())
        spec = {"labels": {"team": teams[j % len(teams)]}, "models": ["l0-blind:1"]} if teams else {}
        with engine.begin() as connection:
            connection.execute(insert(Job), [{
                "id": job_id, "kind": "deblur", "spec": spec, "total": images,
                "status": "done" if finished else "running",
                "created_at": now - timedelta(days=400 - j if finished else 1),
                "finished_at": now - timedelta(days=399 - j) if finished else None,
            }])
            rows = []
            for i in range(images):
                if finished:
                    status, at = "done", now - timedelta(days=399 - j)
                else:
                    status = ("pending", "running", "done")[i % 3]
                    at = now - timedelta(seconds=i % 1800) if status == "done" else None
                rows.append({"job_id": job_id, "input_uri": f"s3://archive/{job_id}/{i:06d}.tif", "status": status,
                             "width": 4000, "height": 3000, "inference_s": 30.0, "unfinished_starts": 0,
                             "started_at": at, "finished_at": at, "batch": i // 8, "attempts": 1})
            connection.execute(insert(Image), rows)


@contextmanager
def temporary_database(postgres: str | None) -> Iterator[str]:
    """The URL of a fresh database: a SQLite file, or a PostgreSQL database created on the server that the admin
    URL ``postgres`` names and dropped afterwards."""
    if not postgres:
        yield f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}"
        return
    admin = create_engine(postgres, isolation_level="AUTOCOMMIT")
    name = f"deblur_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield postgres.rsplit("/", 1)[0] + "/" + name
    finally:
        get_engine.cache_clear()
        with admin.connect() as c:
            c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' "
                           "AND pid <> pg_backend_pid()"))
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def analyze(url: str) -> None:
    """Refresh PostgreSQL's planner statistics after a bulk load (SQLite needs nothing)."""
    if url.startswith("postgresql"):
        with get_engine(url).begin() as c:  # committed: a rolled-back ANALYZE leaves the planner without statistics
            c.execute(text("ANALYZE"))


def time_scrapes(url: str, repeat: int) -> float:
    now = utcnow()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        with session_scope(url) as session:
            queries.operations_snapshot(session, stalled_before=now - timedelta(hours=1),
                                        recent_since=now - timedelta(minutes=15))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def history_arguments(description: str, finished: int, images: int, repeat: int) -> argparse.Namespace:
    """The command line of a benchmark on a filled history: --postgres, --finished, --images, --repeat."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--postgres", help="admin URL of a PostgreSQL server (a database is created and dropped)")
    parser.add_argument("--finished", type=int, default=finished,
                        help=f"finished jobs of history, one a day (default {finished})")
    parser.add_argument("--images", type=int, default=images, help=f"images per finished job (default {images})")
    parser.add_argument("--repeat", type=int, default=repeat, help=f"runs timed per figure (median printed; "
                                                                   f"default {repeat})")
    return parser.parse_args()


def main() -> None:
    args = history_arguments(__doc__.split("\n\n")[0], finished=200, images=5000, repeat=7)

    with temporary_database(args.postgres) as url:
        ensure_schema(url)
        add_jobs(url, BACKLOG_JOBS, BACKLOG_IMAGES, finished=False)
        analyze(url)
        backlog_only = time_scrapes(url, args.repeat)
        started = time.perf_counter()
        step = 20
        for first in range(0, args.finished, step):
            add_jobs(url, min(step, args.finished - first), args.images, finished=True, first=first)
            print(f"\rhistory: {min(first + step, args.finished)}/{args.finished} jobs", end="", flush=True)
        analyze(url)
        print(f" ({time.perf_counter() - started:.0f} s to fill)")
        with_history = time_scrapes(url, args.repeat)
        total = args.finished * args.images + BACKLOG_JOBS * BACKLOG_IMAGES
        print(f"database: {'PostgreSQL' if args.postgres else 'SQLite'}; {total:,} images "
              f"({BACKLOG_JOBS * BACKLOG_IMAGES:,} in {BACKLOG_JOBS} unfinished jobs)")
        print(f"SQL part of a scrape, median of {args.repeat}: backlog only {backlog_only * 1000:.1f} ms, "
              f"with the history {with_history * 1000:.1f} ms (ratio {with_history / backlog_only:.2f})")


if __name__ == "__main__":
    main()
