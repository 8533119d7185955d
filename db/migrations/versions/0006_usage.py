"""Usage accounting: an index on images' finish times, and the rollups 'db prune' keeps of deleted jobs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_images_finished_at", "images", ["finished_at"])
    op.create_table(
        "usage_rollups",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("device", sa.String(32), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("megapixels", sa.Float(), nullable=False),
        sa.Column("download_s", sa.Float(), nullable=False),
        sa.Column("inference_s", sa.Float(), nullable=False),
        sa.Column("upload_s", sa.Float(), nullable=False),
    )
    op.create_index("ix_usage_rollups_day", "usage_rollups", ["day"])


def downgrade() -> None:
    op.drop_index("ix_usage_rollups_day", table_name="usage_rollups")
    op.drop_table("usage_rollups")
    op.drop_index("ix_images_finished_at", table_name="images")
