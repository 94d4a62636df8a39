"""Every final failure ends in dead_letter, whole, and FAILURE with the same message."""

from __future__ import annotations

import json
import uuid

import sqlalchemy as sa

from tests.conftest import count_rows, new_session, run_cli, send_save, wait_for

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
    assert "1 replayed" in replay.stdout
    both = wait_for(lambda: len(letters(db)) == 2 and letters(db), 30, "a second dead letter")
    assert both[0].replayed_at is not None
    assert both[1].replayed_at is None
    assert both[1].payload == first.payload
    assert again.returncode == 1
    assert f"not found, already replayed or malformed (nothing to send): {first.id}" in again.stderr


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
