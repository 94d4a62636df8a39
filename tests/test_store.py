"""The store's decisions (worker/store.py), in-process on one connection to PostgreSQL and to
the embedded SQLite: each test's writes are rolled back at its end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import store
from worker.db import make_engine
from worker.errors import InvalidPayloadError
from worker.migrate import upgrade
from worker.models import WritingSession
from worker.schemas import WritingSessionIn
from worker.times import as_utc
from worker.upsert import Tombstone

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


pytestmark = pytest.mark.quick


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def store_engine(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[sa.Engine]:
    """An engine on a migrated database of each dialect the store writes to."""
    if request.param == "postgresql":
        url = request.getfixturevalue("database_url")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"
        upgrade(url)
    engine = make_engine(url, "writing-sessions:test-store")
    yield engine
    engine.dispose()


@pytest.fixture
def db(store_engine: sa.Engine) -> Iterator[Session]:
    """A Session whose every write is rolled back after the test."""
    with store_engine.connect() as connection:
        transaction = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        yield session
        session.close()
        transaction.rollback()


def save(id: uuid.UUID, revision: int, topic: str = "t", **fields: object) -> WritingSessionIn:
    return WritingSessionIn.model_validate(
        {"id": id, "topic": topic, "revision": revision, **fields}
    )


def delete(id: uuid.UUID, revision: int) -> Tombstone:
    return Tombstone(id=id, revision=revision, deleted_at=NOW)


def outcomes(results: list) -> list[tuple[str, int] | str]:
    return [
        str(result) if isinstance(result, Exception) else (result.outcome, result.revision)
        for result in results
    ]


def stored(db: Session, id: uuid.UUID) -> WritingSession:
    row = db.get(WritingSession, id, populate_existing=True)
    assert row is not None
    return row


def test_the_rows_of_an_id_in_a_group_end_as_they_would_one_message_after_another(db):
    id = uuid.uuid4()

    results = store.write_group(
        db, [save(id, 1), save(id, 3, "three"), save(id, 3), save(id, 2)], NOW
    )

    assert outcomes(results) == [("created", 1), ("updated", 3), ("duplicate", 3), ("stale", 3)]
    assert stored(db, id).topic == "three"


def test_a_row_without_started_at_takes_the_one_its_predecessor_in_the_group_stored(db):
    id = uuid.uuid4()

    store.write_group(
        db,
        [
            save(id, 1, started_at="2024-06-01T00:00:00Z"),
            save(id, 2, "later", ended_at="2024-09-01T00:00:00Z"),
        ],
        NOW,
    )

    row = stored(db, id)
    assert (row.topic, row.revision) == ("later", 2)
    assert as_utc(row.started_at) == datetime(2024, 6, 1, tzinfo=UTC)


def test_a_delete_that_wins_in_a_group_leaves_a_tombstone(db):
    id = uuid.uuid4()
    store.write_group(db, [save(id, 1, "kept?")], NOW)

    results = store.write_group(db, [save(id, 2), delete(id, 4), save(id, 3)], NOW)

    assert outcomes(results) == [("updated", 2), ("deleted", 4), ("stale", 4)]
    row = stored(db, id)
    assert (row.topic, row.content, row.deleted_at is not None) == (None, "", True)


def test_a_stored_higher_revision_makes_every_row_of_its_id_stale_or_duplicate(db):
    id = uuid.uuid4()
    store.write_group(db, [save(id, 5)], NOW)

    results = store.write_group(db, [save(id, 4), save(id, 5), delete(id, 1)], NOW)

    assert outcomes(results) == [("stale", 5), ("duplicate", 5), ("stale", 5)]


def test_a_refused_winner_is_named_and_the_next_best_row_of_its_id_is_written(db):
    id, other = uuid.uuid4(), uuid.uuid4()
    store.write_group(db, [save(id, 0, started_at="2026-01-02T00:00:00Z")], NOW)
    # Without started_at an update keeps the stored one, after which ended_at may not fall.
    refused = save(id, 5, ended_at="2026-01-01T00:00:00Z")

    results = store.write_group(db, [refused, save(id, 3, "three"), save(other, 1)], NOW)

    assert isinstance(results[0], InvalidPayloadError)
    assert str(results[0]).startswith("ended_at: must not be before started_at")
    assert outcomes(results)[1:] == [("updated", 3), ("created", 1)]
    assert stored(db, id).topic == "three"


def test_rows_without_started_at_keep_the_stored_one_in_a_group(db):
    id = uuid.uuid4()
    store.write_group(db, [save(id, 0, started_at="2026-01-02T00:00:00Z")], NOW)

    store.write_group(db, [save(id, 1, "later")], NOW)

    assert as_utc(stored(db, id).started_at) == datetime(2026, 1, 2, tzinfo=UTC)


def test_save_many_counts_each_decision_and_names_each_refused_item(db):
    id, other, refused = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    store.write_group(db, [save(refused, 0, started_at="2026-01-02T00:00:00Z")], NOW)
    items = [
        save(id, 2),
        save(id, 1),
        save(id, 2),
        save(other, 0),
        save(refused, 1, ended_at="2026-01-01T00:00:00Z"),
    ]

    batch = store.save_many(db, items, NOW)

    assert batch.counts == {"created": 2, "updated": 0, "duplicate": 1, "stale": 1}
    assert [index for index, _ in batch.refused] == [4]
    assert batch.refused[0][1].startswith("ended_at: must not be before started_at")


def test_an_update_without_started_at_is_checked_against_the_stored_started_at(db):
    id = uuid.uuid4()
    store.save(db, save(id, 1, started_at="2024-06-01T00:00:00Z"), NOW)

    outcome = store.save(db, save(id, 2, ended_at="2024-09-01T00:00:00Z"), NOW)

    assert (outcome.outcome, outcome.revision) == ("updated", 2)
    assert as_utc(stored(db, id).ended_at) == datetime(2024, 9, 1, tzinfo=UTC)


def test_a_duplicate_without_started_at_is_not_refused_for_an_ended_at_it_never_writes(db):
    id = uuid.uuid4()
    store.delete(db, id, 0, NOW)  # a tombstone: started_at is the time of the delete

    outcome = store.save(db, save(id, 0, ended_at="2024-01-01T00:00:00Z"), NOW)

    assert (outcome.outcome, outcome.revision) == ("duplicate", 0)
