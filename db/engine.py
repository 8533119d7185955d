"""Engines, sessions and schema migrations.

SQLite (the default) is opened in WAL mode with a generous busy timeout so that
several worker processes can write to it; PostgreSQL is used as is.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from jobs.errors import ConfigurationError

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
log = logging.getLogger(__name__)

_upgrade_lock = threading.RLock()
"""Held by the thread that migrates, or checks before it may (:func:`ensure_schema`, :func:`upgrade`): one thread
of a process at a time. Reentrant, as ensure_schema holds it around :func:`_migration_lock`, which takes it too."""

MIGRATION_LOCK_KEY = 0x6465626C7572  # "deblur" in ASCII
"""The key of the PostgreSQL advisory lock every process of every release holds while it migrates a database:
a constant, so that releases agree on it (advisory locks are per database, so one key serves all of them)."""


def _normalise(url: str) -> str:
    # Accept the common short forms and use the psycopg 3 driver for PostgreSQL.
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL, or None for another database, an in-memory one or a ``file:`` URI."""
    parsed = make_url(_normalise(url))
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _is_default_database(path: Path) -> bool:
    """True for $DEBLUR_HOME/deblur.db, the database used when DEBLUR_DATABASE_URL is unset
    (:meth:`jobs.settings.Settings.resolved_database_url`; the local stack's too)."""
    from jobs.settings import deblur_home

    return path.resolve() == (deblur_home() / "deblur.db").resolve()


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot hold a database file (its first missing part, or a part that is a file); None when
    it is a folder."""
    if folder.is_dir():
        return None
    for part in [*reversed(folder.parents), folder]:
        if not part.exists():
            return f"the folder {part} does not exist"
        if not part.is_dir():
            return f"{part} is a file, not a folder"
    return f"{folder} cannot be used as a folder"  # pragma: no cover - a race, or an unreadable parent


def create_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite database (and its parents), for an explicit ``deblur db upgrade``.

    Raises:
        ConfigurationError: the folder cannot be made (a part of its path is a file, no permission, …).
    """
    path = _sqlite_file(url)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a part of the path is a file, no permission, a read-only file system…
        why = _folder_problem(path.parent) if isinstance(exc, (FileExistsError, NotADirectoryError)) else None
        why = why or f"its folder {path.parent} cannot be created ({exc.strerror or exc})"
        setting = ("DEBLUR_HOME (the default database's folder; or set DEBLUR_DATABASE_URL)"
                   if _is_default_database(path) else "DEBLUR_DATABASE_URL")
        raise ConfigurationError(f"the SQLite database {path} cannot be created: {why}; correct {setting}") from None


def check_sqlite_folder(url: str) -> None:
    """Make sure a SQLite database's folder is there before the file is opened.

    Only the default database ($DEBLUR_HOME/deblur.db) gets its folder created: a DEBLUR_DATABASE_URL with a
    typing error would otherwise make folders anywhere and show an empty database as if it were the real one.
    ``deblur db upgrade`` creates any database's folder (:func:`create_sqlite_folder`).

    Raises:
        ConfigurationError: the folder is missing (or a part of its path is a file), naming it.
    """
    path = _sqlite_file(url)
    if path is None:
        return
    if _is_default_database(path):
        create_sqlite_folder(url)
        return
    problem = _folder_problem(path.parent)
    if problem is not None:
        fix = ("" if "file, not a folder" in problem else f", or create the folder (mkdir -p {path.parent}, or "
               "'deblur db upgrade', which also creates the schema)")
        raise ConfigurationError(f"DEBLUR_DATABASE_URL names the SQLite database {path}, but {problem}. "
                                 f"Correct DEBLUR_DATABASE_URL{fix}")


@functools.lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per URL per process (pooled connections).

    Raises:
        ConfigurationError: a SQLite database's folder is missing (:func:`check_sqlite_folder`), or the URL is
            not SQLite nor PostgreSQL.
    """
    engine = _create_engine(url)
    _engines.add(engine)
    return engine


def _create_engine(url: str) -> Engine:
    url = _normalise(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        check_sqlite_folder(url)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    if parsed.get_backend_name() == "postgresql":
        # a server that does not answer (a dead host, a dropped route) fails a connection in 10 s instead of the
        # TCP stack's minutes, so a worker's retry or an operator's command says so; the URL's own value wins
        connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": 10}
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=connect_args)
    raise ConfigurationError(f"unsupported database URL {url!r}; use sqlite:///file.db or postgresql://…")


def _sessionmaker(url: str) -> sessionmaker[Session]:
    """The session factory of ``url``'s engine, made once per engine. Cached apart from the engine (both by URL,
    each evicting on its own), a factory could outlive the engine :func:`get_engine` hands out, and sessions and
    anything listening on that engine's events would then talk through two different pools."""
    engine = get_engine(url)
    maker: sessionmaker[Session] | None = getattr(engine, "_deblur_sessionmaker", None)
    if maker is None:
        maker = sessionmaker(engine, expire_on_commit=False)
        engine._deblur_sessionmaker = maker  # type: ignore[attr-defined]  # lives and dies with its engine
    return maker


