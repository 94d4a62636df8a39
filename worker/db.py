"""The per-process engine, the worker signals that own it, and the one session helper of a task.

docs/contract.md, rule 1: an engine (and its pool) belongs to one process. Prefork children and the
solo pool build theirs from `worker_process_init`; any other process (threads pool, CLI) builds
one lazily on first use, guarded by its pid, so a pool never crosses a fork.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy
from celery import signals
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from worker import connections
from worker.settings import settings

logger = logging.getLogger(__name__)

_engine: Engine | None = None
_sessionmaker: sessionmaker[Session] | None = None
_engine_pid: int | None = None
# Set in the worker's main process by `worker_init`, inherited by its children.
_node = socket.gethostname()
_pool_size = 1


# The threads pool runs tasks in several threads of one process: the first tasks race to
# create the engine. Without the lock two of them could each build one (and the later one
# dispose the earlier one's pool while its connections were checked out).
_engine_lock = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().update(_engine_lock=threading.Lock()))


def init_engine(node: str | None = None) -> Engine:
    """Create this process's engine (lazily connecting) unless it already has one."""
    global _engine, _sessionmaker, _engine_pid, _node
    pid = os.getpid()
    engine = _engine
    if engine is not None and _engine_pid == pid:
        return engine
    with _engine_lock:
        if _engine is not None and _engine_pid == pid:
            return _engine
        if _engine is not None:
            # Inherited across a fork: drop the parent's pool without touching its sockets.
            _engine.dispose(close=False)
        if node:
            _node = node
        engine = make_engine(settings.database_url, f"writing-sessions:{_node}:{pid}", _pool_size)
        _sessionmaker = sessionmaker(engine, expire_on_commit=False)
        _engine_pid = pid
        _engine = engine  # published last: a reader that sees it sees the rest
        return engine


def dispose_engine() -> None:
    """Close this process's pooled connections (best effort, at process shutdown)."""
    global _engine, _sessionmaker, _engine_pid
    if _engine is not None and _engine_pid == os.getpid():
        _engine.dispose()
    _engine = _sessionmaker = _engine_pid = None


def make_engine(url: str, application_name: str, pool_size: int = 1) -> Engine:
    """Build an engine for `url` that connects on first use (create_engine never blocks).

    The only place that creates an engine; worker/connections.py says how its connections
    behave on each database.
    """
    options: dict[str, Any] = {"echo": settings.sql_echo}
    if make_url(url).get_backend_name() == "sqlite":
        connections.make_sqlite_directory(url)
        engine = sqlalchemy.create_engine(
            url, connect_args={"timeout": 30}, pool_pre_ping=True, **options
        )
        connections.serialise_sqlite_writers(engine)
        return engine
    # Looked up on the module at each call: tracing (worker/tracing.py) wraps it.
    engine = sqlalchemy.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=30,
        # Servers and proxies drop idle connections; recycle before they do.
        pool_recycle=1800,
        # Any text can be sent, whatever PGCLIENTENCODING says in the worker's environment.
        client_encoding="utf8",
        connect_args={"application_name": application_name[:63], "connect_timeout": 10},
        **options,
    )
    connections.ping_when_idle(engine)
    connections.end_with_the_client(engine)
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
    # Load the database driver (psycopg2, libpq) here, before the fork: the children share its
    # pages, where each would otherwise load its own copy when it makes its engine.
    make_url(settings.database_url).get_dialect().import_dbapi()


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
