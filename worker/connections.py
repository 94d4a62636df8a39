"""How pooled connections behave: PostgreSQL's are pinged after idling and end with their
client, SQLite's write in turn.

Listeners that worker/db.py's `make_engine` attaches to the engines it creates.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

# A connection back in use within this many seconds is not pinged: under load a connection
# goes out and back for every group, and a ping each time would be a round trip each time.
PING_AFTER_IDLE_SECONDS = 1.0


def ping_when_idle(engine: Engine) -> None:
    """pool_pre_ping, but only for a connection that sat idle in the pool.

    A connection the server dropped while idle is found here and replaced before a task uses
    it; one dropped mid-burst fails its task, which is retried (worker/task.py `is_transient`).
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


# PostgreSQL checks this often whether the client of a running statement is still there.
CLIENT_CHECK_MILLISECONDS = 1000


def end_with_the_client(engine: Engine) -> None:
    """Make the server end a connection's statement once its client process is gone.

    A pool child killed at its hard time limit while a statement waits for a row lock leaves
    its server process waiting, and holding the locks of every row its transaction wrote, until
    the lock it waits for is released: the next attempts of those rows would wait behind it.
    PostgreSQL 14 and later can notice the closed socket during the wait and roll back.
    """

    @event.listens_for(engine, "connect")
    def _check_client(dbapi_connection: Any, _record: Any) -> None:
        if getattr(dbapi_connection, "server_version", 0) < 140000:
            return
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET client_connection_check_interval = {CLIENT_CHECK_MILLISECONDS}")
        cursor.close()
        dbapi_connection.commit()


def make_sqlite_directory(url: str) -> None:
    """Create the directory of an SQLite database file (./var/ in the embedded setup)."""
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def serialise_sqlite_writers(engine: Engine) -> None:
    """WAL, waiting writers, and the write lock taken at BEGIN, for several worker processes."""

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
