"""No message content stops a worker: what cannot be a task request is a dead letter, holding
what was received, and its neighbours are written (docs/contract.md, Delivery)."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from tests.conftest import count_rows, new_session, run_cli, send_save, wait_for

SAVE = "writing_sessions.save"


def envelope(body: Any, *, task: str = SAVE, headers: Any = None, **overrides: Any) -> str:
    """A Celery protocol-2 message as a Redis producer writes it; `body` JSON-encoded unless
    it is bytes (sent as they are)."""
    task_id = str(uuid.uuid4())
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    message = {
        "body": base64.b64encode(raw).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "retries": 0}
        if headers is None
        else headers,
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "celery"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    message.update(overrides)
    return json.dumps(message)


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

# (what is wrong, the raw Redis list item, a phrase the dead letter's error must hold)
MALFORMED = [
    ("a mapping body", envelope({"just": "a mapping"}), "body: must be [args, kwargs, embed]"),
    ("args not a list", envelope([5, {}, {}]), "args must be a list, got int"),
    ("kwargs not a mapping", envelope([[new_session()], [], EMBED]), "kwargs must be a mapping"),
    ("embed not a mapping", envelope([[new_session()], {}, 7]), "embed must be a mapping"),
    ("a body that is not JSON", envelope(b"[[{not json"), "cannot decode the message"),
    (
        "a pickled body",
        envelope(b"\x80\x04K\x01.", **{"content-type": "application/x-python-serialize"}),
        "cannot decode the message",
    ),
    ("headers that are not a mapping", envelope([[], {}, EMBED], headers=[1, 2]), "headers"),
    ("an unknown task", envelope([[], {}, EMBED], task="writing_sessions.nope"), "no task named"),
    (
        "an id that is not a string",
        envelope([[new_session()], {}, EMBED], headers={"task": SAVE, "id": 42}),
        "headers.id: must be a non-empty string",
    ),
    ("not an envelope at all", "hello, worker", "not a kombu envelope: not JSON"),
    ("an envelope without properties", json.dumps({"body": "e30="}), "no properties object"),
]


def queue_settled(redis_url: str) -> bool:
    client = redis.Redis.from_url(redis_url)
    try:
        return client.llen("celery") == 0 and client.hlen("unacked") == 0
    finally:
        client.close()


def letters(engine: sa.Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(sa.text("SELECT * FROM dead_letter ORDER BY id")))


@pytest.mark.parametrize("group_commit", ["1", "0"], ids=["grouped", "per-task"])
def test_malformed_messages_among_valid_ones_are_dead_letters_and_the_worker_lives(
    group_commit, db, producer, redis_url, start_worker
):
    client = redis.Redis.from_url(redis_url)
    valid = [send_save(producer, new_session()) for _ in range(20)]
    for _, raw, _ in MALFORMED:
        client.lpush("celery", raw)
    valid += [send_save(producer, new_session()) for _ in range(20)]  # waiting before it starts

    worker = start_worker(extra_env={"WRITING_SESSIONS_GROUP_COMMIT": group_commit})
    wait_for(lambda: count_rows(db, "dead_letter") >= len(MALFORMED), 60, "a letter each")
    wait_for(lambda: queue_settled(redis_url), 30, "the queue and unacked to empty")

    assert worker.alive(), worker.log()
    assert "Unrecoverable error" not in worker.log()
    assert [result.get(timeout=30)["outcome"] for result in valid] == ["created"] * 40
    assert count_rows(db) == 40
    kept = letters(db)
    assert len(kept) == len(MALFORMED)
    errors = sorted(letter.error for letter in kept)
    for what, _, phrase in MALFORMED:
        assert any(phrase in error for error in errors), f"{what}: {phrase!r} not in {errors}"
    bodies = [json.loads(letter.payload)["malformed"]["body"] for letter in kept]
    assert "hello, worker" in bodies  # the raw bytes, as received
    assert {letter.error_type for letter in kept} == {"MalformedMessageError"}


def test_a_malformed_message_with_a_task_id_ends_failure_and_replay_leaves_it_be(
    db, env, redis_url, start_worker
):
    raw = envelope({"just": "a mapping"})
    task_id = json.loads(raw)["headers"]["id"]
    redis.Redis.from_url(redis_url).lpush("celery", raw)

    start_worker()
    wait_for(lambda: count_rows(db, "dead_letter") == 1, 60, "the dead letter")
    meta = wait_for(
        lambda: redis.Redis.from_url(redis_url).get(f"celery-task-meta-{task_id}"), 30, "a result"
    )
    (letter,) = letters(db)
    replayed = run_cli("dead-letters", "replay", str(letter.id), env=env)

    assert json.loads(meta)["status"] == "FAILURE"
    assert letter.task_id == task_id and letter.task_name == SAVE
    assert replayed.returncode == 1
    assert "malformed (nothing to send)" in replayed.stderr


def test_a_malformed_message_waits_on_the_broker_while_the_database_refuses_it(
    db, redis_url, start_worker
):
    with db.begin() as connection:
        connection.execute(sa.text("ALTER TABLE dead_letter RENAME TO dead_letter_away"))
    try:
        redis.Redis.from_url(redis_url).lpush("celery", envelope([5, {}, {}]))
        worker = start_worker()
        wait_for(lambda: "could not keep malformed message" in worker.log(), 30, "a refusal")
        client = redis.Redis.from_url(redis_url)
        held = client.hlen("unacked") + client.llen("celery")
    finally:
        with db.begin() as connection:
            connection.execute(sa.text("ALTER TABLE dead_letter_away RENAME TO dead_letter"))

    wait_for(lambda: count_rows(db, "dead_letter") == 1, 60, "the dead letter once it can be")
    wait_for(lambda: queue_settled(redis_url), 30, "the queue to empty")
    assert held == 1
    assert worker.alive()


def test_the_embedded_broker_keeps_a_malformed_message_too(start_worker, tmp_path: Path):
    from tests.conftest import service_env

    embedded = service_env()
    assert run_cli("migrate", env=embedded, cwd=tmp_path).returncode == 0
    worker = start_worker(base_env=embedded, cwd=tmp_path)
    sent = run_cli("send", "--topic", "before", "--wait", env=embedded, cwd=tmp_path)
    assert sent.returncode == 0, sent.stderr
    broker = sqlite3.connect(tmp_path / "var" / "broker.db")
    (queue_id,) = broker.execute("SELECT id FROM kombu_queue WHERE name = 'celery'").fetchone()
    with broker:
        for raw in (envelope({"just": "a mapping"}), envelope([5, {}, {}])):
            broker.execute(
                "INSERT INTO kombu_message (visible, timestamp, payload, version, queue_id) "
                "VALUES (1, ?, ?, 1, ?)",
                (time.strftime("%Y-%m-%d %H:%M:%S"), raw, queue_id),
            )
    broker.close()

    after = run_cli("send", "--topic", "after", "--wait", env=embedded, cwd=tmp_path, timeout=90)

    database = tmp_path / "var" / "writing-sessions.db"

    def kept() -> int:
        with sqlite3.connect(database) as connection:
            return connection.execute("SELECT count(*) FROM dead_letter").fetchone()[0]

    wait_for(lambda: kept() == 2, 60, "two dead letters on the embedded database")
    assert after.returncode == 0, after.stderr
    assert worker.alive(), worker.log()
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT count(*) FROM writing_session").fetchone()[0] == 2
