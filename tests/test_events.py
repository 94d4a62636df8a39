"""Task events: every one reaches Flower's channel, published in batches
(worker/celery_ext/consumer.py)."""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from collections.abc import Iterator

import pytest
import redis
from redis.client import PubSub

from tests.conftest import new_session, send_save, wait_for


@pytest.fixture
def events(redis_url: str) -> Iterator[PubSub]:
    """A subscription to every event published on the test's Redis database."""
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    # kombu's Redis fanout publishes to "/<db>.<exchange>/<routing key>".
    pubsub.psubscribe(f"/{redis_url.rsplit('/', 1)[1]}.celeryev/*")
    yield pubsub
    pubsub.close()
    client.close()


def _task_batches(pubsub: PubSub) -> list[list[dict]]:
    """The task-event messages published so far, each as its list of events."""
    batches = []
    while (message := pubsub.get_message(timeout=0.01)) is not None:
        if message["type"] != "pmessage" or not message["channel"].endswith(b"/task.multi"):
            continue
        envelope = json.loads(message["data"])
        batches.append(json.loads(base64.b64decode(envelope["body"])))
    return batches


def test_every_task_event_arrives_in_batches(events, db, producer, start_worker):
    start_worker(concurrency=2)
    results = [send_save(producer, new_session()) for _ in range(30)]
    for result in results:
        assert result.get(timeout=30)["outcome"] == "created"
    seen: dict[str, set[str]] = defaultdict(set)
    batches: list[list[dict]] = []

    def all_seen() -> bool:
        for batch in _task_batches(events):
            batches.append(batch)
            for event in batch:
                seen[event["uuid"]].add(event["type"])
        return all(len(seen[r.id]) == 3 for r in results)

    # The last events go out within the flush interval, with no later event to push them.
    wait_for(all_seen, 10, "received, started and succeeded events of 30 tasks")
    for result in results:
        assert seen[result.id] == {"task-received", "task-started", "task-succeeded"}
    total = sum(len(batch) for batch in batches)
    assert total == 90
    # Batched: about one publish per event before worker/celery_ext/consumer.py.
    assert len(batches) <= total // 4, [len(batch) for batch in batches]


def test_the_last_events_are_published_on_warm_shutdown(
    events, db, producer, start_worker, tmp_path
):
    # A flush interval far longer than a warm shutdown takes: the task-succeeded event is still
    # in the buffer when the worker stops, and only the consumer's shutdown can publish it.
    (tmp_path / "slow_event_flush.py").write_text(
        "import worker.celery_ext.consumer\nworker.celery_ext.consumer.EVENT_FLUSH_SECONDS = 30.0\n"
    )
    worker = start_worker(concurrency=1, args=("-I", "slow_event_flush"), cwd=tmp_path)
    result = send_save(producer, new_session())
    assert result.get(timeout=30)["outcome"] == "created"
    assert worker.stop() == 0
    types = set()

    def succeeded_seen() -> bool:
        for batch in _task_batches(events):
            types.update(event["type"] for event in batch if event["uuid"] == result.id)
        return "task-succeeded" in types

    wait_for(succeeded_seen, 10, "the task-succeeded event")
