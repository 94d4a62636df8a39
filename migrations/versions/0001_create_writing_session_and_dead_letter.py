"""create writing_session and dead_letter

Revision ID: 97a8d00427cc
Revises:
Create Date: 2026-11-26

Workers of the previous release keep running while this migrates: add columns nullable or with a
server default, and drop nothing they still read, until they are gone.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "97a8d00427cc"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_letter",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("task_name", sa.String(length=200), nullable=False),
        sa.Column("task_id", sa.String(length=200), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("error_type", sa.String(length=200), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letter")),
    )
    with op.batch_alter_table("dead_letter", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dead_letter_failed_at"), ["failed_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_dead_letter_task_id"), ["task_id"], unique=False)

    op.create_table(
        "writing_session",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.String(length=200), nullable=True),
        sa.Column("content", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("author_id", sa.String(length=64), nullable=True),
        sa.Column("word_count", sa.Integer(), nullable=False),
        sa.Column("char_count", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(deleted_at IS NULL AND topic IS NOT NULL)"
            " OR (deleted_at IS NOT NULL AND topic IS NULL)",
            name=op.f("ck_writing_session_topic_null_only_on_tombstone"),
        ),
        sa.CheckConstraint(
            "ended_at IS NULL OR ended_at >= started_at",
            name=op.f("ck_writing_session_ended_not_before_started"),
        ),
        sa.CheckConstraint(
            "length(content) <= 1000000", name=op.f("ck_writing_session_content_length")
        ),
        sa.CheckConstraint(
            "revision >= 0 AND revision <= 2147483647",
            name=op.f("ck_writing_session_revision_in_range"),
        ),
        sa.CheckConstraint(
            "word_count >= 0 AND char_count >= 0",
            name=op.f("ck_writing_session_counts_not_negative"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_writing_session")),
    )
    with op.batch_alter_table("writing_session", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_writing_session_updated_at"), ["updated_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("writing_session", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_writing_session_updated_at"))

    op.drop_table("writing_session")
    with op.batch_alter_table("dead_letter", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dead_letter_task_id"))
        batch_op.drop_index(batch_op.f("ix_dead_letter_failed_at"))

    op.drop_table("dead_letter")
