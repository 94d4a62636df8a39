"""Transient faults are retried with backoff; exhausted retries end in dead_letter, replayable."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.conftest import count_rows, new_session, run_cli, send_save, wait_for
from tests.proxy import TcpProxy


@pytest.fixture
def proxy(database_url: str) -> Iterator[TcpProxy]:
    url = make_url(database_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    yield proxy
    proxy.close()


def refuse_writes(engine: sa.Engine, table: str) -> None:
    """Make the real database answer every write to `table` with a serialization failure
    (SQLSTATE 40001): a transient fault."""
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "CREATE OR REPLACE FUNCTION ws_test_refuse() RETURNS trigger LANGUAGE plpgsql "
                "AS $$ BEGIN RAISE EXCEPTION 'could not serialize access (test)' "
                "USING ERRCODE = '40001'; END $$"
            )
        )
        connection.execute(
            sa.text(
                f"CREATE TRIGGER ws_test_refuse BEFORE INSERT OR UPDATE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION ws_test_refuse()"
            )
        )


def allow_writes(engine: sa.Engine, *tables: str) -> None:
    with engine.begin() as connection:
        for table in tables or ("writing_session", "dead_letter"):
            connection.execute(sa.text(f"DROP TRIGGER IF EXISTS ws_test_refuse ON {table}"))
        if not tables:
            connection.execute(sa.text("DROP FUNCTION IF EXISTS ws_test_refuse()"))


@pytest.fixture
def refusing_writes(db: sa.Engine) -> Iterator[sa.Engine]:
    """writing_session refuses every write; dead_letter stays writable."""
    refuse_writes(db, "writing_session")
    try:
        yield db
    finally:
        allow_writes(db)


def test_database_outage_mid_run_loses_nothing_and_dead_letters_nothing(
    db, producer, start_worker, proxy, database_url
):
    through_proxy = make_url(database_url).set(host="127.0.0.1", port=proxy.port)
    worker = start_worker(
        extra_env={
            "DATABASE_URL": through_proxy.render_as_string(hide_password=False),
            "WRITING_SESSIONS_MAX_RETRIES": "30",
            "WRITING_SESSIONS_RETRY_BACKOFF_MAX": "1",
        }
    )
    payloads = [new_session() for _ in range(300)]

    for payload in payloads[:100]:
        send_save(producer, payload)
    wait_for(lambda: count_rows(db) >= 50, 60, "the first rows")
    proxy.cut()
    for payload in payloads[100:]:
        send_save(producer, payload)
    # The outage lasts until the worker has retried several times without a database.
    wait_for(lambda: worker.log().count("transient fault, retry") >= 5, 60, "retries")
    proxy.restore()

    wait_for(lambda: count_rows(db) == 300, 120, "all 300 rows after the outage")
    assert count_rows(db, "dead_letter") == 0
    assert worker.alive()


def test_exhausted_retries_end_in_dead_letter_and_replay_persists_them(
    db, env, producer, start_worker, refusing_writes, tmp_path
):
    start_worker(
        extra_env={
            "WRITING_SESSIONS_MAX_RETRIES": "2",
            "WRITING_SESSIONS_RETRY_BACKOFF_MAX": "1",
        }
    )
    payloads = [new_session() for _ in range(5)]

    results = [send_save(producer, payload) for payload in payloads]
    for result in results:
        result.get(timeout=60, propagate=False)

    assert all(result.state == "FAILURE" for result in results)
    with db.connect() as connection:
        letters = connection.execute(
            sa.text("SELECT error_type, error, attempts FROM dead_letter")
        ).all()
    assert len(letters) == 5
    assert {(letter.error_type, letter.attempts) for letter in letters} == {("TransientError", 3)}
    assert all("could not serialize access" in letter.error for letter in letters)
    assert count_rows(db) == 0

    allow_writes(db, "writing_session")
    replay = run_cli("dead-letters", "replay", "--all", env=env, cwd=tmp_path)

    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.startswith("replayed 5, skipped 0")
    wait_for(lambda: count_rows(db) == 5, 60, "the replayed rows")
    assert count_rows(db, "dead_letter") == 5


def test_only_a_connection_idle_in_the_pool_is_pinged_and_a_dead_one_is_replaced(
    engine, database_url, monkeypatch
):
    from worker import connections
    from worker import db as worker_db
    from worker.settings import normalize_database_url

    pool_engine = worker_db.make_engine(
        normalize_database_url(database_url), "writing-sessions:test-idle-ping"
    )
    pings: list[int] = []
    ping = pool_engine.dialect.do_ping

    def counted_ping(dbapi_connection):
        pings.append(1)
        return ping(dbapi_connection)

    monkeypatch.setattr(pool_engine.dialect, "do_ping", counted_ping)
    backend_pid = sa.text("SELECT pg_backend_pid()")
    try:
        with pool_engine.connect() as connection:
            first = connection.execute(backend_pid).scalar()
        with pool_engine.connect() as connection:
            # Back in use at once, as under load: no ping, the same connection.
            assert connection.execute(backend_pid).scalar() == first
        assert pings == []
        with engine.connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        wait_for(lambda: not _backend_alive(engine, first), timeout=10, what="backend terminated")
        # Now every checkout counts as idle: the dead connection is found and replaced.
        monkeypatch.setattr(connections, "PING_AFTER_IDLE_SECONDS", 0.0)
        with pool_engine.connect() as connection:
            assert connection.execute(backend_pid).scalar() != first
        assert pings == [1]  # the dead one failed its ping; a new connection needs none
    finally:
        pool_engine.dispose()


def _backend_alive(engine, pid):
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        ).scalar()


def test_a_dead_letter_that_cannot_be_written_keeps_its_message_retrying_at_the_cap(
    db, producer, start_worker, refusing_writes
):
    refuse_writes(db, "dead_letter")
    worker = start_worker(
        extra_env={"WRITING_SESSIONS_MAX_RETRIES": "0", "WRITING_SESSIONS_RETRY_BACKOFF_MAX": "1"}
    )

    result = send_save(producer, new_session())
    # Out of retries at once, and the dead letter is refused too: retried at the 1 s cap.
    wait_for(lambda: worker.log().count("(the dead letter too)") >= 3, 60, "three retries")
    allow_writes(db, "dead_letter")
    result.get(timeout=60, propagate=False)

    assert result.state == "FAILURE"
    with db.connect() as connection:
        (letter,) = connection.execute(sa.text("SELECT error_type, attempts FROM dead_letter"))
    assert letter.error_type == "TransientError" and letter.attempts >= 4
    assert count_rows(db) == 0
    assert worker.log().count("in 1s: ") >= 3
