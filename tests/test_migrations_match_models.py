"""The schema the migrations build is the one the models describe, on SQLite and on PostgreSQL: a column, index or
table added to one and not the other fails here, not in production after 'deblur db upgrade'."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration]


def test_the_migrated_schema_matches_the_models(empty_database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.engine import get_engine, upgrade
    from db.schema import Base

    upgrade(empty_database_url)
    with get_engine(empty_database_url).connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
