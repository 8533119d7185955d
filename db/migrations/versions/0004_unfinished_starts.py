"""Starts of an image that never reached an outcome (its worker was lost), to stop a poison image.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("unfinished_starts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    # a plain DROP COLUMN (SQLite 3.35+; the column is not indexed): on SQLite a batch rebuild of images would cascade
    # into metrics and delete them all
    op.execute("ALTER TABLE images DROP COLUMN unfinished_starts")
