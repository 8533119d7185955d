"""One engine and one session factory per database URL per process, and none shared with a forked child.

Run against the session's PostgreSQL, where a shared connection would corrupt the protocol.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import event, text

pytestmark = [pytest.mark.integration]


def test_a_forked_process_opens_its_own_connections_and_leaves_its_parents_alone(postgres_url: str) -> None:
    """A worker's main process now uses the database (its sweep), and Celery forks a new pool process whenever
    one dies: the child inherited the parent's pooled connections, and the two interleaved statements on one
    socket. The child now drops them unclosed and opens its own."""
    from db.engine import ensure_schema, get_engine, session_scope

    ensure_schema(postgres_url)
    get_engine.cache_clear()  # a fresh engine: its pool then holds the one connection opened below, idle
    with session_scope(postgres_url) as s:
        parent_backend = s.scalar(text("select pg_backend_pid()"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the backend its session talks to, and leave without running pytest's exit
        code = 1
        try:
            with session_scope(postgres_url) as s:
                os.write(write, str(s.scalar(text("select pg_backend_pid()"))).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    child_backend = int(os.read(read, 64) or b"0")
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_backend not in (0, parent_backend)
    with session_scope(postgres_url) as s:  # the parent's pooled connection still works, and is its own
        assert s.scalar(text("select pg_backend_pid()")) == parent_backend


def test_sessions_go_through_the_engine_get_engine_hands_out_after_its_cache_is_cleared(postgres_url: str) -> None:
    """The session factory was cached by URL apart from the engine: once the engine's cache was cleared (or
    evicted), sessions kept the old engine while ``get_engine`` made a new one, so a listener on its events heard
    nothing and the process held two pools for one database."""
    from db.engine import ensure_schema, get_engine, session_scope

    ensure_schema(postgres_url)
    with session_scope(postgres_url) as s:
        s.scalar(text("select 1"))
    get_engine.cache_clear()
    heard: list[str] = []

    def listen(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        heard.append(statement)

    engine = get_engine(postgres_url)
    event.listen(engine, "before_cursor_execute", listen)
    try:
        with session_scope(postgres_url) as s:
            s.scalar(text("select 42"))
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    assert "select 42" in heard
