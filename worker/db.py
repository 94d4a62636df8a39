"""The per-process engine, the worker signals that own it, and the one session helper of a task.

Rule 1 of SPEC.md: an engine (and its pool) belongs to one process. Prefork children and the
solo pool build theirs from `worker_process_init`; any other process (threads pool, CLI) builds
one lazily on first use, guarded by its pid, so a pool never crosses a fork.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import signals
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from worker.errors import TransientError
from worker.settings import settings

logger = logging.getLogger(__name__)

_engine: Engine | None = None
_sessionmaker: sessionmaker[Session] | None = None
_engine_pid: int | None = None
# Set in the worker's main process by `worker_init`, inherited by its children.
_node = socket.gethostname()
_pool_size = 1


def init_engine(node: str | None = None) -> Engine:
    """Create this process's engine (lazily connecting) unless it already has one."""
    global _engine, _sessionmaker, _engine_pid, _node
    pid = os.getpid()
    if _engine is not None and _engine_pid == pid:
        return _engine
    if _engine is not None:
        # Inherited across a fork: drop the parent's pool without touching its sockets.
        _engine.dispose(close=False)
    if node:
        _node = node
    _engine = make_engine(settings.database_url, f"writing-sessions:{_node}:{pid}", _pool_size)
    _sessionmaker = sessionmaker(_engine, expire_on_commit=False)
    _engine_pid = pid
    return _engine


def dispose_engine() -> None:
    """Close this process's pooled connections (best effort, at process shutdown)."""
    global _engine, _sessionmaker, _engine_pid
    if _engine is not None and _engine_pid == os.getpid():
        _engine.dispose()
    _engine = _sessionmaker = _engine_pid = None


def make_engine(url: str, application_name: str, pool_size: int = 1) -> Engine:
    """Build an engine for `url` that connects on first use (create_engine never blocks)."""
    sa_url = make_url(url)
    options: dict[str, Any] = {"echo": settings.sql_echo}
    if sa_url.get_backend_name() == "sqlite":
        return _make_sqlite_engine(url, {**options, "pool_pre_ping": True})
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=30,
        # Servers and proxies drop idle connections; recycle before they do.
        pool_recycle=1800,
        # The store sends the rows of an upsert as UTF-8 bytes (worker/store.py).
        client_encoding="utf8",
        connect_args={"application_name": application_name[:63], "connect_timeout": 10},
        **options,
    )
    _ping_when_idle(engine)
    return engine


# A connection back in use within this many seconds is not pinged: under load a worker's
# connection goes out and back for every task, and a ping per task cost a round trip each.
PING_AFTER_IDLE_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """pool_pre_ping, but only for a connection that sat idle in the pool.

    A connection the server dropped while idle is found here and replaced before a task uses
    it; one dropped mid-burst fails its task, which is retried (`is_transient`).
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in = record.info.get("checked_in")  # None: a new connection, just made
        if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out a fresh one.
            raise sa_exc.DisconnectionError("connection lost while idle in the pool") from exc


def _make_sqlite_engine(url: str, options: dict[str, Any]) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30}, **options)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets readers and one writer work at once across worker processes; writers wait
        # for each other instead of failing; pysqlite's own BEGIN handling is switched off so
        # that the "begin" hook below decides.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        # Take the write lock at BEGIN: SQLite serialises writers, and a deferred transaction
        # that reads and then writes can fail mid-way instead of waiting its turn.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def task_db() -> Iterator[Session]:
    """Yield the one Session of a task: commit on success, roll back on error, always close."""
    init_engine()
    assert _sessionmaker is not None
    with _sessionmaker.begin() as db:
        yield db


def checked_out_connections() -> int:
    """How many connections this process's pool has lent out right now."""
    if _engine is None or _engine_pid != os.getpid():
        return 0
    return _engine.pool.checkedout()  # type: ignore[attr-defined]  # QueuePool, ours


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Runs in the main process before any fork: remember the node name and the pool size,
    # but open nothing that a child could inherit.
    global _node, _pool_size
    _node = getattr(sender, "hostname", None) or _node
    pool = getattr(sender, "pool_cls", "")
    pool_name = f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', pool)}".lower()
    threaded = any(kind in pool_name for kind in ("thread", "gevent", "eventlet"))
    _pool_size = int(getattr(sender, "concurrency", 1) or 1) if threaded else 1


@signals.worker_process_init.connect
def _on_worker_process_init(sender: Any = None, **_: Any) -> None:
    # Must not block (Celery kills a child whose init takes over 4 s): create_engine is lazy.
    init_engine(node=sender if isinstance(sender, str) else None)


@signals.worker_process_shutdown.connect
def _on_worker_process_shutdown(**_: Any) -> None:
    dispose_engine()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    # Threads and solo pools run tasks in the main process: close its pool too.
    dispose_engine()


@signals.task_postrun.connect
def _on_task_postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    check_for_leak(f"task {getattr(task, 'name', '?')}[{task_id}]")


def check_for_leak(after: str) -> None:
    """Log a `connection leak` if a connection is still checked out after a unit of work."""
    leaked = checked_out_connections()
    if leaked and _pool_size == 1:
        logger.error("connection leak: %d connection(s) still checked out after %s", leaked, after)


# SQLSTATEs worth retrying: serialization failure, deadlock, too many connections, and the
# server shutting down or starting up; class 08 is any connection exception.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "53300", "57P01", "57P02", "57P03"}


def is_transient(exc: BaseException) -> bool:
    """Whether a database error may pass if the task runs again later."""
    if isinstance(exc, TransientError | sa_exc.TimeoutError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError):
            return True
        code = getattr(exc.orig, "pgcode", None) or ""
        return code in _TRANSIENT_SQLSTATES or code.startswith("08")
    return False
