"""Every final failure ends in dead_letter, whole, and FAILURE with the same message."""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import subprocess
import time
import uuid
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from tests.conftest import CLI, count_rows, new_session, run_cli, send_save, wait_for

# Each class of bad input of docs/contract.md: (task, args, kwargs, the error it must give).
BAD_MESSAGES = [
    ("writing_sessions.save", [{"id": str(uuid.uuid4())}], {}, "topic: is required"),
    ("writing_sessions.save", [new_session(colour="red")], {}, "colour: is not a known field"),
    (
        "writing_sessions.save",
        [new_session(revision="7")],
        {},
        "revision: Input should be a valid integer",
    ),
    ("writing_sessions.save", [new_session(topic=" " * 3)], {}, "topic: must not be empty"),
    (
        "writing_sessions.save",
        [new_session(content="c" * 1_000_001)],
        {},
        "content: must be at most 1000000",
    ),
    (
        "writing_sessions.save",
        [new_session(revision=2**31)],
        {},
        "revision: Input should be less than",
    ),
    (
        "writing_sessions.save",
        [new_session(started_at="2024-01-02T00:00:00", ended_at="2024-01-01T00:00:00")],
        {},
        "ended_at: must not be before started_at",
    ),
    (
        "writing_sessions.save",
        [new_session(topic="nul\x00")],
        {},
        "topic: contains a NUL character",
    ),
    (
        "writing_sessions.save",
        [new_session(author_id="\udc80")],
        {},
        "author_id: contains a lone surrogate",
    ),
    (
        "writing_sessions.save",
        ["just a string"],
        {},
        "writing_session: must be an object, got a string",
    ),
    ("writing_sessions.save", [new_session(), new_session()], {}, "arguments: too many positional"),
    ("writing_sessions.save", [], {}, "arguments: missing a required argument: 'writing_session'"),
    ("writing_sessions.save", [], {"session": new_session()}, "arguments: "),
    (
        "writing_sessions.delete",
        [str(uuid.uuid4())],
        {},
        "arguments: missing a required argument: 'revision'",
    ),
    ("writing_sessions.delete", ["nope", 1], {}, "id: Input should be a valid UUID"),
    ("writing_sessions.delete", [str(uuid.uuid4()), -1], {}, "revision: Input should be greater"),
    ("writing_sessions.save_many", [{"not": "a list"}], {}, "writing_sessions: must be a list"),
]


def letters(engine):
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT * FROM dead_letter ORDER BY id")).all()


def test_each_class_of_bad_input_is_dead_lettered_between_valid_messages(
    db, producer, start_worker
):
    worker = start_worker()
    valid = []
    bad = []

    for task, args, kwargs, message in BAD_MESSAGES:
        valid.append(send_save(producer, new_session()))
        bad.append(
            (producer.send_task(task, args=args, kwargs=kwargs), task, args, kwargs, message)
        )
    valid.append(send_save(producer, new_session()))

    for result in valid:
        assert result.get(timeout=60)["outcome"] == "created"
    by_task_id = {}
    wait_for(lambda: len(letters(db)) == len(BAD_MESSAGES), 30, "a dead letter per bad message")
    for letter in letters(db):
        by_task_id[letter.task_id] = letter
    for result, task, args, kwargs, message in bad:
        result.get(timeout=30, propagate=False)
        assert result.state == "FAILURE", (task, args)
        assert message in str(result.result)
        letter = by_task_id[result.id]
        assert letter.task_name == task
        assert letter.error == str(result.result)
        assert letter.error_type == "InvalidPayloadError"
        assert letter.attempts == 1
        assert json.loads(letter.payload) == {"args": args, "kwargs": kwargs}
    assert count_rows(db) == len(valid)
    assert worker.alive()


