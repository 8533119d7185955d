"""Which run of a batch holds a running image, and until when, so two deliveries of one batch never restore it
at once.

Rows running before keep NULL: any delivery may take them, as before.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("claim", sa.String(32), nullable=True))
    op.add_column("images", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # plain DROP COLUMNs: on SQLite a batch rebuild of images would cascade into metrics and delete them all
    op.execute("ALTER TABLE images DROP COLUMN lease_until")
    op.execute("ALTER TABLE images DROP COLUMN claim")
