"""Every page's pixels on the image row, so usage counts a multi-page TIFF whole.

Rows recorded before keep NULL: they count width × height, their first page's.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("pixels", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # a plain DROP COLUMN: on SQLite a batch rebuild of images would cascade into metrics and delete them all
    op.execute("ALTER TABLE images DROP COLUMN pixels")
