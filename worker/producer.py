"""The Python producer API: validate, then enqueue; optionally confirm persistence end to end.

Needs only the broker (and, to confirm, the result backend): importing this module loads no
SQLAlchemy and touches no database.

    from worker.producer import send_writing_session
    result = send_writing_session(topic="Morning pages", content="...")
    send_writing_session(topic="...", confirm=True)   # waits; resends if no outcome comes
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeoutError
from celery.result import AsyncResult

from worker.errors import InvalidPayloadError, TransientError, one_line
from worker.schemas import MAX_BATCH, parse_delete, parse_writing_session

logger = logging.getLogger(__name__)

SAVE = "writing_sessions.save"
SAVE_MANY = "writing_sessions.save_many"
DELETE = "writing_sessions.delete"


class DeliveryError(TransientError):
    """No outcome came back after every attempt of a confirmed send."""


def send_writing_session(
    topic: str | None = None,
    content: str | None = None,
    *,
    id: uuid.UUID | str | None = None,
    revision: int | None = None,
    author_id: str | None = None,
    started_at: datetime | str | None = None,
    ended_at: datetime | str | None = None,
    confirm: bool = False,
    timeout: float = 30.0,
    attempts: int = 3,
    app: Celery | None = None,
) -> AsyncResult:
    """Validate and enqueue one writing session (writing_sessions.save).

    A missing `id` becomes a new UUID and a missing `started_at` now, so that resending the
    same object is idempotent. With `confirm=True` it waits up to `timeout` seconds for the
    outcome and resends, up to `attempts` sends in all; the returned result is then ready.
    """
    fields = {
        "id": id,
        "topic": topic,
        "content": content,
        "author_id": author_id,
        "started_at": started_at,
        "ended_at": ended_at,
        "revision": revision,
    }
    return send_writing_session_object(
        {key: value for key, value in fields.items() if value is not None},
        confirm=confirm,
        timeout=timeout,
        attempts=attempts,
        app=app,
    )


def send_writing_session_object(
    writing_session: Mapping[str, Any],
    *,
    confirm: bool = False,
    timeout: float = 30.0,
    attempts: int = 3,
    app: Celery | None = None,
) -> AsyncResult:
    """Like send_writing_session, for a whole writing-session object (e.g. read from JSON)."""
    payload = _complete(dict(writing_session))
    parse_writing_session(payload)
    return _send(SAVE, [payload], confirm, timeout, attempts, app)


def send_writing_sessions(
    writing_sessions: Iterable[Mapping[str, Any]],
    *,
    confirm: bool = False,
    timeout: float = 60.0,
    attempts: int = 3,
    app: Celery | None = None,
) -> list[AsyncResult]:
    """Validate every object, then enqueue them with save_many in chunks of at most 1,000."""
    payloads = [_complete(dict(item)) for item in writing_sessions]
    for index, payload in enumerate(payloads):
        parse_writing_session(payload, prefix=f"writing_sessions[{index}].")
    return [
        _send(SAVE_MANY, [payloads[start : start + MAX_BATCH]], confirm, timeout, attempts, app)
        for start in range(0, len(payloads), MAX_BATCH)
    ]


def delete_writing_session(
    id: uuid.UUID | str,
    revision: int,
    *,
    confirm: bool = False,
    timeout: float = 30.0,
    attempts: int = 3,
    app: Celery | None = None,
) -> AsyncResult:
    """Validate and enqueue writing_sessions.delete(id, revision)."""
    target = parse_delete(str(id), revision)
    return _send(DELETE, [str(target.id), target.revision], confirm, timeout, attempts, app)


def _complete(payload: dict[str, Any]) -> dict[str, Any]:
    payload["id"] = str(payload.get("id") or uuid.uuid4())
    payload.setdefault("started_at", datetime.now(UTC))
    for key in ("started_at", "ended_at"):
        if isinstance(payload.get(key), datetime):
            payload[key] = payload[key].isoformat()
    return payload


def _send(
    task: str,
    args: list[Any],
    confirm: bool,
    timeout: float,
    attempts: int,
    app: Celery | None,
) -> AsyncResult:
    if app is None:
        from worker.app import app as default_app

        app = default_app
    options = {"argsrepr": preview(args)}
    if not confirm:
        return app.send_task(task, args=args, **options)
    # What the result backend raises when its server goes away (kombu lists KeyError there too,
    # which here would only hide a bug).
    lost_connection = tuple(
        error for error in getattr(app.backend, "connection_errors", ()) if error is not KeyError
    ) or (OSError,)
    for attempt in range(1, max(1, attempts) + 1):
        result = app.send_task(task, args=args, **options)
        try:
            result.get(timeout=timeout, propagate=False)
        except (ResultTimeoutError, *lost_connection) as exc:
            # No outcome: the message may have been lost in flight (see README, Guarantees), or
            # the result store went away while we waited (a Redis restart). The write is
            # idempotent, so sending again is safe; a late first copy ends as "duplicate".
            logger.warning(
                "no outcome for %s[%s] within %gs (attempt %d): %s",
                task,
                result.id,
                timeout,
                attempt,
                one_line(exc),
            )
            if not isinstance(exc, ResultTimeoutError):
                time.sleep(min(0.5 * attempt, 3.0))  # give the store a moment to come back
            continue
        if result.failed():
            # The message is in dead_letter; say why, as the worker did.
            permanent = type(result.result).__name__ == "InvalidPayloadError"
            raise (InvalidPayloadError if permanent else TransientError)(str(result.result))
        return result
    raise DeliveryError(
        f"{task}: no outcome after {attempts} attempts of {timeout:g} s each: is a worker running?"
    )


def preview(args: list[Any], limit: int = 5) -> str:
    """A short, readable repr of task arguments for Flower and logs: ids, topics and revisions,
    never the content itself (a 1 MB text would flood both)."""

    def one(item: Any) -> Any:
        if not isinstance(item, Mapping):
            return item
        shown = {key: item[key] for key in ("id", "topic", "revision") if key in item}
        if "content" in item:
            shown["content"] = f"<{len(str(item['content']))} chars>"
        return shown

    parts = []
    for arg in args:
        if isinstance(arg, list):
            items = [one(item) for item in arg[:limit]]
            more = f" +{len(arg) - limit} more" if len(arg) > limit else ""
            parts.append(f"{items!r}{more}")
        else:
            parts.append(repr(one(arg)))
    return f"[{', '.join(parts)}]"
