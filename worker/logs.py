"""Logging for operators: one line per task outcome, JSON on request, passwords masked.

Context (task id, task name, writing-session id) is bound in `task_prerun` and dropped in
`task_postrun`, which also writes the outcome line with the task's duration.

With LOG_FORMAT=json every line the worker's processes write is one JSON object. Celery's log
handlers get the JSON formatter (`after_setup_logger`), but Celery also writes around them:
its start-up banner is printed to stdout, its SecurityWarning (running as root) comes before
logging is set up, and the shutdown notices of its signal handlers are written to the file
descriptor directly (`safe_say`). So, from `celeryd_init` (the first thing a worker does, before
that warning): a JSON handler on the root logger until Celery's own replaces it, warnings
captured, stdout and stderr written as log records, uncaught exceptions (any thread) and
unraisable ones logged, and `safe_say` writing one JSON object. At `celeryd_after_setup`, just
before Celery prints the banner, its facts are logged as one record instead (docs/internals.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import platform
import re
import sys
import threading
import time
from types import TracebackType
from typing import Any

from celery import signals
from celery.utils.log import LoggingProxy

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
        if not any(isinstance(f, MaskPasswords) for f in handler.filters):
            handler.addFilter(MaskPasswords())
        if settings.log_format == "json":
            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(
                TextFormatter(handler.formatter._fmt if handler.formatter else None)
            )


signals.after_setup_task_logger.connect(_configure)


@signals.after_setup_logger.connect
def _configure_root(logger: logging.Logger, **_: Any) -> None:
    if settings.log_format == "json":
        _drop_the_early_handler(logger)
        # billiard's logger ("Process 'ForkPoolWorker-1' pid:… exited with 'signal 9 (SIGKILL)'")
        # does not propagate: Celery gives it a text handler of its own.
        from celery.utils.log import get_multiprocessing_logger

        multiprocessing_logger = get_multiprocessing_logger()
        if multiprocessing_logger is not None:
            _configure(multiprocessing_logger)
    _configure(logger)


# JSON from a worker's first line (LOG_FORMAT=json): before Celery sets up logging, and around it.

_uncaught = logging.getLogger("writing_sessions.uncaught")


class _EarlyHandler(logging.StreamHandler):
    """The root logger's JSON handler until Celery sets up its own."""


class _StreamToLog(LoggingProxy):
    """sys.stdout or sys.stderr as Celery's redirection makes them (each write is a record),
    keeping the stream's isatty: Celery decides by it whether SIGHUP restarts the worker."""

    def __init__(self, stream: Any) -> None:
        super().__init__(logging.getLogger("celery.redirected"), logging.WARNING)
        self._tty = bool(getattr(stream, "isatty", lambda: False)())

    def isatty(self) -> bool:
        return self._tty


@signals.celeryd_init.connect
def _json_from_the_start(**_: Any) -> None:
    if settings.log_format != "json":
        return
    root = logging.getLogger()
    if not root.handlers:
        handler = _EarlyHandler(sys.__stderr__)
        handler.addFilter(MaskPasswords())
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        # Celery's Logging.setup_handlers still adds its handler (honouring --logfile) to a
        # logger it finds so marked, even with worker_hijack_root_logger off.
        root._rudimentary_setup = True  # type: ignore[attr-defined]
    logging.captureWarnings(True)
    # Until Celery redirects them itself (on_start, worker_redirect_stdouts), and if it does not:
    # a print, or the message of a SystemExit, is a record.
    sys.stdout = _StreamToLog(sys.stdout)
    sys.stderr = _StreamToLog(sys.stderr)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable
    import celery.apps.worker

    celery.apps.worker.safe_say = _say


