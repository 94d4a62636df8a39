"""Group commit (worker/grouping.py): waiting save and delete messages are written together,
and each message still gets its own outcome, result, events, dead letter and acknowledgement."""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict

import pytest
import redis

from tests.conftest import (
    ROOT,
    count_rows,
    inspect,
    new_session,
    run_python,
    send_save,
    service_env,
    wait_for,
)
from tests.test_events import _task_batches, events  # noqa: F401  (a fixture)


def pool_jobs(env: dict[str, str], worker) -> int:
    """How many jobs the worker's main process has handed its pool (celery inspect stats)."""
    return int(inspect(env, worker, "stats")["pool"]["writes"]["total"])


def test_500_waiting_saves_with_one_bad_are_written_in_groups_each_with_its_own_outcome(
    events,  # noqa: F811
    db,
    env,
    producer,
    start_worker,
):
    payloads = [new_session(revision=1) for _ in range(500)]
    payloads[250] = {"id": str(uuid.uuid4()), "topic": "   "}
    results = [send_save(producer, payload) for payload in payloads]  # waiting before it starts

    worker = start_worker(concurrency=2)
    outcomes = [result.get(timeout=120, propagate=False) for result in results]
    seen: dict[str, list[str]] = defaultdict(list)

    def every_final_event() -> bool:
        for batch in _task_batches(events):
            for event in batch:
                seen[event["uuid"]].append(event["type"])
        finals = [kind for kinds in seen.values() for kind in kinds if kind in FINAL]
        return len(finals) >= 500

    wait_for(every_final_event, 30, "a final event for each of the 500 messages")

    assert count_rows(db) == 499
    assert count_rows(db, "dead_letter") == 1
    assert [result.state for result in results].count("SUCCESS") == 499
    assert results[250].state == "FAILURE"
    assert "topic: must not be empty" in str(outcomes[250])
    assert Counter(o["outcome"] for i, o in enumerate(outcomes) if i != 250) == {"created": 499}
    assert all(o["revision"] == 1 for i, o in enumerate(outcomes) if i != 250)
    kinds = Counter(kind for kinds in seen.values() for kind in kinds)
    assert kinds["task-succeeded"] == 499 and kinds["task-failed"] == 1
    assert kinds["task-received"] == 500 and kinds["task-started"] == 500
    assert all(len(seen[result.id]) == 3 for result in results)
    jobs = pool_jobs(env, worker)
    assert jobs <= 100, f"{jobs} pool jobs for 500 waiting messages: not grouped"
    assert worker.log().count("outcome=") == 500


FINAL = ("task-succeeded", "task-failed")


def test_saves_and_deletes_of_one_id_in_a_group_end_as_they_would_one_by_one(
    db, producer, start_worker
):
    id = str(uuid.uuid4())
    sent = [
        ("writing_sessions.save", [{"id": id, "topic": "one", "revision": 1}]),
        ("writing_sessions.save", [{"id": id, "topic": "three", "revision": 3}]),
        ("writing_sessions.delete", [id, 2]),
        ("writing_sessions.save", [{"id": id, "topic": "three again", "revision": 3}]),
        ("writing_sessions.delete", [id, 3]),
    ]
    results = [producer.send_task(name, args=args) for name, args in sent]

    start_worker(concurrency=1)
    outcomes = [result.get(timeout=60) for result in results]

    assert [(o["outcome"], o["revision"]) for o in outcomes] == [
        ("created", 1),
        ("updated", 3),
        ("stale", 3),
        ("duplicate", 3),
        ("duplicate", 3),
    ]
    with db.connect() as connection:
        topic = connection.exec_driver_sql(
            "SELECT topic FROM writing_session WHERE id = %s", (id,)
        ).scalar_one()
    assert topic == "three"


def test_one_message_on_an_idle_worker_is_written_at_once_in_a_group_of_its_own(
    db, env, producer, start_worker
):
    worker = start_worker(concurrency=2)
    before = pool_jobs(env, worker)

    result = send_save(producer, new_session())

    assert result.get(timeout=30)["outcome"] == "created"
    assert pool_jobs(env, worker) == before + 1


def test_at_info_each_message_logs_one_line_and_celerys_own_lines_move_to_debug(
    db, producer, start_worker
):
    worker = start_worker(concurrency=1)

    for result in [send_save(producer, new_session()) for _ in range(3)]:
        result.get(timeout=30)

    # A child stores a group's results, then logs its lines: poll for the third line.
    log = wait_for(
        lambda: (text := worker.log()).count("outcome=created") == 3 and text, 10, "3 lines"
    )
    assert log.count("outcome=created") == 3
    assert "] received" not in log and "succeeded in" not in log


BUG_THEN_OUTAGE = """
import json, sys
from worker import store
from worker.app import app
from worker.celery_ext.group_commit import Message, run_group
from worker.errors import TransientError
calls = []

def write_group(db, rows, now):
    calls.append(len(rows))
    if len(calls) == 1:
        raise ValueError("a bug that only the whole group meets")
    raise TransientError("the database went away")

store.write_group = write_group
app.loader.import_default_modules()  # the tasks, as a worker registers them
def message(n, session):
    request = {"id": f"task-{n}", "task": "writing_sessions.save", "retries": 0,
               "delivery_info": {"exchange": "", "routing_key": "celery"}}
    return Message(f"task-{n}", "writing_sessions.save", [session], {}, request)

messages = [message(n, session) for n, session in enumerate(json.loads(sys.argv[1]))]
states = [state for state, _, _ in run_group("worker.group_runner:run_group", messages)]
print(json.dumps({"states": states, "calls": calls}))
"""


@pytest.mark.quick
def test_a_transient_fault_while_a_failed_group_is_split_retries_each_message(
    database_url, redis_url
):
    env = service_env(
        DATABASE_URL=database_url, CELERY_BROKER_URL=redis_url, CELERY_RESULT_BACKEND=redis_url
    )
    sessions = [new_session(), new_session()]

    printed = run_python(BUG_THEN_OUTAGE, json.dumps(sessions), env=env, cwd=ROOT)

    decided = json.loads(printed.stdout.splitlines()[-1])
    assert decided["states"] == ["RETRY", "RETRY"]
    assert decided["calls"] == [2, 1, 1]  # the group, then each message alone
    broker = redis.Redis.from_url(redis_url)
    retried = [json.loads(raw)["headers"] for raw in broker.lrange("celery", 0, -1)]
    broker.close()
    assert sorted(h["id"] for h in retried) == ["task-0", "task-1"]
    assert {h["retries"] for h in retried} == {1}
