"""Reading and replaying dead letters: the messages the worker could not persist."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select, update

from worker import store
from worker.celery_ext.malformed import MalformedMessage
from worker.db import task_db
from worker.models import DeadLetter
from worker.times import utcnow

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


def replay(letter_ids: Sequence[int] | None) -> list[tuple[int, str]]:
    """Re-enqueue the original arguments of dead letters not yet replayed; mark them replayed.

    `None` replays every letter not yet replayed. The message is sent before the letter is
    marked (and outside any transaction), so a crash in between can only replay it twice, which
    idempotent writes make harmless. A replay that fails again is a new dead letter: nothing
    loops. A malformed message's letter has no arguments to send and is left as it is.
    Returns (letter id, new task id) pairs.
    """
    from worker.app import app

    query = select(DeadLetter).where(DeadLetter.replayed_at.is_(None)).order_by(DeadLetter.id)
    if letter_ids is not None:
        query = query.where(DeadLetter.id.in_(list(letter_ids)))
    with task_db() as db:
        letters = [(letter.id, letter.task_name, letter.payload) for letter in db.scalars(query)]
    replayed = []
    for letter_id, task_name, payload in letters:
        message = json.loads(payload)
        if "args" not in message:
            continue  # a malformed message: nothing that could be sent again
        result = app.send_task(task_name, args=message["args"], kwargs=message["kwargs"])
        with task_db() as db:
            db.execute(
                update(DeadLetter)
                .where(DeadLetter.id == letter_id, DeadLetter.replayed_at.is_(None))
                .values(replayed_at=utcnow())
            )
        replayed.append((letter_id, result.id))
    return replayed


def purge(before: datetime, *, replayed_only: bool = False) -> int:
    """Delete the dead letters that failed before `before` (only those already replayed, with
    `replayed_only`), in one statement; how many went. The retention of dead letters: run it
    from cron or a CronJob (docs/operating.md)."""
    query = delete(DeadLetter).where(DeadLetter.failed_at < before)
    if replayed_only:
        query = query.where(DeadLetter.replayed_at.is_not(None))
    with task_db() as db:
        return int(db.execute(query).rowcount)  # type: ignore[attr-defined]  # CursorResult