def _drop_the_early_handler(root: logging.Logger) -> None:
    for handler in root.handlers[:]:
        if isinstance(handler, _EarlyHandler):
            root.removeHandler(handler)
    with contextlib.suppress(AttributeError):
        del root._rudimentary_setup  # type: ignore[attr-defined]


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    _uncaught.critical("uncaught %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # ends the thread quietly, as Python's own hook lets it
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    name = args.thread.name if args.thread is not None else "?"
    _uncaught.error(
        "uncaught %s in thread %s: %s",
        args.exc_type.__name__,
        name,
        args.exc_value,
        exc_info=exc_info,  # type: ignore[arg-type]  # exc_value is set for an exception
    )


def _log_unraisable(unraisable: Any) -> None:
    try:
        _uncaught.warning(
            "%s: %r",
            unraisable.err_msg or "Exception ignored in",
            unraisable.object,
            exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
        )
    except Exception:  # the interpreter may be shutting down
        sys.__unraisablehook__(unraisable)


_say_formatter = JsonFormatter()


def _say(msg: Any, f: Any = sys.__stderr__) -> None:
    """celery.apps.worker.safe_say, writing one JSON object: the same single unbuffered write
    to the same file descriptor, which a signal handler can do (Celery calls it from its
    shutdown, SIGUSR1 and SIGHUP handlers)."""
    from celery import _original_os_write

    record = logging.LogRecord(
        "celery.apps.worker", logging.WARNING, __file__, 0, mask_passwords(str(msg)), None, None
    )
    line = _say_formatter.format(record) + "\n"
    if hasattr(f, "fileno") and f.fileno() is not None:
        with contextlib.suppress(OSError):
            _original_os_write(f.fileno(), line.encode())


@signals.celeryd_after_setup.connect
def _banner_as_a_record(instance: Any, **_: Any) -> None:
    # Worker.on_start sends celeryd_after_setup, then prints the banner unless `quiet`.
    if settings.log_format != "json" or instance.quiet:
        return
    instance.quiet = True
    fields = banner(instance)
    logging.getLogger("celery.apps.worker").info(
        "%s v%s starting", fields["hostname"], fields["version"], extra={"fields": fields}
    )


def banner(worker: Any) -> dict[str, Any]:
    """The facts of Celery's start-up banner (Worker.startup_info and extra_info), masked."""
    from celery import VERSION_BANNER

    app = worker.app
    concurrency = str(worker.concurrency)
    if worker.autoscale:
        most, least = worker.autoscale
        concurrency = f"{{min={least}, max={most}}}"
    pool = worker.pool_cls if isinstance(worker.pool_cls, str) else worker.pool_cls.__module__
    fields: dict[str, Any] = {
        "hostname": worker.hostname,
        "version": VERSION_BANNER,
        "platform": platform.platform(),
        "app": app.main or "__main__",
        "transport": mask_passwords(app.connection().as_uri()),
        "results": mask_passwords(app.backend.as_uri()),
        "concurrency": f"{concurrency} ({pool.split('.')[-1]})",
        "task_events": bool(worker.task_events),
        "queues": {
            name: f"exchange={queue.exchange.name}({queue.exchange.type}) key={queue.routing_key}"
            for name, queue in sorted(app.amqp.queues.consume_from.items())
        },
    }
    if worker.loglevel is not None and worker.loglevel <= logging.INFO:
        builtins = worker.loglevel <= logging.DEBUG
        fields["tasks"] = sorted(t for t in app.tasks if builtins or not t.startswith("celery."))
    return fields


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


def message_outcome(retval: Any, state: str | None) -> str:
    """A message's outcome as the logs, the metrics and the traces name it: its result's
    "outcome" (created, updated, duplicate, stale, deleted), else its state lowercased (failure,
    retry; success for save_many, whose result counts its sessions per outcome)."""
    if isinstance(retval, dict) and "outcome" in retval:
        return str(retval["outcome"])
    return (state or "unknown").lower()


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
    if isinstance(retval, dict) and "outcome" not in retval:  # save_many: counts per outcome
        fields["outcome"] = ",".join(f"{k}:{v}" for k, v in retval.items() if v)
    else:
        fields["outcome"] = message_outcome(retval, state)
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
