"""writing_sessions.delete: tombstones ordered by revision, erasure, revival."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from tests.conftest import new_session, send_save


def send_delete(producer, id, revision):
    return producer.send_task("writing_sessions.delete", args=[id, revision])


def row(engine, id):
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT * FROM writing_session WHERE id = :id"), {"id": id}
        ).one()


def test_delete_erases_content_and_keeps_a_tombstone(db, producer, start_worker):
    start_worker()
    payload = new_session(
        started_at="2024-01-01T08:00:00Z",
        ended_at="2024-01-01T09:00:00Z",
        author_id="u-7",
        revision=2,
    )
    send_save(producer, payload).get(timeout=30)

    result = send_delete(producer, payload["id"], 3).get(timeout=30)

    assert result == {"id": payload["id"], "outcome": "deleted", "revision": 3}
    tombstone = row(db, payload["id"])
    assert (tombstone.topic, tombstone.content, tombstone.author_id, tombstone.ended_at) == (
        None,
        "",
        None,
        None,
    )
    assert (tombstone.word_count, tombstone.char_count, tombstone.revision) == (0, 0, 3)
    assert tombstone.deleted_at is not None
    assert tombstone.started_at.isoformat() == "2024-01-01T08:00:00+00:00"


def test_late_older_save_after_delete_stays_stale(db, producer, start_worker):
    start_worker()
    payload = new_session(revision=1)
    send_save(producer, payload).get(timeout=30)
    send_delete(producer, payload["id"], 5).get(timeout=30)

    late = send_save(producer, {**payload, "revision": 4, "topic": "late"}).get(timeout=30)

    assert late == {"id": payload["id"], "outcome": "stale", "revision": 5}
    assert row(db, payload["id"]).topic is None


def test_delete_of_an_unseen_id_inserts_a_tombstone_that_outranks_older_saves(
    db, producer, start_worker
):
    start_worker()
    id = str(uuid.uuid4())

    deleted = send_delete(producer, id, 3).get(timeout=30)
    older = send_save(producer, new_session(id=id, revision=2)).get(timeout=30)

    assert deleted["outcome"] == "deleted"
    assert older["outcome"] == "stale"
    assert row(db, id).deleted_at is not None


def test_delete_outcomes_duplicate_and_stale(db, producer, start_worker):
    start_worker()
    id = str(uuid.uuid4())
    send_delete(producer, id, 4).get(timeout=30)

    duplicate = send_delete(producer, id, 4).get(timeout=30)
    stale = send_delete(producer, id, 1).get(timeout=30)

    assert duplicate == {"id": id, "outcome": "duplicate", "revision": 4}
    assert stale == {"id": id, "outcome": "stale", "revision": 4}


def test_newer_save_brings_a_tombstone_back_to_life(db, producer, start_worker):
    start_worker()
    payload = new_session(revision=1)
    send_save(producer, payload).get(timeout=30)
    send_delete(producer, payload["id"], 2).get(timeout=30)

    revived = send_save(producer, {**payload, "revision": 3, "topic": "back"}).get(timeout=30)

    assert revived["outcome"] == "updated"
    alive = row(db, payload["id"])
    assert (alive.topic, alive.deleted_at, alive.revision) == ("back", None, 3)