def _forget_parent_engines() -> None:
    """In a forked child (a Celery pool process started after its parent used the database, as a worker's main
    process does to look for abandoned images): the pooled connections the parent opened are the parent's.
    A child that used one would interleave its statements with the parent's on one socket. They are dropped
    without being closed (closing would end the parent's sessions; psycopg leaves a connection made by another
    process alone when it is collected), and the child opens its own."""
    for engine in list(_engines):
        engine.dispose(close=False)
    _engines.clear()
    get_engine.cache_clear()


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()  # the engines get_engine made in this process
def _fresh_upgrade_lock() -> None:
    """A child process forked while a thread of its parent held :data:`_upgrade_lock` would inherit it held, by
    a thread it does not have, for good: the child gets its own."""
    global _upgrade_lock
    _upgrade_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_engines)
    os.register_at_fork(after_in_child=_fresh_upgrade_lock)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session committed on success and rolled back on error."""
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", _normalise(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (creates the schema from nothing): the explicit ``deblur db upgrade``.

    Holds the migration lock (:func:`_migration_lock`), so it waits for a worker that migrates the same database
    meanwhile and then finds its work done, instead of applying the same DDL a second time.

    Raises:
        ConfigurationError: the database's schema is newer than this release knows.
    """
    with _migration_lock(url):
        refuse_newer_schema(url, current_revision(url))
        _apply_migrations(url, revision)


def _apply_migrations(url: str, revision: str) -> None:
    """Run Alembic up to ``revision`` on one of the engine's connections; the caller holds the migration lock."""
    from alembic import command

    cfg = alembic_config(url)
    with get_engine(url).begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    """Held while a process checks a database's revision and migrates it, by one process at a time per database.

    Workers started together (a rolling update of several pods) all find the schema behind and migrate it at
    once, and the second to add a column fails (DuplicateColumn). PostgreSQL: a session-level advisory lock on a
    connection of its own, in autocommit so that it holds no transaction while it waits or the migration runs;
    it ends with its connection if this process dies. A SQLite file: an exclusive ``flock`` on a lock file beside
    it (SQLite's own locks end with each transaction, and Alembic runs SQLite's DDL in several); the kernel
    releases it with the process. An in-memory database belongs to one process: the thread lock suffices.

    Raises:
        ConfigurationError: as :func:`get_engine` (a SQLite database's folder is missing, …).
    """
    with _upgrade_lock:
        engine = get_engine(url)  # first: a SQLite folder that is missing is said before the lock file is opened
        if engine.dialect.name == "postgresql":
            with _advisory_lock(engine):
                yield
            return
        path = _sqlite_file(url)
        if path is None:
            yield
            return
        import fcntl

        with open(path.with_name(path.name + ".migration-lock"), "a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _say_waiting(engine)
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _say_waiting(engine: Engine) -> None:
    """Log that this process waits for another's migration of ``engine``'s database: an index built on a large
    table can take minutes, and a process (an API server, a worker) standing still meanwhile should say why."""
    log.info("waiting for another process to finish migrating the database at %s",
             engine.url.render_as_string(hide_password=True))


@contextmanager
def _advisory_lock(engine: Engine) -> Iterator[None]:
    """PostgreSQL's session-level advisory lock :data:`MIGRATION_LOCK_KEY`, held on a connection of its own.

    Were it left held (an unlock that failed on a connection that still works), the pool would hand the lock on
    with the connection and keep it from every other process for good: such a connection is closed instead.
    """
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        if not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY}).scalar():
            _say_waiting(engine)
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        try:
            yield
        finally:
            try:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            except Exception:
                connection.invalidate()  # closing the session ends its locks
                raise


def current_revision(url: str) -> str | None:
    """The database's Alembic revision, None when it has no schema yet."""
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@functools.lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    """This release's migrations (read once: they do not change while it runs)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head_revision() -> str:
    """The revision this release's models are at."""
    return _scripts().get_current_head() or ""


def known_revisions() -> frozenset[str]:
    """Every revision this release has a migration for: a database at another was migrated by a newer release."""
    return frozenset(script.revision for script in _scripts().walk_revisions())


def refuse_newer_schema(url: str, current: str | None) -> None:
    """Stop with a clear message when ``url``'s database is at ``current``, a revision this release does not know.

    Alembic would fail with "Can't locate revision" (a traceback from every command and every sweep of a
    worker); nothing this release does can help: only an upgrade of this installation can.

    Raises:
        ConfigurationError: ``current`` is not one of :func:`known_revisions`, naming it and this release's head.
    """
    if current is None or current in known_revisions():
        return
    shown = make_url(url).render_as_string(hide_password=True)
    raise ConfigurationError(f"the database's schema {current} is newer than this release knows ({head_revision()}): "
                             f"upgrade this installation to the release that migrated the database at {shown}")


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic's own INFO lines (its plugins, "Will assume transactional DDL", each step) held back: they fill a
    worker's log at every automatic check. The caller holds :data:`_upgrade_lock`, so no other thread restores
    the level meanwhile; the explicit ``deblur db upgrade`` keeps them."""
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        alembic_log.setLevel(level)


@functools.lru_cache(maxsize=8)
def ensure_schema(url: str) -> None:
    """Migrate to head when the database is behind (once per process and URL).

    Every worker does this at its first use of the database, so a rolling update's workers migrate together:
    the revision is checked again under the migration lock, and only the first to take it migrates.

    Raises:
        ConfigurationError: the database's schema is newer than this release knows (the call is not cached, so
            each later call says it again), or as :func:`get_engine`.
    """
    with _upgrade_lock, _quiet_alembic():
        head, current = head_revision(), current_revision(url)
        if current == head:
            return
        refuse_newer_schema(url, current)
        with _migration_lock(url):
            current = current_revision(url)  # another process may have migrated while this one waited
            if current == head:
                return
            refuse_newer_schema(url, current)  # or a newer release
            log.info("migrating the database schema from %s to %s", current or "nothing", head)
            _apply_migrations(url, "head")
