"""Automatic migrations are serialised across processes, and a schema newer than this release is said plainly.

Given several processes (a rolling update's workers, CLI commands) that find one database behind this release at
once, when they all migrate it, then each succeeds and the schema ends at head: the first to take the migration
lock (a PostgreSQL advisory lock, a lock file beside a SQLite file) migrates, the others find the work done. Given
a database a newer release migrated, when this release uses it, then every entry point says so in one line (a
``ConfigurationError`` naming both revisions) instead of Alembic's traceback. Each database is one of the test's
own (PostgreSQL is shared by parallel test processes).
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from jobs.errors import ConfigurationError
from tests.conftest import new_postgres_database

pytestmark = [pytest.mark.integration]

OLD_REVISION = "0008"  # before 0009 adds images.claim, the column the operator's processes collided on
PROCESSES = 4
ROUNDS = 2
BOUND_S = 120  # a bound on each wait, so a hung process fails the test instead of hanging it


@pytest.fixture(params=["sqlite", "postgresql"])
def old_databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    """:data:`ROUNDS` databases of the test's own, each at :data:`OLD_REVISION` (a release behind head)."""
    from db.engine import upgrade

    with ExitStack() as stack:
        if request.param == "sqlite":
            urls = [f"sqlite:///{tmp_path / f'round{n}.db'}" for n in range(ROUNDS)]
        else:
            urls = [stack.enter_context(new_postgres_database()) for _ in range(ROUNDS)]
        for url in urls:
            upgrade(url, OLD_REVISION)
        yield urls


def _migrate_each(urls: list[str], explicit: bool, start: multiprocessing.synchronize.Barrier,
                  outcomes: multiprocessing.Queue[tuple[int, str | None]]) -> None:
    """One process: for each database in turn, wait until every process is ready, then bring it to head the way
    a worker does (:func:`db.engine.ensure_schema`) or the way ``deblur db upgrade`` does (``explicit``). Reports
    each round's error, None for success. Everything slow (imports, connecting) is done before the start."""
    from db.engine import current_revision, ensure_schema, head_revision, upgrade

    head_revision()
    for n, url in enumerate(urls):
        current_revision(url)  # a connection in the pool, ready
        start.wait(BOUND_S)
        try:
            if explicit:
                upgrade(url)
            else:
                ensure_schema(url)
        except Exception as exc:  # reported to the test, which names it
            outcomes.put((n, f"{type(exc).__name__}: {exc}"))
        else:
            outcomes.put((n, None))


def test_processes_that_migrate_one_database_at_once_all_succeed(old_databases: list[str]) -> None:
    """A rolling update's workers all found the schema behind and migrated it at once: the second to add a column
    failed (DuplicateColumn), on PostgreSQL as on SQLite. Several processes now start together on each of a few
    databases, some as workers, some as 'deblur db upgrade': every one succeeds and each schema ends at head."""
    from db.engine import current_revision, head_revision

    context = multiprocessing.get_context("spawn")  # no engine, lock or thread of pytest's process inherited
    start = context.Barrier(PROCESSES)
    outcomes: multiprocessing.Queue[tuple[int, str | None]] = context.Queue()
    processes = [context.Process(target=_migrate_each, args=(old_databases, i % 2 == 1, start, outcomes))
                 for i in range(PROCESSES)]
    for process in processes:
        process.start()
    try:
        results = [outcomes.get(timeout=BOUND_S) for _ in range(PROCESSES * ROUNDS)]
    except queue.Empty:
        results = []
    finally:
        for process in processes:
            process.join(BOUND_S)
            if process.is_alive():
                process.kill()
    assert len(results) == PROCESSES * ROUNDS, "a process did not finish its rounds"
    assert [error for _, error in results if error is not None] == []
    assert [current_revision(url) for url in old_databases] == [head_revision()] * ROUNDS


def test_a_process_that_migrates_says_so_in_one_line_without_alembics_own(old_databases: list[str],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Every automatic check printed Alembic's INFO lines ("Will assume transactional DDL", its plugins, each
    step) into the worker's log; a migration now says, once, which revisions it went between, and Alembic's own
    level is left as it was."""
    from db.engine import ensure_schema, head_revision

    url = old_databases[0]
    ensure_schema.cache_clear()
    level = logging.getLogger("alembic").level
    with caplog.at_level(logging.INFO):
        ensure_schema(url)
        ensure_schema.cache_clear()
        ensure_schema(url)  # at head: checks only
    assert [r.getMessage() for r in caplog.records if r.name.startswith("alembic")] == []
    assert [r.getMessage() for r in caplog.records if r.name == "db.engine"] == [
        f"migrating the database schema from {OLD_REVISION} to {head_revision()}"]
    assert logging.getLogger("alembic").level == level


def _newer_revision() -> str:
    """A revision after this release's head, so one it has no migration for."""
    from db.engine import head_revision

    return f"{int(head_revision()) + 1:04d}"


