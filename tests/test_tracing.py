"""OpenTelemetry: one trace per message from the producer's send to the SQL that wrote it.

A real producer and a real prefork worker, both with WRITING_SESSIONS_TRACING=1, export over
OTLP/HTTP to a collector stand-in this test serves; the backlog is queued before the worker
starts, so groups really form.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import count_rows, run_python, wait_for
from tests.test_retries import allow_writes, refuse_writes

PRODUCER = """
import json, sys
from worker.producer import send_writing_session
count = int(sys.argv[1])
print(json.dumps([send_writing_session(topic="traced", content=f"{n}").id for n in range(count)]))
"""


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    service: str


class Collector:
    """An OTLP/HTTP trace receiver: what the exporters of both processes send lands here."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.receive(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def receive(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received = Span(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=span.kind,
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        service=str(resource.get("service.name")),
                    )
                    with self.lock:
                        self.spans.append(received)

    def named(self, prefix: str) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span.name.startswith(prefix)]

    def by_id(self) -> dict[str, Span]:
        with self.lock:
            return {span.span_id: span for span in self.spans}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture
def collector() -> Iterator[Collector]:
    collector = Collector()
    yield collector
    collector.close()


@pytest.fixture
def traced_env(env: dict[str, str], collector: Collector) -> dict[str, str]:
    return {
        **env,
        "WRITING_SESSIONS_TRACING": "1",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def send(traced_env: dict[str, str], count: int, tmp_path: Any) -> list[str]:
    """Send `count` sessions from a traced producer process; their task ids."""
    sent = run_python(PRODUCER, str(count), env=traced_env, cwd=tmp_path)
    return json.loads(sent.stdout)


def consumer_spans(collector: Collector, ids: list[str], outcome: str) -> dict[str, Span]:
    """Each message's consumer span with that outcome, once all of them arrived."""
    spans = {
        span.attributes.get("messaging.message.id"): span
        for span in collector.named("run/writing_sessions.save")
        if span.attributes.get("writing_sessions.outcome") == outcome
    }
    return spans if set(ids) <= set(spans) else {}


def producer_spans(collector: Collector) -> dict[str, list[Span]]:
    spans: dict[str, list[Span]] = {}
    for span in collector.named("apply_async/writing_sessions.save"):
        spans.setdefault(span.attributes["messaging.message.id"], []).append(span)
    return spans


@pytest.mark.parametrize("group_commit", ["1", "0"])
def test_each_message_is_one_trace_from_the_producers_send_to_the_sql_that_wrote_it(
    db, traced_env, collector, start_worker, tmp_path, group_commit
):
    ids = send(traced_env, 60, tmp_path)  # queued before the worker starts: groups form
    start_worker(
        extra_env={**traced_env, "WRITING_SESSIONS_GROUP_COMMIT": group_commit}, concurrency=2
    )

    consumers = wait_for(lambda: consumer_spans(collector, ids, "created"), 60, "60 consumer spans")
    assert count_rows(db) == 60
    writes = wait_for(
        lambda: collector.named("writing_sessions write group") if group_commit == "1" else [1],
        30,
        "the group write spans",
    )
    producers = producer_spans(collector)
    spans = collector.by_id()
    inserts = [
        span
        for span in spans.values()
        if "INSERT INTO writing_session" in str(span.attributes.get("db.statement", ""))
    ]
    group_sizes = []
    for task_id in ids:
        (sent,) = producers[task_id]
        consumer = consumers[task_id]
        # One trace per message: the producer's span is the root, the consumer span its child.
        assert sent.parent_id == "" and sent.service == "writing-sessions"
        assert (consumer.trace_id, consumer.parent_id) == (sent.trace_id, sent.span_id)
        assert consumer.attributes["writing_sessions.session_id"]
        group_sizes.append(consumer.attributes["writing_sessions.group_size"])
        # ... and its SQL: under its own span, or under the group's write span it links to.
        if group_commit == "0":
            assert [s for s in inserts if s.parent_id == consumer.span_id], task_id
        else:
            # The group's write span links to each member; the first member is its parent,
            # every other member links back to it.
            (write,) = [w for w in writes if (consumer.trace_id, consumer.span_id) in w.links]
            assert (
                write.parent_id == consumer.span_id
                or (
                    write.trace_id,
                    write.span_id,
                )
                in consumer.links
            )
            assert [s for s in inserts if s.parent_id == write.span_id], task_id
            assert write.attributes["writing_sessions.group_size"] == group_sizes[-1]
    if group_commit == "1":
        assert max(group_sizes) > 1, group_sizes  # the backlog was written in groups
        assert sum(write.attributes["writing_sessions.group_size"] for write in writes) == 60
    else:
        assert set(group_sizes) == {1}
    assert len({consumer.trace_id for consumer in consumers.values()}) == 60


def test_a_retry_continues_the_messages_own_trace(
    db, traced_env, collector, start_worker, tmp_path
):
    refuse_writes(db, "writing_session")
    try:
        ids = send(traced_env, 12, tmp_path)
        start_worker(
            extra_env={
                **traced_env,
                "WRITING_SESSIONS_MAX_RETRIES": "1",
                "WRITING_SESSIONS_RETRY_BACKOFF_MAX": "1",
            }
        )
        retried = wait_for(lambda: consumer_spans(collector, ids, "retry"), 60, "first attempts")
        failed = wait_for(lambda: consumer_spans(collector, ids, "failure"), 60, "last attempts")
    finally:
        allow_writes(db)

    assert count_rows(db, "dead_letter") == 12
    producers = producer_spans(collector)
    for task_id in ids:
        first, last = retried[task_id], failed[task_id]
        sends = {span.span_id: span for span in producers[task_id]}
        # The retry was published from the first attempt's span, in the same trace, and the
        # second attempt is its child: producer -> attempt 1 -> retry's send -> attempt 2.
        resend = sends[last.parent_id]
        assert resend.parent_id == first.span_id
        assert sends[first.parent_id].parent_id == ""
        assert first.trace_id == resend.trace_id == last.trace_id
    assert len({span.trace_id for span in failed.values()}) == 12
