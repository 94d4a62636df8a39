"""Reading and replaying dead letters: the messages the worker could not persist."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, Select, delete, func, select, update

from worker import store
from worker.celery_ext.malformed import MalformedMessage
from worker.db import task_db
from worker.models import DeadLetter
from worker.producer import preview
from worker.times import utcnow

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)


def keep_malformed(record: MalformedMessage) -> None:
    """The `malformed_message_handler`: a message that is not a task request becomes a dead
    letter holding everything received of it (replay cannot send it: it names no arguments)."""
    with task_db() as db:
        letter = store.add_dead_letter(
            db,
            task_name=record.task_name,
            task_id=record.task_id,
            payload={"malformed": record.as_dict()},
            error_type="MalformedMessageError",
            error=record.error,
            attempts=1,
        )
    logger.warning("dead letter %s for malformed message %s", letter.id, record.task_id)


def find(
    *,
    task_name: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    include_replayed: bool = True,
    limit: int = 50,
) -> list[DeadLetter]:
    """Dead letters, newest first, filtered by task name and failure time."""
    query = select(DeadLetter).order_by(DeadLetter.failed_at.desc(), DeadLetter.id.desc())
    if task_name:
        query = query.where(DeadLetter.task_name == task_name)
    if since:
        query = query.where(DeadLetter.failed_at >= since)
    if until:
        query = query.where(DeadLetter.failed_at < until)
    if not include_replayed:
        query = query.where(DeadLetter.replayed_at.is_(None))
    with task_db() as db:
        return list(db.scalars(query.limit(limit)))


def get(letter_id: int) -> DeadLetter | None:
    """One dead letter by id."""
    with task_db() as db:
        return db.get(DeadLetter, letter_id)


@dataclass
class ReplayedBatch:
    """What one batch of a replay did with each letter it went through."""

    #: (letter id, new task id) of each letter whose message was sent again.
    replayed: list[tuple[int, str]] = field(default_factory=list)
    #: Letters of malformed messages: nothing to send, left as they are.
    malformed: list[int] = field(default_factory=list)
    #: Ids asked for that are not pending: not found, or already replayed.
    missing: list[int] = field(default_factory=list)

    @property
    def settled(self) -> int:
        """How many letters the batch went through (a progress bar's step)."""
        return len(self.replayed) + len(self.malformed) + len(self.missing)


def count_pending() -> tuple[int, int]:
    """How many letters wait for a replay, and the highest id among them (0 when none)."""
    with task_db() as db:
        count, last_id = db.execute(
            select(func.count(), func.max(DeadLetter.id)).where(DeadLetter.replayed_at.is_(None))
        ).one()
    return int(count), int(last_id or 0)


def replay(
    letter_ids: Sequence[int] | None, *, up_to: int | None = None, batch_size: int = 500
) -> Iterator[ReplayedBatch]:
    """Re-enqueue the original arguments of dead letters not yet replayed, `batch_size` at a
    time; mark them replayed; yield what each batch did.

    `None` replays every letter pending with an id up to `up_to` (by default the highest pending
    when the replay starts): a letter written while it runs, such as one of its own replays
    failing again, waits for the next replay, so nothing loops. Letters are read by id, a batch
    at a time; one broker connection sends every message. A batch's messages are sent before its
    letters are marked, in one UPDATE outside any open transaction, so a crash in between can
    only replay them twice, which idempotent writes make harmless. A malformed message's letter
    has no arguments to send and is left as it is.
    """
    from worker.app import app

    pending = select(DeadLetter.id, DeadLetter.task_name, DeadLetter.payload).where(
        DeadLetter.replayed_at.is_(None)
    )
    with app.producer_or_acquire() as producer:
        if letter_ids is not None:
            wanted = sorted(set(letter_ids))
            for start in range(0, len(wanted), batch_size):
                chunk = wanted[start : start + batch_size]
                rows = _read(pending.where(DeadLetter.id.in_(chunk)))
                batch = _send(app, producer, rows)
                batch.missing = sorted(set(chunk) - {row.id for row in rows})
                yield batch
            return
        if up_to is None:
            up_to = count_pending()[1]
        after = 0
        while rows := _read(
            pending.where(DeadLetter.id > after, DeadLetter.id <= up_to).limit(batch_size)
        ):
            after = rows[-1].id
            yield _send(app, producer, rows)


def _read(query: Select[int, str, str]) -> Sequence[Row[int, str, str]]:
    with task_db() as db:
        return db.execute(query.order_by(DeadLetter.id)).all()


def _send(app: Celery, producer: Any, rows: Sequence[Row[int, str, str]]) -> ReplayedBatch:
    """Send the messages of `rows`, then mark replayed the letters whose message went, those
    before a send that raised included."""
    batch = ReplayedBatch()
    try:
        for letter_id, task_name, payload in rows:
            message = json.loads(payload)
            if "args" not in message:
                batch.malformed.append(letter_id)  # nothing that could be sent again
                continue
            result = app.send_task(
                task_name,
                args=message["args"],
                kwargs=message["kwargs"],
                producer=producer,
                argsrepr=preview(message["args"]),  # Flower and logs: no content, as producers
            )
            batch.replayed.append((letter_id, result.id))
    finally:
        if batch.replayed:
            with task_db() as db:
                db.execute(
                    update(DeadLetter)
                    .where(
                        DeadLetter.id.in_([letter_id for letter_id, _ in batch.replayed]),
                        DeadLetter.replayed_at.is_(None),
                    )
                    .values(replayed_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
    return batch


def purge(before: datetime, *, replayed_only: bool = False) -> int:
    """Delete the dead letters that failed before `before` (only those already replayed, with
    `replayed_only`), in one statement; how many went. The retention of dead letters: run it
    from cron or a CronJob (docs/operating.md)."""
    query = delete(DeadLetter).where(DeadLetter.failed_at < before)
    if replayed_only:
        query = query.where(DeadLetter.replayed_at.is_not(None))
    with task_db() as db:
        return int(db.execute(query).rowcount)  # type: ignore[attr-defined]  # CursorResult
