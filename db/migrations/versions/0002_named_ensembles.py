"""Named ensembles: member weights fitted on an evaluation job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ensembles",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("source_job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("psnr_fitted", sa.Float(), nullable=True),
        sa.Column("psnr_equal", sa.Float(), nullable=True),
        sa.Column("images", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", name="uq_ensembles_name"),
    )


def downgrade() -> None:
    op.drop_table("ensembles")
