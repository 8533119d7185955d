"""Finding a broker that lost its messages: the count each queue's workers write to it, and when each pending
image's message was sent.

Image rows from before this keep no send time, and are taken for sent long ago.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "broker_marks",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
        sa.Column("broker", sa.String(length=512), nullable=False),
        sa.Column("queue", sa.String(length=255), nullable=False),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        sa.Column("confirmed", sa.BigInteger(), nullable=False),
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lost_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("losses", sa.Integer(), nullable=False),
        sa.Column("mending_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mending_by", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("broker", "queue", name="uq_broker_marks_broker_queue"),
    )
    # nullable with no default: PostgreSQL adds it without rewriting a large images table
    op.add_column("images", sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # a plain DROP COLUMN: on SQLite a batch rebuild of images would cascade into metrics and delete them all
    op.execute("ALTER TABLE images DROP COLUMN sent_at")
    op.drop_table("broker_marks")
