"""A group member's fate is its own: terminating, timing out or failing one message (or the
database refusing writes for a while) never settles the others of its group. Each test queues
its backlog before the worker starts, so that the messages really arrive together."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.conftest import (
    ROOT,
    count_rows,
    inspect,
    new_session,
    send_save,
    wait_for,
    worker_connections,
)
from tests.test_grouping import pool_jobs
from tests.test_malformed import letters, queue_settled

PROBES = {"PYTHONPATH": str(ROOT)}
# A hard time limit of 3 s (soft 2 s), one retry, after at most 1 s.
ONE_RETRY_AFTER_3_SECONDS = {
    "WRITING_SESSIONS_TASK_TIME_LIMIT": "3",
    "WRITING_SESSIONS_MAX_RETRIES": "1",
    "WRITING_SESSIONS_RETRY_BACKOFF_MAX": "1",
}


@contextmanager
def row_locked(engine: sa.Engine, session_id: str) -> Iterator[None]:
    """Hold an uncommitted insert of `session_id`: every write of that id waits for it."""
    connection = engine.connect()
    transaction = connection.begin()
    connection.execute(
        sa.text(
            "INSERT INTO writing_session (id, topic, content, word_count, char_count, started_at,"
            " revision, created_at, updated_at) VALUES (:id, 'locker', '', 0, 0, now(), 0,"
            " now(), now())"
        ),
        {"id": session_id},
    )
    try:
        yield
    finally:
        transaction.rollback()
        connection.close()


def waiting_on_a_lock(engine: sa.Engine, database_url: str) -> int:
    """How many of the workers' connections wait for a row lock now."""
    waits = worker_connections(engine, database_url, columns="wait_event_type")
    return sum(1 for (wait,) in waits if wait == "Lock")


def set_read_only(engine: sa.Engine, database_url: str, on: bool) -> None:
    """Make the database refuse writes (or take them again) and cut the workers' connections,
    as a failover to a standby (or back) does."""
    name = make_url(database_url).database
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("SET default_transaction_read_only = off"))
        setting = "SET default_transaction_read_only = on" if on else "RESET ALL"
        connection.execute(sa.text(f'ALTER DATABASE "{name}" {setting}'))
        connection.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"
                " AND application_name LIKE 'writing-sessions:%'"
            ),
            {"db": name},
        )


def test_terminating_one_member_of_a_locked_group_writes_every_other_member(
    db, env, database_url, producer, start_worker
):
    locked = str(uuid.uuid4())
    payloads = [new_session() for _ in range(59)] + [new_session(id=locked)]
    with row_locked(db, locked):
        results = [send_save(producer, payload) for payload in payloads]
        worker = start_worker(concurrency=1)
        wait_for(lambda: waiting_on_a_lock(db, database_url), 60, "the group to wait on the lock")
        target = results[10]
        active = {task["id"] for task in inspect(env, worker, "active")}
        assert target.id in active and len(active) == 60, "the group is not the 60 messages"

        producer.control.revoke(target.id, terminate=True)
        wait_for(lambda: target.state == "REVOKED", 30, "the terminated message to be revoked")
        wait_for(lambda: waiting_on_a_lock(db, database_url), 60, "the rest to run again")
    outcomes = [result.get(timeout=60) for i, result in enumerate(results) if i != 10]

    assert [outcome["outcome"] for outcome in outcomes] == ["created"] * 59
    assert count_rows(db) == 59
    assert count_rows(db, "dead_letter") == 0
    wait_for(lambda: queue_settled(env["CELERY_BROKER_URL"]), 30, "the queue to empty")
    assert worker.alive()


def test_an_overflowing_date_among_valid_messages_is_one_dead_letter_naming_the_field(
    db, producer, start_worker
):
    results = [send_save(producer, new_session()) for _ in range(116)]
    bad = send_save(producer, new_session(started_at="0001-01-01T00:30:00+01:00"))
    late = send_save(producer, new_session(ended_at="9999-12-31T23:30:00-01:00"))

    start_worker()
    outcomes = [result.get(timeout=60)["outcome"] for result in results]
    errors = [str(r.get(timeout=30, propagate=False)) for r in (bad, late)]

    assert outcomes == ["created"] * 116
    assert count_rows(db) == 116
    assert [letter.error for letter in letters(db)] == errors
    assert errors[0] == "started_at: is out of range once converted to UTC"
    assert errors[1] == "ended_at: is out of range once converted to UTC"


def test_a_database_that_refuses_writes_for_a_while_loses_and_dead_letters_nothing(
    db, database_url, producer, start_worker
):
    results = [send_save(producer, new_session()) for _ in range(1500)]
    fast_retries = {"WRITING_SESSIONS_RETRY_BACKOFF_MAX": "2", "WRITING_SESSIONS_MAX_RETRIES": "50"}
    worker = start_worker(extra_env=fast_retries)
    wait_for(lambda: count_rows(db) >= 300, 60, "300 rows before the failover")

    try:
        set_read_only(db, database_url, True)
        before = count_rows(db)
        wait_for(lambda: worker.log().count("read-only transaction") >= 200, 60, "refusals")
        during = count_rows(db)
    finally:
        set_read_only(db, database_url, False)
    outcomes = [result.get(timeout=180)["outcome"] for result in results]

    assert outcomes.count("created") + outcomes.count("duplicate") == 1500
    assert during == before  # nothing was written while read-only
    assert count_rows(db) == 1500
    assert count_rows(db, "dead_letter") == 0
    assert "Task handler raised error" not in worker.log()


