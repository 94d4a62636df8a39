"""The grouped path and the per-task path (group commit off) end the same for the same mix:
rows, dead letters, result states and task event kinds (tests/differential.py draws the mixes)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, service_env, wait_for
from tests.differential import mixes, snapshot
from tests.test_events import _task_batches
from tests.test_malformed import MALFORMED, queue_settled


@pytest.mark.quick
def test_many_mixes_end_the_same_through_the_group_runner_and_the_per_task_body(
    database_url, redis_url
):
    env = service_env(
        DATABASE_URL=database_url, CELERY_BROKER_URL=redis_url, CELERY_RESULT_BACKEND=redis_url
    )
    checked = subprocess.run(
        [sys.executable, "-m", "tests.differential", "150"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert checked.returncode == 0, checked.stderr[-5000:]
    assert json.loads(checked.stdout.splitlines()[-1]) == {"examples": 150, "differences": 0}


def run_through_a_worker(
    mix: list[Any], malformed: list[str], group_commit: str, engine: sa.Engine, redis_url: str,
    start_worker: Any,
) -> dict[str, Any]:  # fmt: skip
    """Queue the mix (and raw malformed messages) before a worker starts; what it ends in."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.set("writing-sessions-test-claim", "1")  # the redis_url fixture's claim, kept
    with engine.begin() as connection:
        connection.execute(sa.text("TRUNCATE writing_session, dead_letter RESTART IDENTITY"))
    events = client.pubsub()
    events.psubscribe(f"/{redis_url.rsplit('/', 1)[1]}.celeryev/*")
    producer = Celery("differential", broker=redis_url, backend=redis_url)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    ids = []
    for n, (name, args, kwargs) in enumerate(mix):
        producer.send_task(name, args=args, kwargs=kwargs, task_id=f"task-{n}")
        ids.append(f"task-{n}")
        if n < len(malformed):
            client.lpush("celery", malformed[n])
    for raw in malformed[len(mix) :]:  # more malformed messages than valid ones were drawn
        client.lpush("celery", raw)
    # One process: messages run in the order sent on both paths. (With more, equal revisions of
    # one id with different contents race on either path alike: the first stored wins.)
    worker = start_worker(concurrency=1, extra_env={"WRITING_SESSIONS_GROUP_COMMIT": group_commit})
    states = {}
    for task_id in ids:
        result = producer.AsyncResult(task_id)
        result.get(timeout=60, propagate=False)
        states[task_id] = result.state
    wait_for(lambda: queue_settled(redis_url), 30, "the queue to empty")
    wait_for(lambda: _letters(engine) >= len(malformed), 30, "the malformed ones' letters")
    kinds: dict[str, Counter] = defaultdict(Counter)

    def every_final_event() -> bool:
        for batch in _task_batches(events):
            for event in batch:
                kinds[event["uuid"]][event["type"]] += 1
        finals = sum(kinds[i]["task-succeeded"] + kinds[i]["task-failed"] for i in ids)
        return finals >= len(ids)

    wait_for(every_final_event, 30, "a final event per message")
    worker.stop()
    events.close()
    producer.close()
    client.close()
    found = snapshot(engine)
    # Malformed messages have no stable task id of their own: compare their letters by error.
    found["letters"] = sorted(found["letters"], key=lambda letter: (letter[4], letter[2]))
    return {**found, "states": states, "events": {i: dict(kinds[i]) for i in ids}}


def _letters(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.text("SELECT count(*) FROM dead_letter")).scalar_one())


@settings(
    max_examples=2,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mix=mixes(max_size=40), malformed=st.lists(st.sampled_from(MALFORMED), max_size=4))
def test_a_mix_queued_before_a_worker_ends_the_same_grouped_and_per_task(
    mix, malformed, engine, redis_url, start_worker
):
    raw = [entry[1] for entry in malformed]

    grouped = run_through_a_worker(mix, raw, "1", engine, redis_url, start_worker)
    per_task = run_through_a_worker(mix, raw, "0", engine, redis_url, start_worker)

    for key in ("rows", "letters", "states", "events"):
        assert grouped[key] == per_task[key], key
