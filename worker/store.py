"""The write logic: upsert by revision, tombstones, dead letters. Helpers flush, never commit.

Every decision is one `INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE stored.revision <
incoming.revision` statement, so two workers racing on one id can neither both win nor deadlock.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from operator import itemgetter
from typing import Any, cast

from sqlalchemy import Boolean, Table, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from worker.errors import InvalidPayloadError
from worker.models import DeadLetter, WritingSession
from worker.schemas import MAX_CONTENT_LENGTH, MAX_REVISION, WritingSessionIn

CREATED, UPDATED, DUPLICATE, STALE, DELETED = "created", "updated", "duplicate", "stale", "deleted"

# The Core table: writes go through one upsert statement, not the ORM's unit of work.
_table = cast(Table, WritingSession.__table__)
_c = _table.c

# Constraint names (from the naming convention) mapped back to the field they protect.
_CONSTRAINT_ERRORS = {
    "ck_writing_session_ended_not_before_started": (
        "ended_at: must not be before started_at (the stored started_at, when none is sent)"
    ),
    "ck_writing_session_revision_in_range": f"revision: must be between 0 and {MAX_REVISION}",
    "ck_writing_session_content_length": (
        f"content: must be at most {MAX_CONTENT_LENGTH} characters"
    ),
}


@dataclass(frozen=True)
class Outcome:
    """What one write decided for one id."""

    id: uuid.UUID
    outcome: str
    revision: int

    def as_dict(self) -> dict[str, Any]:
        """The task result of SPEC.md: plain JSON data."""
        return {"id": str(self.id), "outcome": self.outcome, "revision": self.revision}


def utcnow() -> datetime:
    """The time of a write, timezone-aware UTC."""
    return datetime.now(UTC)


def save(db: Session, item: WritingSessionIn, now: datetime | None = None) -> Outcome:
    """Insert or overwrite one writing session if its revision is newer than the stored one."""
    now = now or utcnow()
    (outcome,) = _upsert(db, [_row(item, now)], keep_started_at=item.started_at is None)
    return outcome


@dataclass(frozen=True)
class BatchOutcome:
    """What a save_many decided: counts per outcome, and the items the database refused."""

    counts: dict[str, int]
    refused: list[tuple[int, str]]


def save_many(
    db: Session, items: Sequence[WritingSessionIn], now: datetime | None = None
) -> BatchOutcome:
    """Write a batch with the revision rule, in as few statements as the database allows.

    The highest revision of each id wins inside the batch (superseded copies count as stale,
    equal copies as duplicate). Rows go in id order, so concurrent batches lock in the same order
    and cannot deadlock. An item the database refuses (its CHECK constraints) is set aside and
    reported, without losing the others.
    """
    now = now or utcnow()
    counts = dict.fromkeys((CREATED, UPDATED, DUPLICATE, STALE), 0)
    # Keyed and ordered by the id's integer: UUID's own hash and comparisons run in Python,
    # and the integer order is PostgreSQL's uuid order.
    winners: dict[int, int] = {}
    for index, item in enumerate(items):
        best = winners.get(item.id.int)
        if best is None or item.revision > items[best].revision:
            winners[item.id.int] = index
    for index, item in enumerate(items):
        winner = winners[item.id.int]
        if index != winner:
            counts[DUPLICATE if item.revision == items[winner].revision else STALE] += 1
    ordered = [winners[key] for key in sorted(winners)]
    refused: list[tuple[int, str]] = []
    # Rows without a producer started_at keep the stored one on update: a statement of their own.
    for keep_started_at in (False, True):
        group = [i for i in ordered if (items[i].started_at is None) == keep_started_at]
        if not group:
            continue
        for outcome in _upsert_isolating_refusals(db, items, group, now, keep_started_at, refused):
            counts[outcome.outcome] += 1
    refused.sort()
    return BatchOutcome(counts, refused)


def _upsert_isolating_refusals(
    db: Session,
    items: Sequence[WritingSessionIn],
    group: list[int],
    now: datetime,
    keep_started_at: bool,
    refused: list[tuple[int, str]],
) -> list[Outcome]:
    try:
        with db.begin_nested():
            return _upsert(db, [_row(items[i], now) for i in group], keep_started_at)
    except InvalidPayloadError:
        pass  # one or more rows broke a CHECK: find them one savepoint at a time
    outcomes = []
    for index in group:
        try:
            with db.begin_nested():
                outcomes += _upsert(db, [_row(items[index], now)], keep_started_at)
        except InvalidPayloadError as exc:
            refused.append((index, str(exc)))
    return outcomes


def delete(db: Session, id: uuid.UUID, revision: int, now: datetime | None = None) -> Outcome:
    """Turn the session into a tombstone (or insert one) if the revision is newer."""
    now = now or utcnow()
    row = {
        "id": id,
        "topic": None,
        "content": "",
        "author_id": None,
        "word_count": 0,
        "char_count": 0,
        "started_at": now,
        "ended_at": None,
        "revision": revision,
        "deleted_at": now,
        "created_at": now,
        "updated_at": now,
    }
    (outcome,) = _upsert(db, [row], keep_started_at=True)
    if outcome.outcome in (CREATED, UPDATED):
        return Outcome(outcome.id, DELETED, outcome.revision)
    return outcome


def _row(item: WritingSessionIn, now: datetime) -> dict[str, Any]:
    word_count, char_count = item.counts
    return {
        "id": item.id,
        "topic": item.topic,
        "content": item.content,
        "author_id": item.author_id,
        "word_count": word_count,
        "char_count": char_count,
        "started_at": item.started_at or now,
        "ended_at": item.ended_at,
        "revision": item.revision,
        "deleted_at": None,
        "created_at": now,
        "updated_at": now,
    }


def _upsert(db: Session, rows: Sequence[dict[str, Any]], keep_started_at: bool) -> list[Outcome]:
    """One multi-row upsert of distinct ids; returns the outcome of each, in the rows' order."""
    keys = [str(row["id"]) for row in rows]  # ids as text, as RETURNING gives them back
    try:
        if db.get_bind().dialect.name == "postgresql":
            written = _upsert_postgresql(db, rows, keys, keep_started_at)
        else:
            # SQLite serialises writers (BEGIN IMMEDIATE), so reading first is race-free there.
            before = _stored_revisions(db, [row["id"] for row in rows])
            stmt = _upsert_statement("sqlite", keep_started_at)
            written = {
                str(row.id): (UPDATED if str(row.id) in before else CREATED, row.revision)
                for row in db.execute(stmt, list(rows))
            }
    except IntegrityError as exc:
        raise _invalid_payload(exc) from exc
    unwritten = [row["id"] for row, key in zip(rows, keys, strict=True) if key not in written]
    stored = _stored_revisions(db, unwritten) if unwritten else {}
    outcomes = []
    for row, key in zip(rows, keys, strict=True):
        if key in written:
            outcome, revision = written[key]
        else:
            revision = stored[key]
            outcome = DUPLICATE if revision == row["revision"] else STALE
        outcomes.append(Outcome(row["id"], outcome, revision))
    return outcomes


