"""Fixity: SHA-256 of each image's input as read and of its output as written.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:  # SQLite alters tables by copying them
        batch.add_column(sa.Column("input_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("output_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    # plain DROP COLUMNs (SQLite 3.35+; neither column is indexed): on SQLite a batch rebuild of images would cascade
    # into metrics and delete them all
    op.execute("ALTER TABLE images DROP COLUMN output_sha256")
    op.execute("ALTER TABLE images DROP COLUMN input_sha256")
