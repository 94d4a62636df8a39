"""Time in one convention: timezone-aware UTC (a naive timestamp is UTC, docs/contract.md)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The time now, timezone-aware UTC (the time of a write)."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """The same instant in UTC; a naive timestamp (SQLite gives those back) is taken as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
