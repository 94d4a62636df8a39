"""The write logic: upsert by revision, tombstones, dead letters. Helpers flush, never commit.

Every decision is one `INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE stored.revision <
incoming.revision` statement, so two workers racing on one id can neither both win nor deadlock.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, cast

from psycopg2.extensions import QuotedString
from pydantic import BaseModel, ConfigDict, TypeAdapter
from sqlalchemy import (
    Boolean,
    Integer,
    Table,
    Text,
    bindparam,
    column,
    func,
    literal_column,
    select,
)
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
    (outcome,) = _upsert(db, [item], now, keep_started_at=item.started_at is None)
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
    for outcome in _upsert_in_id_order(db, items, ordered, now, refused).values():
        counts[outcome.outcome] += 1
    refused.sort()
    return BatchOutcome(counts, refused)


def write_group(
    db: Session, rows: Sequence[Row], now: datetime | None = None
) -> list[Outcome | InvalidPayloadError]:
    """Write the rows of many save and delete messages at once; one result per row, in order.

    The highest revision of an id wins (the first of equal ones). Every other row of that id
    ends as it would after the winner, one by one: `duplicate` when its revision equals the
    one stored then, `stale` when lower. A row the database refuses (its CHECK constraints)
    gets an InvalidPayloadError naming the field, and the next-best row of its id is tried in
    its place.
    """
    now = now or utcnow()
    results: list[Outcome | InvalidPayloadError | None] = [None] * len(rows)
    pending = list(range(len(rows)))
    while pending:
        winners: dict[int, int] = {}
        for index in pending:
            best = winners.get(rows[index].id.int)
            if best is None or rows[index].revision > rows[best].revision:
                winners[rows[index].id.int] = index
        refused: list[tuple[int, str]] = []
        ordered = [winners[key] for key in sorted(winners)]
        written = _upsert_in_id_order(db, rows, ordered, now, refused)
        for index, error in refused:
            results[index] = InvalidPayloadError(error)
        for index, outcome in written.items():
            deleted = isinstance(rows[index], Tombstone) and outcome.outcome in (CREATED, UPDATED)
            results[index] = Outcome(outcome.id, DELETED, outcome.revision) if deleted else outcome
        next_pending = []
        for index in pending:
            winner = winners[rows[index].id.int]
            if index == winner:
                continue
            if winner not in written:
                next_pending.append(index)  # its winner was refused: the next best goes on
                continue
            stored = written[winner].revision
            decision = DUPLICATE if rows[index].revision == stored else STALE
            results[index] = Outcome(rows[index].id, decision, stored)
        pending = next_pending
    return [result for result in results if result is not None]


def _upsert_in_id_order(
    db: Session,
    rows: Sequence[Row],
    ordered: list[int],
    now: datetime,
    refused: list[tuple[int, str]],
) -> dict[int, Outcome]:
    """Upsert rows[i] for i in `ordered` (distinct ids, in id order); outcomes by index.

    Rows without a producer started_at keep the stored one on update: a statement of their own.
    A row the database refuses goes to `refused` (index, error); the others are written.
    """
    written: dict[int, Outcome] = {}
    for keep_started_at in (False, True):
        group = [i for i in ordered if (rows[i].started_at is None) == keep_started_at]
        if group:
            written.update(
                _upsert_isolating_refusals(db, rows, group, now, keep_started_at, refused)
            )
    return written


def _upsert_isolating_refusals(
    db: Session,
    rows: Sequence[Row],
    group: list[int],
    now: datetime,
    keep_started_at: bool,
    refused: list[tuple[int, str]],
) -> dict[int, Outcome]:
    try:
        with db.begin_nested():
            outcomes = _upsert(db, [rows[i] for i in group], now, keep_started_at)
            return dict(zip(group, outcomes, strict=True))
    except InvalidPayloadError:
        pass  # one or more rows broke a CHECK: find them one savepoint at a time
    written = {}
    for index in group:
        try:
            with db.begin_nested():
                (written[index],) = _upsert(db, [rows[index]], now, keep_started_at)
        except InvalidPayloadError as exc:
            refused.append((index, str(exc)))
    return written


def delete(db: Session, id: uuid.UUID, revision: int, now: datetime | None = None) -> Outcome:
    """Turn the session into a tombstone (or insert one) if the revision is newer."""
    now = now or utcnow()
    (outcome,) = _upsert(db, [Tombstone(id=id, revision=revision, deleted_at=now)], now, True)
    if outcome.outcome in (CREATED, UPDATED):
        return Outcome(outcome.id, DELETED, outcome.revision)
    return outcome


class Tombstone(BaseModel):
    """The row a delete writes: the session emptied, its id and revision kept."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    revision: int
    deleted_at: datetime
    topic: None = None
    content: str = ""
    author_id: None = None
    started_at: None = None
    ended_at: None = None
    counts: tuple[int, int] = (0, 0)


