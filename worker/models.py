"""The ORM models: `WritingSession` and `DeadLetter`, on a naming-convention MetaData."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Integer,
    MetaData,
    String,
    Text,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker.schemas import (
    MAX_AUTHOR_ID_LENGTH,
    MAX_CONTENT_LENGTH,
    MAX_REVISION,
    MAX_TOPIC_LENGTH,
)

# Predictable constraint names, so migrations can refer to them and errors can be mapped back
# to the field they protect (see alembic's naming documentation).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite has no BIGINT autoincrement: an INTEGER PRIMARY KEY is its rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Timestamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class WritingSession(Base):
    """One writing session, keyed by the producer's id; a tombstone once deleted."""

    __tablename__ = "writing_session"
    __table_args__ = (
        CheckConstraint(
            "(deleted_at IS NULL AND topic IS NOT NULL)"
            " OR (deleted_at IS NOT NULL AND topic IS NULL)",
            name="topic_null_only_on_tombstone",
        ),
        CheckConstraint(f"revision >= 0 AND revision <= {MAX_REVISION}", name="revision_in_range"),
        CheckConstraint(
            "ended_at IS NULL OR ended_at >= started_at", name="ended_not_before_started"
        ),
        CheckConstraint(f"length(content) <= {MAX_CONTENT_LENGTH}", name="content_length"),
        CheckConstraint("word_count >= 0 AND char_count >= 0", name="counts_not_negative"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    topic: Mapped[str | None] = mapped_column(String(MAX_TOPIC_LENGTH))
    content: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    author_id: Mapped[str | None] = mapped_column(String(MAX_AUTHOR_ID_LENGTH))
    word_count: Mapped[int] = mapped_column(Integer)
    char_count: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    ended_at: Mapped[datetime | None] = mapped_column(Timestamp)
    revision: Mapped[int] = mapped_column(Integer)
    deleted_at: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, index=True)


class DeadLetter(Base):
    """A message the worker could not persist, kept whole so nothing is lost."""

    __tablename__ = "dead_letter"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task_name: Mapped[str] = mapped_column(String(200))
    task_id: Mapped[str | None] = mapped_column(String(200), index=True)
    # JSON text with non-ASCII escaped: keeps NUL characters and lone surrogates byte for byte,
    # which jsonb (and PostgreSQL text) cannot hold.
    payload: Mapped[str] = mapped_column(Text)
    error_type: Mapped[str] = mapped_column(String(200))
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    failed_at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    replayed_at: Mapped[datetime | None] = mapped_column(Timestamp)