def test_payload_keeps_nul_characters_and_lone_surrogates_byte_for_byte(db, producer, start_worker):
    start_worker()
    payload = new_session(topic="a\x00b", content="half \ud83d of an emoji")

    send_save(producer, payload).get(timeout=30, propagate=False)

    (letter,) = wait_for(lambda: letters(db), 30, "the dead letter")
    assert "\\u0000" in letter.payload and "\\ud83d" in letter.payload
    assert letter.payload.isascii()
    assert json.loads(letter.payload)["args"][0] == payload


def test_replay_re_enqueues_and_a_second_failure_is_a_new_letter_not_a_loop(
    db, env, producer, start_worker, tmp_path
):
    start_worker()
    send_save(producer, {"id": str(uuid.uuid4())}).get(timeout=30, propagate=False)
    (first,) = wait_for(lambda: letters(db), 30, "the first dead letter")

    replay = run_cli("dead-letters", "replay", str(first.id), env=env, cwd=tmp_path)
    again = run_cli("dead-letters", "replay", str(first.id), env=env, cwd=tmp_path)

    assert replay.returncode == 0, replay.stderr
    assert "replayed 1, skipped 0" in replay.stdout
    both = wait_for(lambda: len(letters(db)) == 2 and letters(db), 30, "a second dead letter")
    assert both[0].replayed_at is not None
    assert both[1].replayed_at is None
    assert both[1].payload == first.payload
    assert again.returncode == 1
    assert f"not replayed: not found or already replayed: {first.id}" in again.stderr


def test_dead_letters_list_filters_by_task_and_shows_the_error(
    db, env, producer, start_worker, tmp_path
):
    start_worker()
    send_save(producer, new_session(mood=1)).get(timeout=30, propagate=False)
    producer.send_task("writing_sessions.delete", args=["x", 1]).get(timeout=30, propagate=False)
    wait_for(lambda: len(letters(db)) == 2, 30, "two dead letters")

    listed = run_cli(
        "dead-letters", "list", "--task", "writing_sessions.save", env=env, cwd=tmp_path
    )
    shown = run_cli("dead-letters", "show", str(letters(db)[1].id), env=env, cwd=tmp_path)

    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert "writing_sessions.save" in line and "mood: is not a known field" in line
    assert json.loads(shown.stdout)["payload"] == {"args": ["x", 1], "kwargs": {}}


def insert_letters(engine: sa.Engine, payloads: list[Any], replayed: bool = False) -> list[int]:
    """Dead letters of writing_sessions.save holding `payloads` (as the worker keeps them); their
    ids, in order."""
    with engine.begin() as connection:
        return [
            connection.execute(
                sa.text(
                    "INSERT INTO dead_letter (task_name, task_id, payload, error_type, error,"
                    " attempts, failed_at, replayed_at) VALUES ('writing_sessions.save', NULL,"
                    " :payload, 'InvalidPayloadError', 'topic: is required', 1, now(),"
                    " CASE WHEN :replayed THEN now() END) RETURNING id"
                ),
                {"payload": json.dumps(payload), "replayed": replayed},
            ).scalar_one()
            for payload in payloads
        ]


def saves(count: int) -> list[dict[str, Any]]:
    """The payloads of `count` save messages, each of a session with its own id."""
    return [{"args": [new_session()], "kwargs": {}} for _ in range(count)]


MALFORMED = {"malformed": {"body": "hello, worker", "error": "not a task request"}}


def queued_session_ids(redis_url: str) -> list[str]:
    """The session id of each writing_sessions.save message waiting in the broker's queue."""
    ids = []
    for raw in redis.Redis.from_url(redis_url).lrange("celery", 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == "writing_sessions.save"
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.append(args[0]["id"])
        # Flower and the logs see a preview, as of a producer's message, never the content.
        assert args[0]["content"] not in message["headers"]["argsrepr"]
        assert "chars>" in message["headers"]["argsrepr"]
    return ids


def pending(engine: sa.Engine) -> list[int]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                sa.text("SELECT id FROM dead_letter WHERE replayed_at IS NULL ORDER BY id")
            ).scalars()
        )


