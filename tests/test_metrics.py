"""Prometheus metrics (worker/metrics.py): counted in the pool children, served by the main
process, with the broker's and the database's gauges read at each scrape."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import new_session, send_save, wait_for
from tests.faults import free_port
from tests.test_broker import QUEUE, Received, drain, hold_and_die, ours, publish
from worker.celery_ext import broker
from worker.metrics import Backlog

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(port: int) -> Samples | None:
    """GET /metrics of a worker; None while nothing serves the port yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return parse(reply.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None


def collect(collector: Backlog) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def waiting(samples: Samples, queue: str = "celery") -> float:
    return sum(
        count
        for (name, labels), count in samples.items()
        if name == "writing_sessions_queue_messages" and ("queue", queue) in labels
    )


def outcomes(samples: Samples) -> dict[str, float]:
    """writing_sessions_messages_total of the save task, by outcome."""
    return {
        dict(labels)["outcome"]: count
        for (name, labels), count in samples.items()
        if name == "writing_sessions_messages_total"
        and dict(labels).get("task") == "writing_sessions.save"
    }


@pytest.fixture
def stamping_producer(redis_url: str) -> Iterator[Celery]:
    """A producer on this project's transport (celeryconfig's broker_transport for redis://)."""
    app = Celery("test-stamping-producer", broker=redis_url)
    app.conf.update(
        broker_transport="worker.celery_ext.broker:Transport",
        task_serializer="json",
        accept_content=["json"],
    )
    yield app
    app.close()


def test_a_drained_backlog_shows_in_the_metrics_of_a_prefork_worker(producer, start_worker):
    for _ in range(1500):
        send_save(producer, new_session())
    for _ in range(7):
        send_save(producer, {"id": str(uuid.uuid4())})  # no topic: dead-lettered
    port = free_port()
    scrapes: list[Samples] = []

    def drained() -> bool:
        samples = scrape(port)
        if samples is not None:
            scrapes.append(samples)
        return (
            samples is not None
            and sum(outcomes(samples).values()) == 1507
            and (waiting(samples) == 0 and value(samples, "writing_sessions_unacked_messages") == 0)
        )

    start_worker(
        concurrency=2, wait_ready=False, extra_env={"WRITING_SESSIONS_METRICS_PORT": str(port)}
    )
    wait_for(drained, 120, "the worker's metrics to show the backlog drained")
    last = scrapes[-1]

    assert max(waiting(samples) for samples in scrapes) > 0
    assert waiting(last) == 0 and value(last, "writing_sessions_unacked_messages") == 0
    assert outcomes(last) == {"created": 1500, "failure": 7}
    assert value(last, "writing_sessions_dead_letters", state="pending") == 7
    assert value(last, "writing_sessions_dead_letters", state="replayed") == 0
    assert value(last, "writing_sessions_group_size_sum") == 1507
    assert value(last, "writing_sessions_group_size_count") < 1507  # some group held several
    assert value(last, "writing_sessions_heartbeat_restores_total") == 0
    assert value(last, "writing_sessions_oldest_message_age_seconds", queue="celery") == 0
    assert value(last, "writing_sessions_scrape_errors_total", source="broker") == 0
    assert value(last, "writing_sessions_scrape_errors_total", source="database") == 0


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_workers_without_child_processes_serve_their_metrics_too(pool, producer, start_worker):
    port = free_port()
    start_worker(pool=pool, extra_env={"WRITING_SESSIONS_METRICS_PORT": str(port)})

    for _ in range(20):
        send_save(producer, new_session())
    last = wait_for(
        lambda: (samples := scrape(port)) and sum(outcomes(samples).values()) == 20 and samples,
        60,
        "20 outcomes in the metrics",
    )

    assert outcomes(last) == {"created": 20}
    assert waiting(last) == 0


@pytest.mark.unit
def test_the_oldest_age_is_that_of_the_stamp_on_the_waiting_message(
    stamping_producer, redis_url, database_url, db
):
    before = time.time()
    send_save(stamping_producer, new_session())
    sent = time.time()
    envelope = json.loads(redis.Redis.from_url(redis_url).lindex("celery", -1))
    stamp = envelope["properties"][broker.ENQUEUED_AT]
    wait_for(lambda: time.time() - stamp >= 0.5, 5, "the message to be half a second old")

    collector = Backlog(stamping_producer, database_url, "writing-sessions:test:metrics")
    collected = collect(collector)
    collected_by = time.time()

    assert before <= stamp <= sent
    age = value(collected, "writing_sessions_oldest_message_age_seconds", queue="celery")
    assert age is not None and 0.5 <= age <= collected_by - stamp
    assert value(collected, "writing_sessions_queue_messages", queue="celery", priority="0") == 1
    assert value(collected, "writing_sessions_unacked_messages") == 0
    assert value(collected, "writing_sessions_dead_letters", state="pending") == 0


@pytest.mark.unit
def test_a_message_without_a_stamp_ages_from_when_the_collector_first_saw_it(
    producer, stamping_producer, redis_url, database_url, db
):
    send_save(producer, new_session())  # kombu's own transport: no stamp
    envelope = json.loads(redis.Redis.from_url(redis_url).lindex("celery", -1))
    collector = Backlog(stamping_producer, database_url, "writing-sessions:test:metrics")
    first_seen = time.time()

    first = collect(collector)
    wait_for(lambda: time.time() - first_seen >= 0.5, 5, "half a second")
    later = collect(collector)
    later_by = time.time()

    assert broker.ENQUEUED_AT not in envelope["properties"]
    assert value(first, "writing_sessions_oldest_message_age_seconds", queue="celery") < 0.5
    age = value(later, "writing_sessions_oldest_message_age_seconds", queue="celery")
    assert age is not None and 0.5 <= age <= later_by - first_seen + 0.1


@pytest.mark.unit
def test_an_unreadable_broker_or_database_counts_a_scrape_error_and_the_scrape_goes_on():
    app = Celery("test-unreachable", broker="redis://127.0.0.1:1/0")
    app.conf.broker_transport = "worker.celery_ext.broker:Transport"
    collector = Backlog(app, "postgresql+psycopg2://postgres@127.0.0.1:1/none", "test")

    collect(collector)
    collected = collect(collector)

    assert value(collected, "writing_sessions_scrape_errors_total", source="broker") == 2
    assert value(collected, "writing_sessions_scrape_errors_total", source="database") == 2
    names = {name for name, _ in collected}
    assert names == {"writing_sessions_scrape_errors_total"}


def test_on_rabbitmq_the_queue_depth_comes_from_a_passive_declare(rabbit, database_url, db):
    app = Celery("test-rabbit-producer", broker=rabbit.url)
    for _ in range(3):
        app.send_task("writing_sessions.save", args=[new_session()])
    collector = Backlog(app, database_url, "writing-sessions:test:metrics")

    collected = collect(collector)

    assert value(collected, "writing_sessions_queue_messages", queue="celery", priority="") == 3
    assert value(collected, "writing_sessions_unacked_messages") is None  # rabbitmq_prometheus'
    assert value(collected, "writing_sessions_scrape_errors_total", source="broker") == 0
    app.close()


@pytest.mark.unit
def test_messages_restored_from_a_silent_consumer_are_signalled_with_their_count(private_redis):
    restored: list[int] = []

    def count(count: int, **_: Any) -> None:
        restored.append(count)

    broker.messages_restored.connect(count)
    publish(private_redis.url, 5)
    hold_and_die(private_redis.url, "worker.celery_ext.broker:Transport", 5)
    received = Received()

    try:
        with (
            ours(
                private_redis.url, consumer_heartbeat_timeout=2, consumer_heartbeat_interval=0.5
            ) as connection,
            connection.Consumer([QUEUE], callbacks=[received], prefetch_count=10, accept=["json"]),
        ):
            drain(connection, lambda: len(received.messages) == 5, timeout=20)
    finally:
        broker.messages_restored.disconnect(count)

    assert sum(restored) == 5
