"""Malformed messages: what the consumer cannot turn into a task request, handed to a handler.

Celery logs such a message and drops it (an unknown format, an invalid task, a body it cannot
decode), or stops the worker on it (a body that is not `[args, kwargs, embed]`). Here the
consumer (celery_ext/consumer.py) describes it as a MalformedMessage, the raw body kept byte for
byte, and a pool child runs the handler named by the `malformed_message_handler` setting (a
dotted path to `handler(record)`, which must keep the record: a dead letter, say); then the
message is acknowledged, and its task, where it has an id, ends FAILURE. If the handler fails,
the message goes back on its queue a little later, so nothing is lost while, say, the database
is away.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from celery import current_app, states
from celery.utils.imports import symbol_by_name

logger = logging.getLogger(__name__)

#: A handler that failed is tried again after this many seconds (the message is requeued).
RETRY_SECONDS = 5.0


class MalformedMessageError(Exception):
    """A message that could not be turned into a task request; says what is wrong with it."""


@dataclass(frozen=True)
class MalformedMessage:
    """Everything received of a malformed message, plain data (JSON-able, picklable)."""

    task_id: str | None
    task_name: str | None
    error: str
    #: The body as received: text, with undecodable bytes kept as surrogate escapes.
    body: str
    headers: Any
    content_type: str | None
    content_encoding: str | None

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-able data (the headers as received, or their repr)."""
        return asdict(self)


def describe(message: Any, error: str) -> MalformedMessage:
    """What was received of `message`, with `error` saying why it is not a task request."""
    headers = getattr(message, "headers", None)
    properties = getattr(message, "properties", None) or {}
    task_id = _header(headers, "id") or _text(properties.get("correlation_id"))
    body = message.body
    if isinstance(body, bytes | bytearray | memoryview):
        body = bytes(body).decode("utf-8", "surrogateescape")
    elif not isinstance(body, str):
        body = repr(body)
    return MalformedMessage(
        task_id=task_id,
        task_name=_header(headers, "task"),
        error=error,
        body=body,
        headers=_jsonable(headers),
        content_type=_text(getattr(message, "content_type", None)),
        content_encoding=_text(getattr(message, "content_encoding", None)),
    )


def _header(headers: Any, name: str) -> str | None:
    return _text(headers.get(name)) if isinstance(headers, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def run_handler(handler_path: str, record: MalformedMessage) -> bool:
    """The pool job: the handler keeps the record; then the task, if it has an id, ends
    FAILURE. Never raises (on the solo and threads pools an exception would escape the pool)."""
    try:
        symbol_by_name(handler_path)(record)
    except Exception:
        logger.exception("could not keep malformed message %s; requeued", record.task_id)
        return False
    if record.task_id:
        try:
            current_app.backend.store_result(
                record.task_id, MalformedMessageError(record.error), states.FAILURE
            )
        except Exception:
            logger.exception("could not store the FAILURE of malformed message %s", record.task_id)
    return True
