"""Images the blind model returned as they came, flagged for review (jobs.review).

The images already recorded are flagged from their metrics, as the worker now
flags new ones; only images with the blind model's metrics are rewritten (one
pass over the metrics table).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# jobs.review's rules in SQL (kept here as they were when this revision was written)
BACKFILL = """
UPDATE images SET review = CASE
    WHEN EXISTS (SELECT 1 FROM metrics m WHERE m.image_id = images.id
                 AND m.name = 'kernel_fallback' AND m.value >= 0.5) THEN 'not_restored'
    WHEN EXISTS (SELECT 1 FROM metrics m WHERE m.image_id = images.id
                 AND ((m.name = 'blur_detected' AND m.value < 0.5)
                      OR (m.name = 'kernel_size' AND m.value <= 2))) THEN 'judged_sharp'
END
WHERE status = 'done' AND id IN (SELECT image_id FROM metrics
                                 WHERE name IN ('kernel_fallback', 'blur_detected', 'kernel_size'))
"""


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("review", sa.String(32), nullable=True))
    op.execute(BACKFILL)


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("review")
