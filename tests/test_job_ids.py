"""Job rows as producers create them, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

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