def test_a_group_past_its_hard_time_limit_counts_an_attempt_and_only_the_stuck_one_dead_letters(
    db, producer, start_worker
):
    locked = str(uuid.uuid4())
    with row_locked(db, locked):
        results = [send_save(producer, new_session()) for _ in range(9)]
        stuck = send_save(producer, new_session(id=locked))
        worker = start_worker(concurrency=1, extra_env=ONE_RETRY_AFTER_3_SECONDS)
        wait_for(lambda: count_rows(db, "dead_letter") == 1, 60, "the stuck one's dead letter")
        outcomes = [result.get(timeout=30)["outcome"] for result in results]
    (letter,) = letters(db)

    assert outcomes == ["created"] * 9
    assert stuck.state == "FAILURE"
    assert letter.task_id == stuck.id and letter.attempts == 2
    assert "TimeLimitExceeded" in letter.error
    assert worker.log().count("hard time limit") == 2  # the group's, then the stuck one's alone
    assert count_rows(db) == 9


def test_a_save_many_past_its_hard_time_limit_is_retried_then_dead_lettered_not_dropped(
    db, producer, start_worker
):
    locked = str(uuid.uuid4())
    with row_locked(db, locked):
        batch = producer.send_task(
            "writing_sessions.save_many", args=[[new_session(), new_session(id=locked)]]
        )
        start_worker(concurrency=1, extra_env=ONE_RETRY_AFTER_3_SECONDS)
        wait_for(lambda: count_rows(db, "dead_letter") == 1, 60, "the batch's dead letter")
    (letter,) = letters(db)

    assert batch.get(timeout=30, propagate=False) is not None and batch.state == "FAILURE"
    assert letter.task_id == batch.id and letter.attempts == 2
    assert "TimeLimitExceeded" in letter.error
    assert count_rows(db) == 0


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_runner_that_raises_for_its_group_fails_only_the_message_that_causes_it(
    pool, db, env, producer, start_worker
):
    values = [f"value {n}" for n in range(30)]
    values[17] = "poison"
    results = [producer.send_task("probe.echo", args=[value]) for value in values]

    worker = start_worker(pool=pool, extra_env=PROBES, args=("-I", "tests.probes"))
    outcomes = [result.get(timeout=60, propagate=False) for result in results]

    assert [outcome for n, outcome in enumerate(outcomes) if n != 17] == [
        {"echo": value} for n, value in enumerate(values) if n != 17
    ]
    assert results[17].state == "FAILURE"
    assert "poison in the group" in str(outcomes[17])
    assert worker.log().count("each alone") >= 1
    wait_for(lambda: queue_settled(env["CELERY_BROKER_URL"]), 30, "the queue to empty")
    assert worker.alive()


def test_celery_signals_fire_for_each_grouped_message_with_its_own_request_and_headers(
    db, env, producer, redis_url, start_worker
):
    payloads = [new_session() for _ in range(40)]
    payloads[7] = {"id": str(uuid.uuid4()), "topic": "   "}
    results = [
        producer.send_task("writing_sessions.save", args=[p], headers={"x-probe": f"h{n}"})
        for n, p in enumerate(payloads)
    ]

    worker = start_worker(extra_env=PROBES, args=("-I", "tests.probes"))
    for result in results:
        result.get(timeout=60, propagate=False)
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.llen("probe:signals") >= 120, 30, "three signals per message")
    seen: dict[str, list[dict]] = defaultdict(list)
    for raw in client.lrange("probe:signals", 0, -1):
        entry = json.loads(raw)
        seen[entry["task_id"]].append(entry)

    assert pool_jobs(env, worker) < 40, "the messages were not grouped"
    for n, result in enumerate(results):
        signals = [entry["signal"] for entry in seen[result.id]]
        final = "failure" if n == 7 else "success"
        assert sorted(signals) == sorted(["prerun", final, "postrun"]), (n, signals)
        assert signals[0] == "prerun" and signals[-1] == "postrun"
        assert all(entry["request_id"] == result.id for entry in seen[result.id])
        assert all(entry["header"] == f"h{n}" for entry in seen[result.id])


def test_a_transient_fault_fires_task_retry_for_each_grouped_message(
    db, env, producer, redis_url, start_worker
):
    results = [send_save(producer, new_session()) for _ in range(20)]
    set_read_only(db, env["DATABASE_URL"], True)
    try:
        start_worker(
            extra_env={**PROBES, "WRITING_SESSIONS_RETRY_BACKOFF_MAX": "1"},
            args=("-I", "tests.probes"),
        )
        client = redis.Redis.from_url(redis_url)

        def retried() -> set[str]:
            entries = [json.loads(raw) for raw in client.lrange("probe:signals", 0, -1)]
            return {entry["task_id"] for entry in entries if entry["signal"] == "retry"}

        wait_for(lambda: retried() >= {result.id for result in results}, 60, "a retry each")
    finally:
        set_read_only(db, env["DATABASE_URL"], False)

    assert [r.get(timeout=60)["outcome"] for r in results].count("created") == 20
    assert count_rows(db, "dead_letter") == 0
