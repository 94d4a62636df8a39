"""The group runner of save and delete (worker/group_runner.py `run_group`), called in this
process as the pool child calls it, against the test run's PostgreSQL database.

Each test builds group_commit Messages as the Strategy hands them over (Celery's protocol-2
headers, the delivery info) and reads the decisions and what the database holds afterwards.
A retry is published by Celery's Task.retry to the test's own Redis database index, where the
test reads it.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from billiard.exceptions import TimeLimitExceeded
from celery import Celery, current_app, states
from celery.backends.base import DisabledBackend
from celery.exceptions import Retry

from tests.conftest import count_rows, new_session
from worker.celery_ext.group_commit import Message
from worker.errors import InvalidPayloadError, TransientError

pytestmark = pytest.mark.unit

SAVE, DELETE = "writing_sessions.save", "writing_sessions.delete"


@pytest.fixture
def project(
    monkeypatch: pytest.MonkeyPatch, database_url: str, redis_url: str, db: sa.Engine
) -> Iterator[Celery]:
    """The project's app as a pool child has it: its tasks registered and current, worker.db's
    engine on the test database, retries published to the test's Redis database index."""
    import tasks.writing_sessions  # noqa: F401  (registers the tasks, as a worker imports them)
    from worker import db as worker_db
    from worker.app import app

    # worker.settings read the environment at import; the test's database is known only now.
    monkeypatch.setattr(
        worker_db, "settings", dataclasses.replace(worker_db.settings, database_url=database_url)
    )
    worker_db.dispose_engine()
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)  # Celery prefers it to conf.broker_url
    monkeypatch.setitem(app.conf, "broker_url", redis_url)
    monkeypatch.setitem(app.conf, "broker_transport_options", {})
    # No result backend: in a pool child Task.retry's publish never touches it (joins would
    # block there), and here the configured one would be the embedded SQLite file under var/.
    monkeypatch.setattr(app, "_backend_cache", DisabledBackend(app))
    _forget_broker_connections(app)
    previous = current_app._get_current_object()
    app.set_current()  # Message.current finds the task through current_app, as in a child
    yield app
    previous.set_current()
    _forget_broker_connections(app)
    worker_db.dispose_engine()


def _forget_broker_connections(app: Celery) -> None:
    # Celery keeps its producer pool for the broker it first connected to: another test in this
    # process may have made one for a broker of its own. (Not closed: kombu keeps one pool per
    # broker URL for the process, and the next test on this Redis index takes it up again.)
    app._pool = None
    app.amqp._producer_pool = None


def message(name: str, *args: Any, retries: int = 0) -> Message:
    """A message of `name` as the Strategy hands it to the runner (group_commit._message)."""
    from worker.app import app

    task_id = str(uuid.uuid4())
    built = app.amqp.as_task_v2(task_id, name, args=list(args), kwargs={}, retries=retries)
    request = {k: v for k, v in built.headers.items() if v is not None}
    request.update(
        delivery_info={"exchange": "", "routing_key": "celery", "priority": 0},
        correlation_id=task_id,
        hostname="test@runner",
    )
    return Message(task_id, name, list(args), {}, request)


def stored(engine: sa.Engine, id: str) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = connection.execute(
            sa.text("SELECT topic, revision, deleted_at FROM writing_session WHERE id = :id"),
            {"id": id},
        ).one_or_none()
    return None if row is None else dict(row._mapping)


def dead_letters(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT task_name, task_id, payload, error_type, error, attempts "
                "FROM dead_letter ORDER BY id"
            )
        )
        return [dict(row._mapping) for row in rows]


def published(redis_url: str) -> list[dict[str, Any]]:
    """The envelopes waiting on the `celery` queue, in the order they will be consumed."""
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw) for raw in reversed(client.lrange("celery", 0, -1))]
    finally:
        client.close()