def test_replay_all_sends_each_letter_once_marks_them_a_batch_at_a_time_and_prints_a_summary(
    db, env, redis_url, tmp_path
):
    payloads = saves(1200)
    insert_letters(db, payloads[:700])
    malformed = insert_letters(db, [MALFORMED] * 3)
    insert_letters(db, payloads[700:])
    insert_letters(db, saves(2), replayed=True)

    # SQL_ECHO: the CLI's statements, to count its UPDATEs.
    result = run_cli("dead-letters", "replay", "--all", env={**env, "SQL_ECHO": "1"}, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith("replayed")]
    assert said == [
        "replayed 1200, skipped 3 (malformed: nothing to send), not found or already replayed: 0"
    ]
    assert "replaying" not in result.stderr  # no progress bar without a terminal
    assert pending(db) == malformed
    assert sorted(queued_session_ids(redis_url)) == sorted(p["args"][0]["id"] for p in payloads)
    # 1,203 letters read 500 at a time: one UPDATE per batch, not one per letter.
    assert result.stdout.count("UPDATE dead_letter SET replayed_at") == 3


def test_replay_of_ids_names_each_letter_replayed_and_each_that_was_not(
    db, env, redis_url, tmp_path
):
    first, second, third = insert_letters(db, saves(3))
    (malformed,) = insert_letters(db, [MALFORMED])
    (done,) = insert_letters(db, saves(1), replayed=True)
    asked = [third, first, malformed, done, 999, second]

    result = run_cli(
        "dead-letters", "replay", "--batch-size", "2", *map(str, asked), env=env, cwd=tmp_path
    )

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [line.split(" as task ")[0] for line in lines[:-1]] == [
        f"replayed {first}",
        f"replayed {second}",
        f"replayed {third}",
    ]
    assert lines[-1] == (
        "replayed 3, skipped 1 (malformed: nothing to send), not found or already replayed: 2"
    )
    assert (
        f"not replayed: malformed (nothing to send): {malformed}; "
        f"not found or already replayed: {done}, 999"
    ) in result.stderr
    assert pending(db) == [malformed]
    assert len(queued_session_ids(redis_url)) == 3


def run_in_a_terminal(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with its stdin, stdout and stderr on a pseudo-terminal: its exit status and
    everything it wrote there."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [CLI, *args], env=env, stdin=terminal, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"{args} still running after {timeout} s; it wrote {output!r}")
            if not select.select([controller], [], [], left)[0]:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            output += chunk
        return process.wait(10), output.decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        os.close(controller)


def test_replay_all_on_a_terminal_shows_a_progress_bar_then_the_summary(db, env):
    insert_letters(db, saves(1000))

    status, output = run_in_a_terminal(
        "dead-letters", "replay", "--all", "--batch-size", "100", env=env
    )

    assert status == 0, output
    assert "replaying  [####" in output
    assert "50%" in output and "100%" in output
    assert (
        "replayed 1000, skipped 0 (malformed: nothing to send), not found or already replayed: 0"
        in output
    )
    assert pending(db) == []


def test_replay_all_leaves_the_letters_its_own_replays_make_for_the_next_replay(
    db, env, start_worker, tmp_path
):
    start_worker()
    # Each fails again, as quickly as the worker can: a new letter behind the ones replayed.
    bad = [{"args": [{"id": str(uuid.uuid4())}], "kwargs": {}} for _ in range(200)]
    first = insert_letters(db, bad)

    # A replay that took each new letter too would never end: 30 s is ten times enough.
    result = run_cli(
        "dead-letters", "replay", "--all", "--batch-size", "1", env=env, cwd=tmp_path, timeout=30
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("replayed 200, skipped 0")
    wait_for(lambda: count_rows(db, "dead_letter") == 400, 60, "a new letter per replay")
    again = pending(db)
    assert len(again) == 200 and min(again) > max(first)
