"""Per-job windows of batches in the broker (DEBLUR_JOB_WINDOW), so jobs at one priority take turns.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COUNTERS = ("batches_listed", "batches_sent", "batches_in_flight")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in COUNTERS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_images_job_batch", "images", ["job_id", "batch"])


def downgrade() -> None:
    op.drop_index("ix_images_job_batch", table_name="images")
    # plain DROP COLUMNs (SQLite 3.35+; no counter is indexed): on SQLite a batch rebuild of jobs would cascade into
    # images and metrics and delete them all
    for name in reversed(COUNTERS):
        op.execute(f"ALTER TABLE jobs DROP COLUMN {name}")
