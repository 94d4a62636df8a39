"""Logging for operators: one line per task outcome, JSON on request, passwords masked.

Context (task id, task name, writing-session id) is bound in `task_prerun` and dropped in
`task_postrun`, which also writes the outcome line with the task's duration.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from typing import Any

from celery import signals

from worker.settings import settings

logger = logging.getLogger("writing_sessions.tasks")

# scheme://user:password@host -> scheme://user:***@host, wherever a URL appears in a message.
_PASSWORD_IN_URL = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s]*:)([^@\s/]+)(@)")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "task_context", default=None
)
_started: dict[str, float] = {}


def mask_passwords(text: str) -> str:
    """Replace the password of every URL in `text` with ***."""
    if "@" not in text:
        return text  # no URL with a password; most lines, and this runs for every line
    return _PASSWORD_IN_URL.sub(r"\1***\3", text)


class MaskPasswords(logging.Filter):
    """Masks URL passwords in every record that passes a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_passwords(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the bound task context."""

    converter = time.gmtime  # type: ignore[assignment]  # typeshed narrows gmtime's signature

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        entry.update(_context.get() or {})
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = mask_passwords(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Celery's usual text format, followed by the outcome fields as key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return mask_passwords(text)


def session_id(task_name: str, args: Any) -> str | None:
    """The writing-session id a task is about, if its arguments say (None for batches)."""
    if not args:
        return None
    first = args[0]
    if task_name.endswith(".delete"):
        return str(first)
    if isinstance(first, dict) and "id" in first:
        return str(first["id"])
    return None


def _configure(logger: logging.Logger, **_: Any) -> None:
    for handler in logger.handlers:
        handler.addFilter(MaskPasswords())
        if settings.log_format == "json":
            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(
                TextFormatter(handler.formatter._fmt if handler.formatter else None)
            )


signals.after_setup_logger.connect(_configure)
signals.after_setup_task_logger.connect(_configure)


@signals.task_prerun.connect
def _bind(task_id: str, task: Any, args: Any = None, **_: Any) -> None:
    _started[task_id] = time.perf_counter()
    context = {"task_id": task_id, "task": task.name}
    ws_id = session_id(task.name, args)
    if ws_id:
        context["session_id"] = ws_id
    _context.set(context)


@signals.task_postrun.connect
def _log_outcome(
    task_id: str,
    task: Any,
    args: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    started = _started.pop(task_id, None)
    runtime = None if started is None else time.perf_counter() - started
    log_outcome(task_id, task.name, args, retval, state, runtime)
    _context.set(None)


def log_outcome(
    task_id: str,
    task_name: str,
    args: Any,
    retval: Any,
    state: str | None,
    runtime: float | None,
) -> None:
    """The one line per task run: ids, the outcome (or the state) and the duration."""
    fields: dict[str, Any] = {"task_id": task_id, "task": task_name}
    ws_id = session_id(task_name, args)
    if ws_id:
        fields["session_id"] = ws_id
    if isinstance(retval, dict) and "outcome" in retval:
        fields["outcome"] = retval["outcome"]
    elif isinstance(retval, dict):
        fields["outcome"] = ",".join(f"{k}:{v}" for k, v in retval.items() if v)
    else:
        fields["outcome"] = (state or "unknown").lower()
    if runtime is not None:
        fields["duration_ms"] = round(runtime * 1000, 2)
    logger.info("task %s", fields["outcome"], extra={"fields": fields})


# Celery's own line per task received (main process) and succeeded (child) repeats the outcome
# line above: at INFO, the level compose runs, only the outcome line is written; at DEBUG both.
_REPEATING_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


@signals.after_setup_logger.connect
def _quiet_celery_task_lines(loglevel: int | None = None, **_: Any) -> None:
    if loglevel is not None and loglevel > logging.DEBUG:
        for name in _REPEATING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
