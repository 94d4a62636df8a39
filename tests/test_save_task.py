"""writing_sessions.save through real prefork, solo and threads workers on real services."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import count_rows, new_session, send_save, wait_for, worker_connections


def test_a_thousand_saves_become_a_thousand_rows_with_counts(db, producer, start_worker):
    start_worker(concurrency=2)
    payloads = [new_session(content=f"word {'x ' * (i % 7)}end\u3000終わり") for i in range(1000)]

    for payload in payloads:
        send_save(producer, payload)

    wait_for(lambda: count_rows(db) == 1000, 120, "1,000 rows")
    with db.connect() as connection:
        rows = {
            str(row.id): row
            for row in connection.execute(
                sa.text("SELECT id, word_count, char_count FROM writing_session")
            )
        }
    for payload in payloads:
        row = rows[payload["id"]]
        assert row.word_count == len(payload["content"].split())
        assert row.char_count == len("".join(payload["content"].split()))


def test_serial_saves_report_created_updated_duplicate_stale(db, producer, start_worker):
    start_worker()
    payload = new_session(revision=5)

    results = [
        send_save(producer, {**payload, "revision": revision}).get(timeout=30)
        for revision in (5, 7, 7, 6)
    ]

    assert [r["outcome"] for r in results] == ["created", "updated", "duplicate", "stale"]
    assert [r["revision"] for r in results] == [5, 7, 7, 7]
    assert {r["id"] for r in results} == {payload["id"]}


def test_update_overwrites_fields_and_keeps_started_at_when_absent(db, producer, start_worker):
    start_worker()
    payload = new_session(started_at="2024-05-01T10:00:00", revision=1)
    send_save(producer, payload).get(timeout=30)

    update = {"id": payload["id"], "topic": "  New topic  ", "content": "a b c", "revision": 2}
    result = send_save(producer, update).get(timeout=30)

    assert result["outcome"] == "updated"
    with db.connect() as connection:
        row = connection.execute(
            sa.text("SELECT * FROM writing_session WHERE id = :id"), {"id": payload["id"]}
        ).one()
    assert row.topic == "New topic"
    assert (row.word_count, row.char_count) == (3, 3)
    assert row.started_at.isoformat() == "2024-05-01T10:00:00+00:00"
    assert row.deleted_at is None


def test_connections_come_only_from_children_one_each(db, producer, start_worker, database_url):
    worker = start_worker(concurrency=2)
    seen: dict[str, int] = {}

    for payload in (new_session() for _ in range(600)):
        send_save(producer, payload)

    def sample() -> bool:
        names = Counter(name for name, _ in worker_connections(db, database_url))
        for name, count in names.items():
            seen[name] = max(seen.get(name, 0), count)
        return count_rows(db) == 600

    wait_for(sample, 120, "600 rows", interval=0.02)
    children = worker.children()
    pids = {int(name.rsplit(":", 1)[1]) for name in seen}
    assert seen, "no worker connection was ever seen"
    assert pids <= children, f"connections from {pids}, children are {children}"
    assert worker.pid not in pids
    assert all(count == 1 for count in seen.values()), seen
    assert all(name.startswith(f"writing-sessions:{worker.node.split('@')[0]}@") for name in seen)


def test_failed_update_leaves_row_unchanged_and_no_transaction_open(
    db, producer, start_worker, database_url
):
    worker = start_worker(concurrency=1)
    payload = new_session(started_at="2024-05-01T10:00:00+00:00", revision=1)
    send_save(producer, payload).get(timeout=30)

    # ended_at before the *stored* started_at: only the database can see that; its CHECK fails
    # in the middle of the task's transaction.
    bad = {
        "id": payload["id"],
        "topic": "changed",
        "ended_at": "2024-04-01T00:00:00",
        "revision": 2,
    }
    result = send_save(producer, bad)
    result.get(timeout=30, propagate=False)

    assert result.state == "FAILURE"
    assert "ended_at" in str(result.result)
    with db.connect() as connection:
        row = connection.execute(
            sa.text("SELECT topic, revision FROM writing_session WHERE id = :id"),
            {"id": payload["id"]},
        ).one()
    states = [state for _, state in worker_connections(db, database_url)]
    assert (row.topic, row.revision) == ("A topic", 1)
    assert states and all(state == "idle" for state in states), states
    assert "connection leak" not in worker.log()
    assert worker.alive()


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_solo_and_threads_pools_persist_with_one_engine_in_the_main_process(
    db, producer, start_worker, pool, database_url
):
    worker = start_worker(pool=pool, concurrency=1 if pool == "solo" else 4)
    payloads = [new_session() for _ in range(100)]

    results = [send_save(producer, payload) for payload in payloads]
    outcomes = [result.get(timeout=60) for result in results]

    assert {o["outcome"] for o in outcomes} == {"created"}
    assert count_rows(db) == 100
    names = {name for name, _ in worker_connections(db, database_url)}
    assert names and {int(name.rsplit(":", 1)[1]) for name in names} == {worker.pid}


def test_invalid_messages_fail_with_the_field_named_and_valid_ones_persist(
    db, producer, start_worker
):
    worker = start_worker()
    valid = [new_session() for _ in range(3)]
    invalid = [
        ({"id": str(uuid.uuid4())}, "topic: is required"),
        (new_session(colour="red"), "colour: is not a known field"),
        (new_session(topic="x" * 201), "topic: must be at most 200 characters"),
        (new_session(content="nul\x00here"), "content: contains a NUL character"),
        ("not an object", "writing_session: must be an object"),
    ]

    sent_valid = []
    failed = []
    for good, (bad, message) in zip(valid, invalid[:3], strict=True):
        sent_valid.append(send_save(producer, good))
        failed.append((send_save(producer, bad), message))
    failed.extend((send_save(producer, bad), message) for bad, message in invalid[3:])
    wrong_shape = producer.send_task("writing_sessions.save", args=[new_session(), "extra"])

    for result in sent_valid:
        assert result.get(timeout=30)["outcome"] == "created"
    for result, message in failed:
        result.get(timeout=30, propagate=False)
        assert result.state == "FAILURE"
        assert message in str(result.result)
    wrong_shape.get(timeout=30, propagate=False)
    assert wrong_shape.state == "FAILURE"
    assert "arguments: too many positional arguments" in str(wrong_shape.result)
    assert count_rows(db) == 3
    assert worker.alive()


def write_both_ways(db, producer, session: dict, batch: list[dict], columns: str) -> list[tuple]:
    """`session` through writing_sessions.save and `batch` through save_many (both must create
    their rows); the stored `columns` of each row, session first, then the batch in order."""
    assert send_save(producer, session).get(timeout=30)["outcome"] == "created"
    result = producer.send_task("writing_sessions.save_many", args=[batch]).get(timeout=30)
    assert result["created"] == len(batch)
    ids = [uuid.UUID(item["id"]) for item in (session, *batch)]
    with db.connect() as connection:
        rows = connection.execute(
            sa.text(f"SELECT id, {columns} FROM writing_session WHERE id = ANY(:ids)"),
            {"ids": ids},
        )
        found = {uuid.UUID(str(row[0])): tuple(row[1:]) for row in rows}
    return [found[id] for id in ids if id in found]


def test_content_with_quotes_and_format_characters_is_stored_exactly(db, producer, start_worker):
    # The PostgreSQL upsert sends the rows as one JSON text quoted into the statement: nothing in
    # a value may be read as SQL, as a parameter placeholder or as a JSON escape.
    start_worker()
    tricky = (
        'it\'s 100% "done" %s %(id)s \\x00\\u0041\\ \t\n\x01\u2028 '
        "; DROP TABLE writing_session; -- 💡 今日は"
    )
    session = new_session(topic=tricky[:200], content=tricky, author_id="o'brien %s")
    batch = [new_session(content=f"{tricky} {i}", started_at=None) for i in range(3)]
    row, *batch_rows = write_both_ways(db, producer, session, batch, "topic, content, author_id")
    assert [content for _, content, _ in batch_rows] == [f"{tricky} {i}" for i in range(3)]
    assert row == (tricky[:200], tricky, "o'brien %s")


def test_timestamps_keep_their_instant_to_the_microsecond(db, producer, start_worker):
    start_worker()
    times = {
        "started_at": "2024-05-01T10:00:00.123456+02:00",
        "ended_at": "2024-05-01T12:30:00.000001-03:30",
    }
    batch = [new_session(**times) for _ in range(2)]
    rows = write_both_ways(db, producer, new_session(**times), batch, "started_at, ended_at")
    assert len(rows) == 3
    for started_at, ended_at in rows:
        assert started_at.astimezone(UTC).isoformat() == "2024-05-01T08:00:00.123456+00:00"
        assert ended_at.astimezone(UTC).isoformat() == "2024-05-01T16:00:00.000001+00:00"


def test_text_is_stored_exactly_whatever_the_client_encoding_default(db, producer, start_worker):
    # The store sends rows as UTF-8 bytes; the engine must talk UTF-8 even where libpq's
    # default (PGCLIENTENCODING here, or the server's) is another encoding.
    start_worker(extra_env={"PGCLIENTENCODING": "LATIN1"})
    text = "今日は 💡 naïve"
    batch = [new_session(content=text) for _ in range(2)]
    rows = write_both_ways(db, producer, new_session(content=text), batch, "content")
    assert [content for (content,) in rows] == [text] * 3


def test_the_parent_loads_the_database_driver_so_that_children_share_it(db, start_worker):
    worker = start_worker(concurrency=1)

    maps = Path(f"/proc/{worker.pid}/maps").read_text()

    # psycopg2's C extension, loaded before the fork (worker/db.py, worker_init).
    assert "psycopg2" in maps
