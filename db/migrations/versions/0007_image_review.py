"""Images the blind model returned as they came, flagged for review (jobs.review).

The images already recorded are flagged from their metrics by this release's
rule (jobs.review.review_reason), as the worker flags new ones. Only images
with the blind model's metrics are read, a thousand at a time, and only those
flagged are written.

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

CHUNK = 1000


def upgrade() -> None:
    from jobs.review import review_reason

    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("review", sa.String(32), nullable=True))
    connection = op.get_bind()
    candidates = list(connection.execute(sa.text(
        "SELECT DISTINCT m.image_id FROM metrics m JOIN images i ON i.id = m.image_id "
        "WHERE i.status = 'done' AND m.name = 'blur_detected' ORDER BY m.image_id")).scalars())
    read = sa.text("SELECT image_id, model, name, value FROM metrics WHERE image_id IN :ids").bindparams(
        sa.bindparam("ids", expanding=True))
    for start in range(0, len(candidates), CHUNK):
        metrics: dict[int, list[tuple[str, str, float | None]]] = {}
        for image_id, model, name, value in connection.execute(read, {"ids": candidates[start:start + CHUNK]}):
            metrics.setdefault(image_id, []).append((model, name, value))
        flagged = [{"id": image_id, "review": reason} for image_id, rows in metrics.items()
                   if (reason := review_reason(rows)) is not None]
        if flagged:
            connection.execute(sa.text("UPDATE images SET review = :review WHERE id = :id"), flagged)


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("review")
