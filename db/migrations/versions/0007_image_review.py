"""Images the blind model returned as they came, flagged for review (jobs.review).

The images already recorded are flagged from their metrics with the rule as it
stood when this revision was written (frozen below, so a later change to
jobs.review does not change what this revision writes): only when every member
is a blind one (it reports blur_detected) and each left the image as it came.
Images are read a thousand at a time in id order, and only flagged ones are
written. PostgreSQL holds the images table locked while it runs; offline
(``--sql``) the backfill is left out.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import context, op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

CHUNK = 1000
NOT_MEMBERS = ("input", "ensemble")


def _reason(rows: list[tuple[str, str, float | None]]) -> str | None:
    members: dict[str, dict[str, float | None]] = {}
    for model, name, value in rows:
        if model not in NOT_MEMBERS:
            members.setdefault(model, {})[name] = value
    reasons = []
    for figures in members.values():
        if "blur_detected" not in figures:
            return None
        detected, size = figures.get("blur_detected"), figures.get("kernel_size")
        if (figures.get("kernel_fallback") or 0.0) >= 0.5:
            reasons.append("not_restored")
        elif (detected is not None and detected < 0.5) or (size is not None and size <= 2):
            reasons.append("judged_sharp")
        else:
            return None
    if not reasons:
        return None
    return "not_restored" if "not_restored" in reasons else "judged_sharp"


def upgrade() -> None:
    op.add_column("images", sa.Column("review", sa.String(32), nullable=True))
    if context.is_offline_mode():
        return
    connection = op.get_bind()
    page = sa.text("SELECT DISTINCT m.image_id FROM metrics m JOIN images i ON i.id = m.image_id "
                   "WHERE i.status = 'done' AND m.name = 'blur_detected' AND m.image_id > :after "
                   "ORDER BY m.image_id LIMIT :n")
    read = sa.text("SELECT image_id, model, name, value FROM metrics WHERE image_id IN :ids").bindparams(
        sa.bindparam("ids", expanding=True))
    after = 0
    while ids := list(connection.execute(page, {"after": after, "n": CHUNK}).scalars()):
        after = ids[-1]
        metrics: dict[int, list[tuple[str, str, float | None]]] = {}
        for image_id, model, name, value in connection.execute(read, {"ids": ids}):
            metrics.setdefault(image_id, []).append((model, name, value))
        flagged = [{"id": image_id, "review": reason} for image_id, rows in metrics.items()
                   if (reason := _reason(rows)) is not None]
        if flagged:
            connection.execute(sa.text("UPDATE images SET review = :review WHERE id = :id"), flagged)


def downgrade() -> None:
    # a plain DROP COLUMN: on SQLite a batch rebuild of images would cascade into metrics and delete them all
    op.execute("ALTER TABLE images DROP COLUMN review")
