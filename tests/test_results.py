"""celery_ext/results.py: Celery's Redis result backend, storing a result in one script call."""

from __future__ import annotations

import json
import uuid

import redis

from tests.conftest import run_python


def test_redis_result_backend_keeps_a_success_and_publishes_each_store(redis_url, env, tmp_path):
    # A real worker-side backend, in a process of its own configured like a worker.
    task_id = str(uuid.uuid4())
    code = f"""
from worker.app import app
from worker.celery_ext.results import RedisBackend
backend = app.backend
assert type(backend) is RedisBackend, type(backend)
backend.store_result({task_id!r}, None, "STARTED")
backend.store_result({task_id!r}, {{"outcome": "created"}}, "SUCCESS")
# A redelivered copy of the task must not overwrite the SUCCESS (Celery's rule, kept).
backend.store_result({task_id!r}, None, "STARTED")
backend.store_result({task_id!r}, RuntimeError("late"), "FAILURE")
print("ok")
"""
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    key = f"celery-task-meta-{task_id}"
    pubsub.subscribe(key)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    assert "ok" in run_python(code, env=env, cwd=tmp_path).stdout
    meta = json.loads(client.get(key))
    assert meta["status"] == "SUCCESS" and meta["result"] == {"outcome": "created"}
    assert meta["task_id"] == task_id
    assert 0 < client.ttl(key) <= 24 * 3600
    published = []
    while (message := pubsub.get_message(timeout=2)) is not None:
        published.append(json.loads(message["data"])["status"])
    # Both writes that happened were published (a waiting producer hears them); the refused
    # ones were not.
    assert published == ["STARTED", "SUCCESS"]
    pubsub.close()
    client.close()


def test_results_stored_for_a_group_are_what_celery_stores_for_each(redis_url, env, tmp_path):
    ids = [str(uuid.uuid4()) for _ in range(6)]
    code = f"""
from celery.backends.redis import RedisBackend as CeleryRedisBackend
from worker.app import app
ids = {ids!r}
outcomes = [({{"outcome": "created"}}, "SUCCESS"), (ValueError("topic: required"), "FAILURE"),
            (None, "RETRY")]
# Celery's own store, message by message; the group's, at once.
celerys = CeleryRedisBackend(app=app, url=app.conf.result_backend)
for task_id, (result, state) in zip(ids[:3], outcomes):
    celerys.store_result(task_id, result, state)
app.backend.store_results([(task_id, result, state) for task_id, (result, state)
                           in zip(ids[3:], outcomes)])
print("ok")
"""
    assert "ok" in run_python(code, env=env, cwd=tmp_path).stdout
    client = redis.Redis.from_url(redis_url)
    metas = [json.loads(client.get(f"celery-task-meta-{task_id}")) for task_id in ids]
    for celerys, ours in zip(metas[:3], metas[3:], strict=True):
        assert celerys.keys() == ours.keys()
        different = {key for key in celerys if celerys[key] != ours[key]}
        assert different <= {"task_id", "date_done"}, (celerys, ours)
        assert (celerys["date_done"] is None) == (ours["date_done"] is None)