def _as_if_a_newer_release_migrated(url: str) -> None:
    from db.engine import get_engine, upgrade

    upgrade(url)
    with get_engine(url).begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": _newer_revision()})


def test_a_schema_newer_than_this_release_is_a_configuration_error_naming_both_revisions(
        empty_database_url: str) -> None:
    """An older release against a database a newer one migrated raised Alembic's "Can't locate revision" from
    every command and every sweep; it now raises ConfigurationError naming the database's revision and its own,
    from the automatic check and from 'deblur db upgrade' alike, and each later call says it again."""
    from db.engine import ensure_schema, head_revision, upgrade

    _as_if_a_newer_release_migrated(empty_database_url)
    expected = (f"the database's schema {_newer_revision()} is newer than this release knows ({head_revision()}): "
                "upgrade this installation")
    ensure_schema.cache_clear()
    for attempt in (ensure_schema, ensure_schema, upgrade):
        with pytest.raises(ConfigurationError) as raised:
            attempt(empty_database_url)
        assert str(raised.value).startswith(expected)


def test_commands_and_the_workers_sweep_say_a_newer_schema_in_one_line(
        empty_database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """'deblur status' and 'deblur usage' printed a traceback, and a worker's sweep logged two (its broker watch's
    too) every round. The commands now print one error line and exit 2; each round of the sweep logs one line,
    without a traceback, and leaves the broker watch (which needs the same database) for the next."""
    from db.engine import ensure_schema
    from jobs.settings import load_settings
    from producer.cli import main
    from worker.sweeper import AbandonedImageSweeper

    _as_if_a_newer_release_migrated(empty_database_url)
    ensure_schema.cache_clear()
    monkeypatch.setenv("DEBLUR_DATABASE_URL", empty_database_url)
    for command in (["status"], ["usage", "--since", "7d"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: the database's schema {_newer_revision()} is newer")
        assert result.output.count("\n") == 1 and "Traceback" not in result.output

    monkeypatch.setenv("DEBLUR_BROKER_URL", "redis://127.0.0.1:1/0")  # watched; never reached
    sweeper = AbandonedImageSweeper(replace(load_settings(), claim_lease=60))
    assert sweeper.broker_watch is not None
    rounds = iter([False, False, True])  # two rounds, then stop
    monkeypatch.setattr(sweeper._stop, "wait", lambda _timeout: next(rounds))
    with caplog.at_level(logging.INFO):
        sweeper._run()
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(":")[0] for r in said] == ["the sweep for abandoned images cannot run"] * 2
    assert all(r.exc_info is None for r in said)


def test_a_process_waiting_for_anothers_migration_says_so(old_databases: list[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A process that found the schema behind while another migrated it stood still without a word (an index
    on a large table takes minutes): it now logs that it waits, then finds the work done or does it."""
    import threading

    from sqlalchemy import create_engine

    from db.engine import current_revision, ensure_schema, head_revision

    url = old_databases[0]
    ensure_schema.cache_clear()
    with ExitStack() as held:  # the other process's hold on the lock, as that process would take it
        if url.startswith("sqlite"):
            import fcntl

            path = Path(url.removeprefix("sqlite:///"))
            lock = held.enter_context(open(path.with_name(path.name + ".migration-lock"), "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        else:
            from db.engine import MIGRATION_LOCK_KEY

            engine = create_engine(url)
            held.callback(engine.dispose)
            connection = held.enter_context(engine.connect()).execution_options(isolation_level="AUTOCOMMIT")
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        caplog.set_level(logging.INFO, logger="db.engine")
        migrating = threading.Thread(target=ensure_schema, args=(url,), daemon=True)
        migrating.start()
        said = threading.Event()
        for _ in range(BOUND_S * 10):
            if any("waiting for another process" in r.getMessage() for r in caplog.records):
                said.set()
                break
            migrating.join(0.1)
        assert said.is_set() and migrating.is_alive()  # it waits, and says so
    migrating.join(BOUND_S)
    assert not migrating.is_alive() and current_revision(url) == head_revision()
