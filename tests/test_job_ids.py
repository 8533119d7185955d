"""Job ids as people type them (whole, or a unique start of one), and job rows as producers create them;
on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner

from jobs.errors import AmbiguousJobIdError, UnknownJobError

TWINS = ("abcd1234-0000-4000-8000-000000000001", "abcd5678-0000-4000-8000-000000000002")


def _jobs(url: str) -> str:
    """Jobs in the database at ``url``: two whose ids share 'abcd' and a new ordinary one, whose id it returns."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import Job

    ensure_schema(url)
    with session_scope(url) as session:
        for job_id in TWINS:  # the PostgreSQL database lives for the whole session: add them once
            if session.get(Job, job_id) is None:
                session.add(Job(id=job_id, kind="deblur", spec={}, status="done", total=0))
        job, _ = queries.create_job(session, "deblur", {"models": ["wiener"]})
        queries.insert_images(session, job.id, [{"input_uri": "s3://b/in/a.png", "output_uri": "s3://b/out/a.png"}],
                              batch=0)
        return job.id


def test_a_unique_start_names_the_job(database_url: str) -> None:
    from db import queries
    from db.engine import session_scope

    ordinary = _jobs(database_url)
    with session_scope(database_url) as session:
        assert queries.resolve_job_id(session, ordinary) == ordinary
        assert queries.resolve_job_id(session, ordinary[:8]) == ordinary
        assert queries.resolve_job_id(session, ordinary[:8].upper()) == ordinary
        # what a narrow 'deblur status' table shows: the id cut short with an ellipsis
        assert queries.resolve_job_id(session, f" {ordinary[:24]}…") == ordinary
        assert queries.resolve_job_id(session, "abcd1") == TWINS[0]
        with pytest.raises(AmbiguousJobIdError, match="several job ids .*abcd1234.*abcd5678.*give more of the id"):
            queries.resolve_job_id(session, "abcd")
        for text in ("abc", "abcd9", "ab%d", str(uuid.uuid4())):
            with pytest.raises(UnknownJobError, match="no job with id .*4 or more characters"):
                queries.resolve_job_id(session, text)


def test_the_cli_takes_a_start_of_the_id(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.cli import main

    ordinary = _jobs(database_url)
    monkeypatch.setenv("DEBLUR_DATABASE_URL", database_url)
    runner = CliRunner()
    shown = runner.invoke(main, ["status", ordinary[:8], "--format", "json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["id"] == ordinary
    rows = runner.invoke(main, ["results", ordinary[:6], "--format", "json"])
    assert rows.exit_code == 0, rows.output
    assert [r["input"] for r in json.loads(rows.output)] == ["s3://b/in/a.png"]
    cancelled = runner.invoke(main, ["cancel", ordinary[:8]])
    assert cancelled.exit_code == 0 and f"job {ordinary} cancelled; 1 pending" in cancelled.output
    ambiguous = runner.invoke(main, ["results", "abcd"])
    assert ambiguous.exit_code == 2 and "give more of the id" in ambiguous.output


def test_a_failed_insert_without_a_key_is_not_answered_with_another_job(database_url: str) -> None:
    """create_job looks up the job that won a race on its key; without a key there is no race to lose,
    and a failed insert (here a duplicate id pending in the same session) must surface, not return some
    other keyless job."""
    from sqlalchemy.exc import IntegrityError

    from db import queries
    from db.engine import session_scope
    from db.schema import Job

    ordinary = _jobs(database_url)
    with pytest.raises(IntegrityError), session_scope(database_url) as session:
        session.add(Job(id=ordinary, kind="deblur", spec={}, status="done", total=0))
        queries.create_job(session, "deblur", {"models": ["wiener"]})