def outcomes(decisions: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [
        (state, value["outcome"] if state == states.SUCCESS else type(value).__name__)
        for state, value in decisions
    ]


# -- writes --------------------------------------------------------------------------------


def test_valid_saves_of_a_group_are_created_each_with_its_own_result(project, db):
    from worker.group_runner import run_group

    sessions = [new_session(revision=1) for _ in range(3)]

    decisions = run_group([message(SAVE, session) for session in sessions])

    assert decisions == [
        (states.SUCCESS, {"id": session["id"], "outcome": "created", "revision": 1})
        for session in sessions
    ]
    assert all(stored(db, session["id"])["revision"] == 1 for session in sessions)
    assert count_rows(db) == 3


def test_rows_of_one_id_in_a_group_are_decided_by_revision_as_one_by_one(project, db):
    from worker.group_runner import run_group

    id = str(uuid.uuid4())
    revisions = [(1, "one"), (3, "three"), (2, "two"), (3, "three again")]

    decisions = run_group(
        [message(SAVE, {"id": id, "topic": topic, "revision": rev}) for rev, topic in revisions]
    )

    assert [(value["outcome"], value["revision"]) for _, value in decisions] == [
        ("created", 1),
        ("updated", 3),
        ("stale", 3),
        ("duplicate", 3),
    ]
    assert stored(db, id) == {"topic": "three", "revision": 3, "deleted_at": None}


def test_an_invalid_payload_is_a_dead_letter_naming_the_field_and_the_others_are_written(
    project, db
):
    from worker.group_runner import run_group

    good, other = new_session(), new_session()
    bad = message(SAVE, {"id": str(uuid.uuid4()), "topic": "   "})

    decisions = run_group([message(SAVE, good), bad, message(SAVE, other)])

    assert outcomes(decisions) == [
        (states.SUCCESS, "created"),
        (states.FAILURE, "InvalidPayloadError"),
        (states.SUCCESS, "created"),
    ]
    assert "topic: must not be empty" in str(decisions[1][1])
    (letter,) = dead_letters(db)
    assert letter["task_name"] == SAVE and letter["task_id"] == bad.id
    assert letter["error_type"] == "InvalidPayloadError"
    assert letter["error"].startswith("topic:")
    assert letter["attempts"] == 1
    assert json.loads(letter["payload"]) == {"args": bad.args, "kwargs": {}}
    assert stored(db, good["id"]) is not None and stored(db, other["id"]) is not None


def test_arguments_of_the_wrong_shape_are_a_dead_letter_naming_them(project, db):
    from worker.group_runner import run_group

    wrong = message(SAVE, new_session(), "one too many")

    decisions = run_group([wrong, message(DELETE, str(uuid.uuid4()))])

    assert [state for state, _ in decisions] == [states.FAILURE, states.FAILURE]
    errors = [letter["error"] for letter in dead_letters(db)]
    assert errors[0].startswith("arguments:") and "expected: writing_session" in errors[0]
    assert errors[1].startswith("arguments:") and "revision" in errors[1]
    assert count_rows(db) == 0


def test_a_delete_in_a_group_leaves_a_tombstone(project, db):
    from worker.group_runner import run_group

    kept, gone = new_session(revision=1), new_session(revision=1)
    run_group([message(SAVE, kept), message(SAVE, gone)])

    decisions = run_group(
        [
            message(DELETE, gone["id"], 2),
            message(DELETE, kept["id"], 0),
            message(SAVE, new_session()),
        ]
    )

    assert outcomes(decisions) == [
        (states.SUCCESS, "deleted"),
        (states.SUCCESS, "stale"),  # revision 0 is older than the stored 1
        (states.SUCCESS, "created"),
    ]
    tombstone = stored(db, gone["id"])
    assert tombstone["topic"] is None and tombstone["deleted_at"] is not None
    assert tombstone["revision"] == 2
    assert stored(db, kept["id"])["deleted_at"] is None


def test_a_save_and_a_delete_of_one_id_in_a_group_end_as_sent_one_after_the_other(project, db):
    from worker.group_runner import run_group

    session = new_session(revision=1)

    decisions = run_group(
        [
            message(SAVE, session),
            message(DELETE, session["id"], 2),
            message(SAVE, {**session, "revision": 2}),  # the same revision as the delete
        ]
    )

    assert outcomes(decisions) == [
        (states.SUCCESS, "created"),
        (states.SUCCESS, "deleted"),
        (states.SUCCESS, "duplicate"),
    ]
    assert stored(db, session["id"])["deleted_at"] is not None


# -- failed attempts -----------------------------------------------------------------------


def test_a_group_killed_at_its_hard_time_limit_retries_each_message_or_dead_letters_it(
    project, db, redis_url
):
    from worker.group_runner import run_group

    save = project.tasks[SAVE]
    fresh = message(SAVE, new_session(), retries=0)
    spent = message(SAVE, new_session(), retries=save.max_retries)  # its last attempt
    again = message(DELETE, str(uuid.uuid4()), 1, retries=3)

    decisions = run_group([fresh, spent, again], failed=TimeLimitExceeded(30))

    assert [state for state, _ in decisions] == [states.RETRY, states.FAILURE, states.RETRY]
    retry = decisions[0][1]
    assert isinstance(retry, Retry) and isinstance(retry.exc, TransientError)
    assert "TimeLimitExceeded" in str(retry.exc)
    assert isinstance(decisions[1][1], TransientError)
    # With `failed` set the runner only settles the attempt: nothing is written.
    assert count_rows(db) == 0
    (letter,) = dead_letters(db)
    assert (letter["task_id"], letter["attempts"]) == (spent.id, save.max_retries + 1)
    assert letter["error_type"] == "TransientError"
    # Each retry is the same message again, one attempt more, after a backoff (Task.retry).
    sent = {envelope["headers"]["id"]: envelope["headers"] for envelope in published(redis_url)}
    assert set(sent) == {fresh.id, again.id}
    assert sent[fresh.id]["retries"] == 1 and sent[again.id]["retries"] == 4
    # Full jitter: up to 2^retries seconds (0 is a valid draw, and then no ETA is sent).
    assert 0 <= retry.when <= 1 and 0 <= decisions[2][1].when <= 2**3


def test_a_database_that_is_away_retries_every_message_of_the_group(
    project, db, redis_url, monkeypatch
):
    from worker import db as worker_db
    from worker.group_runner import run_group

    # Nothing listens on port 1: the connection is refused at once, a transient fault.
    away = "postgresql+psycopg2://postgres@127.0.0.1:1/nowhere"
    monkeypatch.setattr(
        worker_db, "settings", dataclasses.replace(worker_db.settings, database_url=away)
    )
    worker_db.dispose_engine()
    messages = [message(SAVE, new_session()), message(SAVE, {"id": "not a uuid"})]

    decisions = run_group(messages)

    # Even the invalid one: its dead letter would need the database that is away.
    assert [state for state, _ in decisions] == [states.RETRY, states.RETRY]
    assert {envelope["headers"]["id"] for envelope in published(redis_url)} == {
        sent.id for sent in messages
    }
    assert count_rows(db) == 0 and dead_letters(db) == []


def test_the_runner_gives_one_decision_per_message_in_order(project, db):
    from worker.group_runner import run_group

    messages = [
        message(SAVE, new_session()) if n % 3 else message(SAVE, {"topic": "no id"})
        for n in range(10)
    ]

    decisions = run_group(messages)

    assert len(decisions) == len(messages)
    for n, (state, value) in enumerate(decisions):
        if n % 3:
            assert (state, value["id"]) == (states.SUCCESS, messages[n].args[0]["id"])
        else:
            assert state == states.FAILURE and isinstance(value, InvalidPayloadError)
    assert [letter["task_id"] for letter in dead_letters(db)] == [
        messages[n].id for n in (0, 3, 6, 9)
    ]
