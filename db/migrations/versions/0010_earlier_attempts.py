"""Earlier attempts: an image's outcome kept when a retry or ``deblur verify`` replaces it, so usage counts every
attempt in its own period.

Outcomes replaced before this revision are gone; nothing is backfilled.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "earlier_attempts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("device", sa.String(32), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("pixels", sa.BigInteger(), nullable=True),
        sa.Column("download_s", sa.Float(), nullable=True),
        sa.Column("inference_s", sa.Float(), nullable=True),
        sa.Column("upload_s", sa.Float(), nullable=True),
    )
    op.create_index("ix_earlier_attempts_job_id", "earlier_attempts", ["job_id"])
    op.create_index("ix_earlier_attempts_finished_at", "earlier_attempts", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_earlier_attempts_finished_at", table_name="earlier_attempts")
    op.drop_index("ix_earlier_attempts_job_id", table_name="earlier_attempts")
    op.drop_table("earlier_attempts")