def _upsert_postgresql(
    db: Session, rows: Sequence[dict[str, Any]], keys: list[str], keep_started_at: bool
) -> dict[str, tuple[str, int]]:
    """The upsert as one multi-row VALUES statement, built the way psycopg2's execute_values does.

    Core's executemany spent more time binding parameters than PostgreSQL spent writing: here
    psycopg2 quotes each row on the client (mogrify, no round trip) into one statement, and the
    Session's connection runs it, so errors, disconnects and the transaction stay SQLAlchemy's.
    """
    head, template, values_of, tail = _postgresql_upsert_sql(keep_started_at)
    connection = db.connection()
    cursor = connection.connection.cursor()
    try:
        # Every row of a write shares one timestamp: quote it once, not once per row.
        row_sql = template.replace(
            "%(now)s", cursor.mogrify("%s", (rows[0]["created_at"],)).decode()
        )
        body = b",".join(
            cursor.mogrify(row_sql, (key, *values_of(row)))
            for key, row in zip(keys, rows, strict=True)
        )
    finally:
        cursor.close()
    result = connection.exec_driver_sql(
        head + body.decode() + tail, execution_options={"no_parameters": True}
    )
    return {
        str(id): (CREATED if inserted else UPDATED, revision) for id, revision, inserted in result
    }


