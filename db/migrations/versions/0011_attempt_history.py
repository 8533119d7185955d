"""Which image an earlier attempt was, and why it failed, for ``deblur results --history``.

Attempts kept before this revision have neither: they still count in usage.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("earlier_attempts", sa.Column("image_id", sa.Integer(), nullable=True))
    op.add_column("earlier_attempts", sa.Column("error", sa.Text(), nullable=True))
    op.create_index("ix_earlier_attempts_image_id", "earlier_attempts", ["image_id"])


def downgrade() -> None:
    op.drop_index("ix_earlier_attempts_image_id", table_name="earlier_attempts")
    # plain DROP COLUMNs (SQLite 3.35+; the columns are no longer indexed)
    op.execute("ALTER TABLE earlier_attempts DROP COLUMN error")
    op.execute("ALTER TABLE earlier_attempts DROP COLUMN image_id")
