"""The group runner of `save` and `delete`: a group of messages written in one transaction.

worker/celery_ext/group_commit.py buffers the messages waiting in a worker and calls `run_group`
in a pool child with each group; it fires each message's signals and stores its result. Here
each message is validated on its own, the valid ones are written in one transaction by the
revision rule, each id's rows ending as one-by-one writes would leave them (`store.write_group`),
and each invalid one gets a dead letter in the same transaction. Whatever fails is settled per
message by the one decision the per-task path uses too (`worker.task.settle_failure`): a
transient fault retries each message with backoff; a fault that only the whole group meets
splits it, so only the message that causes it fails.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery import states

from worker import store, tracing
from worker.celery_ext.group_commit import Decision, Message
from worker.db import task_db
from worker.metrics import observe_group
from worker.schemas import parse_delete, parse_writing_session
from worker.task import add_dead_letter, is_transient, settle_failure
from worker.times import utcnow
from worker.upsert import Row, Tombstone

logger = logging.getLogger(__name__)


def run_group(messages: list[Message], failed: BaseException | None = None) -> list[Decision]:
    """Write a group of save and delete messages in one transaction; a decision per message.

    `failed`: the pool lost the group's job (its hard time limit): each message counts the
    attempt, as after a transient fault. Only this mode serves save_many, whose messages run
    alone (its hard time limits).
    """
    if failed is not None:
        return [_settle_failure(message, failed) for message in messages]
    observe_group(len(messages))
    now = utcnow()
    rows = [parse_row(message, now) for message in messages]
    try:
        return _write(messages, rows, now)
    except Exception as exc:
        if len(messages) == 1 or is_transient(exc):
            return [_settle_failure(message, exc) for message in messages]
        # A fault that only the whole group meets: each message alone, so only its own fails.
        logger.warning("a group of %d failed (%r): each message alone", len(messages), exc)
        return [
            _write_alone(message, row, now) for message, row in zip(messages, rows, strict=True)
        ]


def parse_row(message: Message, now: datetime) -> Row | Exception:
    """The row a message asks for, or why it cannot be written (InvalidPayloadError names the
    field; anything else is a bug that this message alone meets)."""
    from worker.app import app

    try:
        arguments = app.tasks[message.name].check_arguments(message.args, message.kwargs)
        if message.name == "writing_sessions.delete":
            target = parse_delete(arguments["id"], arguments["revision"])
            return Tombstone(id=target.id, revision=target.revision, deleted_at=now)
        return parse_writing_session(arguments["writing_session"])
    except Exception as exc:
        return exc


def _write(messages: list[Message], rows: list[Row | Exception], now: datetime) -> list[Decision]:
    """One transaction: the valid rows by the revision rule, a dead letter for each other."""
    valid = [index for index, row in enumerate(rows) if not isinstance(row, Exception)]
    decisions: list[Decision] = []
    with tracing.group_write(messages), task_db() as db:
        written = store.write_group(db, [rows[index] for index in valid], now)  # type: ignore[misc]
        results: dict[int, Any] = dict(zip(valid, written, strict=True))
        for index, row in enumerate(rows):
            result = results.get(index, row)
            if isinstance(result, Exception):
                _add_dead_letter(db, messages[index], result)
                decisions.append((states.FAILURE, result))
            else:
                decisions.append((states.SUCCESS, result.as_dict()))
    return decisions


def _write_alone(message: Message, row: Row | Exception, now: datetime) -> Decision:
    try:
        return _write([message], [row], now)[0]
    except Exception as exc:
        return _settle_failure(message, exc)


def _settle_failure(message: Message, exc: BaseException) -> Decision:
    # Under the message's own span: a retry it publishes continues its trace.
    with message.current() as task, tracing.current(message):
        return settle_failure(task, exc, message.args, message.kwargs)


def _add_dead_letter(db: Any, message: Message, error: Exception) -> None:
    with message.current() as task, tracing.current(message):
        add_dead_letter(task, db, args=message.args, kwargs=message.kwargs, error=error)
