"""writing_sessions.save_many: one transaction, per-item validation, repeated ids."""

from __future__ import annotations

import json
import uuid

import sqlalchemy as sa

from tests.conftest import count_rows, new_session, send_save


def send_batch(producer, items):
    return producer.send_task("writing_sessions.save_many", args=[items])


def dead_letters(engine):
    with engine.connect() as connection:
        return connection.execute(
            sa.text(
                "SELECT task_name, task_id, payload, error_type, error, attempts "
                "FROM dead_letter ORDER BY id"
            )
        ).all()


def test_mixed_batch_counts_every_outcome_and_dead_letters_each_invalid_item(
    db, producer, start_worker
):
    start_worker()
    existing = new_session(revision=5)
    older = new_session(revision=9)
    send_save(producer, existing).get(timeout=30)
    send_save(producer, older).get(timeout=30)
    a = new_session(revision=1)
    missing_topic = {"id": str(uuid.uuid4()), "content": "no topic"}
    unknown_field = new_session(mood="happy")
    batch = [
        a,
        {**a, "revision": 3, "topic": "A3"},
        {**a, "revision": 3, "topic": "A3 copy"},
        {**a, "revision": 2},
        missing_topic,
        {**existing, "revision": 6, "topic": "updated"},
        {**existing, "revision": 6, "topic": "updated copy"},
        unknown_field,
        {**older, "revision": 9},
        {**older, "revision": 4},
    ]

    result = send_batch(producer, batch)
    counts = result.get(timeout=30)

    assert counts == {"created": 1, "updated": 1, "duplicate": 3, "stale": 3, "rejected": 2}
    with db.connect() as connection:
        topics = dict(
            connection.execute(sa.text("SELECT id::text, topic FROM writing_session")).all()
        )
    assert topics[a["id"]] == "A3"
    assert topics[existing["id"]] == "updated"
    assert count_rows(db) == 3
    letters = dead_letters(db)
    assert [(d.task_name, d.task_id, d.error_type, d.attempts) for d in letters] == [
        ("writing_sessions.save_many", result.id, "InvalidPayloadError", 1)
    ] * 2
    assert letters[0].error == "writing_sessions[4].topic: is required"
    assert letters[1].error == "writing_sessions[7].mood: is not a known field"
    assert json.loads(letters[0].payload) == {"args": [[missing_topic]], "kwargs": {}}
    assert json.loads(letters[1].payload) == {"args": [[unknown_field]], "kwargs": {}}


def test_item_the_database_refuses_is_dead_lettered_and_the_rest_persist(
    db, producer, start_worker
):
    start_worker()
    stored = new_session(started_at="2024-06-01T12:00:00Z", revision=1)
    send_save(producer, stored).get(timeout=30)
    refused = {"id": stored["id"], "topic": "t", "ended_at": "2024-05-01T00:00:00Z", "revision": 2}
    fresh = [new_session() for _ in range(3)]

    counts = send_batch(producer, [fresh[0], refused, *fresh[1:]]).get(timeout=30)

    assert counts == {"created": 3, "updated": 0, "duplicate": 0, "stale": 0, "rejected": 1}
    assert count_rows(db) == 4
    (letter,) = dead_letters(db)
    assert letter.error.startswith("writing_sessions[1].ended_at: must not be before started_at")
    assert json.loads(letter.payload)["args"] == [[refused]]


def test_a_message_that_is_not_a_batch_is_one_dead_letter_and_failure(db, producer, start_worker):
    start_worker()
    shapes = [
        (
            "a string",
            "writing_sessions: must be a list of 1 to 1000 writing-session objects, got a string",
        ),
        ([], "got a list of 0"),
        ([new_session() for _ in range(1001)], "got a list of 1001"),
        ({"id": str(uuid.uuid4())}, "got an object"),
    ]

    results = [(send_batch(producer, shape), message) for shape, message in shapes]

    for result, message in results:
        result.get(timeout=30, propagate=False)
        assert result.state == "FAILURE"
        assert message in str(result.result)
    letters = dead_letters(db)
    assert len(letters) == 4
    assert all(letter.attempts == 1 for letter in letters)
    assert count_rows(db) == 0


def test_a_thousand_items_persist_in_one_message(db, producer, start_worker):
    start_worker()
    items = [new_session(content=f"item {i}") for i in range(1000)]

    counts = send_batch(producer, items).get(timeout=60)

    assert counts["created"] == 1000
    assert count_rows(db) == 1000
