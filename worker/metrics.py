"""Prometheus metrics of a worker: counted where the work happens, served by its main process.

With `WRITING_SESSIONS_METRICS_PORT` set, `worker_init` (in the main process, before the pool
forks) switches prometheus_client to its multiprocess mode in a private directory, makes the
counters, and serves `/metrics` on that port. Pool children inherit the counters and write them
to files of their own, which the main process sums at each scrape, so a child's counts outlive
it. Queue depth, unacknowledged messages, the oldest message's age and the dead letters are read
from the broker and the database at scrape time (`Backlog`). docs/operating.md, "Metrics", lists
the metrics and the alerts built on them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from celery import signals
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select, text

from worker.celery_ext import broker
from worker.db import make_engine
from worker.logs import message_outcome
from worker.models import DeadLetter
from worker.settings import settings

logger = logging.getLogger(__name__)

#: Group commit hands a child at most GROUP_LIMIT (500) messages at once.
GROUP_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
#: A scrape waits at most this long for the dead-letter count (Prometheus waits 10 s by default).
STATEMENT_TIMEOUT_MS = 2000


class _Counters:
    """The counted metrics; made once multiprocess mode is on, so that each writes to a file."""

    def __init__(self) -> None:
        # registry=None: the multiprocess collector reads them from their files, not from here.
        self.messages = Counter(
            "writing_sessions_messages",
            "Messages run, by task and outcome (created, updated, duplicate, stale, deleted; "
            "else the final state: failure, retry, success for save_many)",
            ["task", "outcome"],
            registry=None,
        )
        self.batch_items = Counter(
            "writing_sessions_batch_items",
            "Writing sessions of save_many messages, by outcome (rejected: dead-lettered)",
            ["outcome"],
            registry=None,
        )
        self.retries = Counter(
            "writing_sessions_retries", "Retries scheduled, by task", ["task"], registry=None
        )
        self.group_size = Histogram(
            "writing_sessions_group_size",
            "Messages per group that group commit wrote in one transaction",
            buckets=GROUP_SIZE_BUCKETS,
            registry=None,
        )
        self.heartbeat_restores = Counter(
            "writing_sessions_heartbeat_restores",
            "Messages of silent consumers put back on their queues by this worker",
            registry=None,
        )


@dataclass
class _Served:
    server: Any
    port: int
    directory: str
    pid: int


_counters: _Counters | None = None
_served: _Served | None = None


def observe_group(size: int) -> None:
    """Count a group handed to the group runner (worker/group_runner.py); no-op without metrics."""
    if _counters is not None:
        _counters.group_size.observe(size)


@signals.worker_init.connect
def _serve(sender: Any = None, **_: Any) -> None:
    if settings.metrics_port is not None:
        serve(sender.app, settings.metrics_port, getattr(sender, "hostname", None) or "worker")


def serve(app: Any, port: int, node: str) -> None:
    """Turn multiprocess counting on and serve /metrics on `port` (the main process, pre-fork)."""
    global _counters, _served
    directory = tempfile.mkdtemp(prefix="writing-sessions-metrics-")
    # prometheus_client's interface, not a setting: each value file goes to this directory,
    # in this process and the children that inherit the variable.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # prometheus_client picks its value class when first imported, and the celery command had
    # imported it already (Flower's command plugin does), without the variable: single-process
    # values, whose counts stay in each child. Metrics made from here on write to files.
    values.ValueClass = values.MultiProcessValue()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    registry.register(Backlog(app, settings.database_url, f"writing-sessions:{node}:metrics"))
    try:
        server, _thread = start_http_server(port, registry=registry)
    except OSError as exc:
        logger.error("no metrics: cannot serve on port %d: %s", port, exc)
        shutil.rmtree(directory, ignore_errors=True)
        return
    _served = _Served(server, port, directory, os.getpid())
    _counters = _Counters()


@signals.worker_ready.connect
def _say_where(**_: Any) -> None:
    # Not at worker_init: the worker's logging is set up after it.
    if _served is not None:
        logger.info("Prometheus metrics on port %d, path /metrics", _served.port)


@signals.worker_process_init.connect
def _close_the_inherited_socket(**_: Any) -> None:
    # A child (forked after the server started) holds a copy of the listening socket: a main
    # process killed with -9 would leave its port taken until every child is gone.
    if _served is not None and os.getpid() != _served.pid:
        _served.server.socket.close()


@signals.worker_shutdown.connect
def _stop_serving(**_: Any) -> None:
    global _served, _counters
    if _served is None or os.getpid() != _served.pid:
        return
    _served.server.shutdown()
    _served.server.server_close()
    shutil.rmtree(_served.directory, ignore_errors=True)
    _served = _counters = None


@signals.task_postrun.connect
def _count_outcome(
    task: Any = None, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    if _counters is None:
        return
    # A save_many result counts its sessions per outcome: counted apart, as items.
    if isinstance(retval, dict) and "outcome" not in retval:
        for kind, count in retval.items():
            if isinstance(count, int) and count > 0:
                _counters.batch_items.labels(outcome=kind).inc(count)
    _counters.messages.labels(task=task.name, outcome=message_outcome(retval, state)).inc()


@signals.task_retry.connect
def _count_retry(sender: Any = None, **_: Any) -> None:
    if _counters is not None:
        _counters.retries.labels(task=sender.name).inc()


def _count_restored(count: int = 0, **_: Any) -> None:
    if _counters is not None:
        _counters.heartbeat_restores.inc(count)


broker.messages_restored.connect(_count_restored, weak=False)


class Backlog(Collector):
    """Gauges read at each scrape: what waits on the broker, and the dead letters.

    Every worker reports the same values (they are the broker's and the database's, not its
    own). A source that cannot be read leaves its gauges out of that scrape, adds one to
    `writing_sessions_scrape_errors_total{source}` and logs a warning; the scrape goes on.
    """

    def __init__(self, app: Any, database_url: str, application_name: str) -> None:
        self._app = app
        self._database_url = database_url
        self._application_name = application_name
        self._lock = threading.Lock()  # scrapes run in threads of their own
        self._connection: Any = None
        self._channel: Any = None
        self._engine: Engine | None = None
        # (queue, priority) -> (the message at its head, when this collector first saw it there)
        self._first_seen: dict[tuple[str, int], tuple[int, float]] = {}
        self._errors = {"broker": 0, "database": 0}

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families = self._read("broker", self._broker) + self._read("database", self._database)
            errors = CounterMetricFamily(
                "writing_sessions_scrape_errors",
                "Scrapes that could not read the broker or the database",
                labels=["source"],
            )
            for source, count in self._errors.items():
                errors.add_metric([source], count)
        yield from families
        yield errors

    def _read(self, source: str, read: Callable[[], list[Metric]]) -> list[Metric]:
        try:
            return read()
        except Exception as exc:  # counted and logged: a scrape outlives its sources
            self._errors[source] += 1
            logger.warning("metrics: could not read the %s: %r", source, exc)
            return []

    # -- the broker -------------------------------------------------------------------------

    def _broker(self) -> list[Metric]:
        amqp_queues = self._app.amqp.queues
        queues = sorted(amqp_queues.consume_from or amqp_queues)
        try:
            channel = self._open_channel()
            if isinstance(channel, broker.Channel):
                return self._redis(channel, queues)
            return self._declared(channel, queues)
        except Exception:
            self._close_channel()
            raise

    def _open_channel(self) -> Any:
        if self._channel is None:
            connection = self._app.connection_for_read()
            try:
                connection.ensure_connection(max_retries=0)  # one attempt: a scrape waits
                self._channel = connection.channel()
            except Exception:
                connection.release()
                raise
            self._connection = connection
        return self._channel

    def _close_channel(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception as exc:  # already broken; the next scrape opens a new one
                logger.debug("metrics: closing the broker connection: %r", exc)

    def _redis(self, channel: broker.Channel, queues: list[str]) -> list[Metric]:
        lists, unacked = channel.waiting(queues)
        now = time.time()
        depth = _queue_depth()
        oldest: dict[str, float] = {}
        heads: set[tuple[str, int]] = set()
        for queue, priority, length, head in lists:
            depth.add_metric([queue, str(priority)], length)
            if head is not None:
                heads.add((queue, priority))
                enqueued = self._enqueued_at(queue, priority, head, now)
                oldest[queue] = min(oldest.get(queue, now), enqueued)
        for key in set(self._first_seen) - heads:
            del self._first_seen[key]
        age = GaugeMetricFamily(
            "writing_sessions_oldest_message_age_seconds",
            "Age of the oldest of the messages each priority of the queue delivers next "
            "(0: nothing waits)",
            labels=["queue"],
        )
        for queue in queues:
            age.add_metric([queue], max(0.0, now - oldest.get(queue, now)))
        held = GaugeMetricFamily(
            "writing_sessions_unacked_messages",
            "Messages delivered to consumers of this broker and not yet acknowledged",
            value=unacked,
        )
        return [depth, held, age]

    def _enqueued_at(self, queue: str, priority: int, raw: bytes, now: float) -> float:
        """When the message `raw` was sent (its stamp); for one without a stamp (sent through
        another transport), when this collector first saw it at the head of its list."""
        try:
            stamp = json.loads(raw)["properties"].get(broker.ENQUEUED_AT)
        except (ValueError, KeyError, TypeError, AttributeError):
            stamp = None
        if isinstance(stamp, int | float):
            self._first_seen.pop((queue, priority), None)
            return float(stamp)
        identity = hash(raw)
        seen = self._first_seen.get((queue, priority))
        if seen is None or seen[0] != identity:
            seen = self._first_seen[queue, priority] = (identity, now)
        return seen[1]

    def _declared(self, channel: Any, queues: list[str]) -> list[Metric]:
        # RabbitMQ (and kombu's other transports): a passive declare says how many messages are
        # ready. Unacknowledged counts and ages come from RabbitMQ's own rabbitmq_prometheus.
        depth = _queue_depth()
        for queue in queues:
            declared = channel.queue_declare(queue=queue, passive=True)
            depth.add_metric([queue, ""], declared.message_count)
        return [depth]

    # -- the database -----------------------------------------------------------------------

    def _database(self) -> list[Metric]:
        if self._engine is None:
            self._engine = make_engine(self._database_url, self._application_name)
        try:
            with self._engine.connect() as connection:
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
                    )
                total, replayed = connection.execute(
                    select(func.count(), func.count(DeadLetter.replayed_at)).select_from(DeadLetter)
                ).one()
        finally:
            # No connection outlives a scrape: the main process holds none while it forks.
            self._engine.dispose()
        letters = GaugeMetricFamily(
            "writing_sessions_dead_letters",
            "Dead letters kept, by state (pending: not replayed yet)",
            labels=["state"],
        )
        letters.add_metric(["pending"], total - replayed)
        letters.add_metric(["replayed"], replayed)
        return [letters]


def _queue_depth() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "writing_sessions_queue_messages",
        "Messages waiting in each queue the worker consumes, by priority step (Redis lists)",
        labels=["queue", "priority"],
    )
