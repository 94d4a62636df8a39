"""The write logic: upsert by revision, tombstones, dead letters. Helpers flush, never commit.

Every decision is one `INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE stored.revision <
incoming.revision` statement, so two workers racing on one id can neither both win nor deadlock.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.errors import InvalidPayloadError
from worker.models import DeadLetter
from worker.schemas import MAX_CONTENT_LENGTH, MAX_REVISION, WritingSessionIn, storable_text
from worker.times import utcnow
from worker.upsert import Row, Tombstone, stored_revisions, upsert_for

CREATED, UPDATED, DUPLICATE, STALE, DELETED = "created", "updated", "duplicate", "stale", "deleted"

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
        """The task result of docs/contract.md: plain JSON data."""
        return {"id": str(self.id), "outcome": self.outcome, "revision": self.revision}


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
    winners = _winners(items, range(len(items)))
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
    """Write the rows of many save and delete messages at once, each ending as it would have
    one message after another, in the order given; one result per row, in order.

    The rows of an id are taken in rounds: each round writes, for every id still pending, its
    next row that is newer than the last one written or found stored (one upsert for all the
    ids, in id order); the rows before that are `duplicate` or `stale` against that one. A
    group that holds each id once, as most do, is one round. Writing each newer row in its turn
    (rather than only the newest) keeps what one-by-one writes would: a row without started_at
    takes the one its predecessor stored. A row the database refuses (its CHECK constraints)
    gets an InvalidPayloadError naming the field and changes nothing, as alone.
    """
    now = now or utcnow()
    results: list[Outcome | InvalidPayloadError | None] = [None] * len(rows)
    pending: dict[int, deque[int]] = {}
    for index, row in enumerate(rows):
        pending.setdefault(row.id.int, deque()).append(index)
    # The revision stored for an id as far as this group knows (after its last write or find).
    known: dict[int, int] = {}
    keys = sorted(pending)  # the integer order is PostgreSQL's uuid order
    while keys:
        batch: list[int] = []
        more: list[int] = []  # the ids with rows left after this round, still in order
        for key in keys:
            waiting = pending[key]
            while waiting and key in known and rows[waiting[0]].revision <= known[key]:
                index = waiting.popleft()
                decision = DUPLICATE if rows[index].revision == known[key] else STALE
                results[index] = Outcome(rows[index].id, decision, known[key])
            if waiting:
                batch.append(waiting.popleft())
            if waiting:
                more.append(key)
        keys = more
        if not batch:
            break
        refused: list[tuple[int, str]] = []
        written = _upsert_in_id_order(db, rows, batch, now, refused)
        for index, error in refused:
            results[index] = InvalidPayloadError(error)
        for index, outcome in written.items():
            known[rows[index].id.int] = outcome.revision
            deleted = isinstance(rows[index], Tombstone) and outcome.outcome in (CREATED, UPDATED)
            results[index] = Outcome(outcome.id, DELETED, outcome.revision) if deleted else outcome
    return [result for result in results if result is not None]


def _winners(rows: Sequence[Row], indexes: Iterable[int]) -> dict[int, int]:
    """The index of the highest revision of each id (the first of equal ones), by the id.

    Keyed by the id's integer: UUID's own hash and comparisons run in Python, and the integer
    order is PostgreSQL's uuid order (sorting the keys gives the rows in id order).
    """
    winners: dict[int, int] = {}
    for index in indexes:
        key = rows[index].id.int
        best = winners.get(key)
        if best is None or rows[index].revision > rows[best].revision:
            winners[key] = index
    return winners


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


def _upsert(db: Session, rows: list[Row], now: datetime, keep_started_at: bool) -> list[Outcome]:
    """One upsert for rows of distinct ids; each one's outcome, in order."""
    try:
        written = upsert_for(db)(db, rows, now, keep_started_at)
    except IntegrityError as exc:
        raise _invalid_payload(exc) from exc
    unwritten = [row.id for row in rows if row.id not in written]
    stored = stored_revisions(db, unwritten) if unwritten else {}
    outcomes = []
    for row in rows:
        if row.id in written:
            inserted, revision = written[row.id]
            outcome = CREATED if inserted else UPDATED
        else:
            revision = stored[row.id]
            outcome = DUPLICATE if revision == row.revision else STALE
        outcomes.append(Outcome(row.id, outcome, revision))
    return outcomes


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
    task_name: str | None,
    task_id: str | None,
    payload: dict[str, Any],
    error_type: str,
    error: str,
    attempts: int,
    now: datetime | None = None,
) -> DeadLetter:
    """Record a message that could not be persisted, exactly as received (`payload`: its
    arguments as {"args", "kwargs"}, or what was received of a malformed message)."""
    letter = DeadLetter(
        task_name=storable_text(task_name or "")[:200],
        task_id=storable_text(task_id)[:200] if task_id is not None else None,
        # ensure_ascii keeps NUL characters and lone surrogates as escapes, byte for byte.
        payload=json.dumps(payload, ensure_ascii=True),
        error_type=storable_text(error_type)[:200],
        error=storable_text(error),
        attempts=attempts,
        failed_at=now or utcnow(),
    )
    db.add(letter)
    db.flush()
    return letter