@cache
def _postgresql_upsert_sql(keep_started_at: bool) -> tuple[str, str, itemgetter[Any], str]:
    """The PostgreSQL upsert compiled once per process, cut for building multi-row VALUES.

    Returns (head, one row's VALUES with positional parameters and %(now)s for the write time,
    a getter of a row's parameter values after the id in that order, tail).
    """
    compiled = str(
        _upsert_statement("postgresql", keep_started_at).compile(
            dialect=postgresql.psycopg2.dialect(), column_keys=[c.name for c in _table.c]
        )
    )
    parts = re.fullmatch(r"(.* VALUES )(\(.*?\))( ON CONFLICT .*)", compiled, re.S)
    assert parts is not None, compiled
    head, values, tail = parts.groups()
    # Columns that hold the write time in every row: created_at, updated_at, and started_at
    # for rows that bring none (a new row starts now; an update keeps the stored one).
    write_time = {"created_at", "updated_at"} | ({"started_at"} if keep_started_at else set())
    names = [n for n in re.findall(r"%\((\w+)\)s", values) if n not in write_time]
    assert names[0] == "id", names
    template = re.sub(r"%\((\w+)\)s", lambda m: "%(now)s" if m[1] in write_time else "%s", values)
    return head, template, itemgetter(*names[1:]), tail


@cache
def _upsert_statement(dialect: str, keep_started_at: bool) -> ReturningInsert[Any]:
    """The upsert of one row, built once per process for each dialect and started_at rule.

    SQLite executes it with every row as parameters (Core's executemany); PostgreSQL compiles
    it once into the text `_postgresql_upsert_sql` repeats for each row.
    keep_started_at: the rows carry no producer started_at, so an update keeps the stored one
    (the inserted value, the time of the write, only applies to new rows).
    """
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(_table)
    excluded = stmt.excluded
    changes = {
        name: getattr(excluded, name)
        for name in (
            "topic",
            "content",
            "author_id",
            "word_count",
            "char_count",
            "ended_at",
            "revision",
            "deleted_at",
            "updated_at",
        )
    }
    if not keep_started_at:
        changes["started_at"] = excluded.started_at
    upsert = stmt.on_conflict_do_update(
        index_elements=[_c.id], set_=changes, where=_c.revision < excluded.revision
    )
    if dialect == "postgresql":
        # xmax is 0 on a freshly inserted row version and our transaction id on an update.
        return upsert.returning(
            _c.id, _c.revision, literal_column("xmax = 0", Boolean).label("inserted")
        )
    return upsert.returning(_c.id, _c.revision)


def _stored_revisions(db: Session, ids: Iterable[uuid.UUID]) -> dict[str, int]:
    """Stored revisions by id, keyed by the id's text (as the upserts' RETURNING rows are)."""
    query = select(_c.id, _c.revision).where(_c.id.in_(list(ids)))
    return {str(row.id): row.revision for row in db.execute(query)}


def _invalid_payload(exc: IntegrityError) -> InvalidPayloadError:
    diag = getattr(exc.orig, "diag", None)
    name = getattr(diag, "constraint_name", None) or str(exc.orig)
    for constraint, message in _CONSTRAINT_ERRORS.items():
        if constraint in name:
            return InvalidPayloadError(message)
    return InvalidPayloadError(f"the database refused the row: {type(exc.orig).__name__}")


def add_dead_letter(
    db: Session,
    *,
    task_name: str,
    task_id: str | None,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    error_type: str,
    error: str,
    attempts: int,
    now: datetime | None = None,
) -> DeadLetter:
    """Record a message that could not be persisted, with its arguments exactly as received."""
    letter = DeadLetter(
        task_name=task_name,
        task_id=task_id,
        # ensure_ascii keeps NUL characters and lone surrogates as escapes, byte for byte.
        payload=json.dumps({"args": list(args), "kwargs": kwargs}, ensure_ascii=True),
        error_type=error_type,
        error=error,
        attempts=attempts,
        failed_at=now or utcnow(),
    )
    db.add(letter)
    db.flush()
    return letter