Row = WritingSessionIn | Tombstone

# The JSON of the rows of one upsert, written by pydantic in one call: field names as below, the
# (word_count, char_count) pair as "counts", timestamps in ISO 8601.
_rows_json = TypeAdapter(list[Row])
_JSON_FIELDS = {
    "id": _c.id.type,
    "topic": _c.topic.type,
    "content": _c.content.type,
    "author_id": _c.author_id.type,
    "counts": postgresql.JSON(),
    "started_at": _c.started_at.type,
    "ended_at": _c.ended_at.type,
    "revision": _c.revision.type,
    "deleted_at": _c.deleted_at.type,
}


def _upsert(db: Session, rows: list[Row], now: datetime, keep_started_at: bool) -> list[Outcome]:
    """One upsert statement for rows of distinct ids; returns each one's outcome, in order.

    now: the time of the write, in created_at and updated_at, and in started_at where a row
    has none.
    """
    try:
        if db.get_bind().dialect.name == "postgresql":
            # PostgreSQL reads the rows from one JSON parameter faster than it parses a
            # multi-row VALUES list, and pydantic writes that JSON faster than Python builds rows.
            # Its UTF-8 bytes are quoted as they are (the engine's client_encoding is UTF-8):
            # decoding them for psycopg2 to encode again cost a copy twice their size.
            rows_json = QuotedString(_rows_json.dump_json(rows))
            params = {"rows": rows_json, "now": now}
            result = db.execute(_upsert_statement("postgresql", keep_started_at), params)
            written = {id: (CREATED if inserted else UPDATED, rev) for id, rev, inserted in result}
        else:
            # SQLite serialises writers (BEGIN IMMEDIATE), so reading first is race-free there.
            before = _stored_revisions(db, [row.id for row in rows])
            stmt = _upsert_statement("sqlite", keep_started_at)
            written = {
                id: (UPDATED if id in before else CREATED, rev)
                for id, rev in db.execute(stmt, [_column_values(row, now) for row in rows])
            }
    except IntegrityError as exc:
        raise _invalid_payload(exc) from exc
    unwritten = [row.id for row in rows if row.id not in written]
    stored = _stored_revisions(db, unwritten) if unwritten else {}
    outcomes = []
    for row in rows:
        if row.id in written:
            outcome, revision = written[row.id]
        else:
            revision = stored[row.id]
            outcome = DUPLICATE if revision == row.revision else STALE
        outcomes.append(Outcome(row.id, outcome, revision))
    return outcomes


def _column_values(row: Row, now: datetime) -> dict[str, Any]:
    """A row as the parameters of the one-row upsert (SQLite)."""
    word_count, char_count = row.counts
    return {
        "id": row.id,
        "topic": row.topic,
        "content": row.content,
        "author_id": row.author_id,
        "word_count": word_count,
        "char_count": char_count,
        "started_at": row.started_at or now,
        "ended_at": row.ended_at,
        "revision": row.revision,
        "deleted_at": row.deleted_at if isinstance(row, Tombstone) else None,
        "created_at": now,
        "updated_at": now,
    }


@cache
def _upsert_statement(dialect: str, keep_started_at: bool) -> ReturningInsert[Any]:
    """The upsert, built once per process for each dialect and started_at rule.

    PostgreSQL inserts every row of the statement from one JSON array parameter
    (`json_to_recordset`); SQLite executes the one-row statement with each row's parameters
    (Core's executemany).
    keep_started_at: the rows carry no producer started_at, so an update keeps the stored one
    (the inserted value, the time of the write, only applies to new rows).
    """
    stmt: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        incoming = (
            func.json_to_recordset(bindparam("rows", type_=Text))
            .table_valued(*(column(name, type_) for name, type_ in _JSON_FIELDS.items()))
            .render_derived("incoming", with_types=True)
        )
        now = bindparam("now", type_=_c.created_at.type)
        values = {
            "id": incoming.c.id,
            "topic": incoming.c.topic,
            "content": incoming.c.content,
            "author_id": incoming.c.author_id,
            "word_count": incoming.c.counts[0].astext.cast(Integer),
            "char_count": incoming.c.counts[1].astext.cast(Integer),
            "started_at": func.coalesce(incoming.c.started_at, now),
            "ended_at": incoming.c.ended_at,
            "revision": incoming.c.revision,
            "deleted_at": incoming.c.deleted_at,
            "created_at": now,
            "updated_at": now,
        }
        stmt = postgresql.insert(_table).from_select(list(values), select(*values.values()))
    else:
        stmt = sqlite.insert(_table)
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


def _stored_revisions(db: Session, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
    """Stored revisions by id."""
    query = select(_c.id, _c.revision).where(_c.id.in_(list(ids)))
    return {row.id: row.revision for row in db.execute(query)}


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
