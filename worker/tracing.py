"""OpenTelemetry tracing (`WRITING_SESSIONS_TRACING=1`, the `otel` extra), from the producer's
send to the SQL that wrote the row.

The official instrumentations do most of it. CeleryInstrumentor, on Celery's signals, injects the
trace context into each message's headers at publish (producers, and retries published by the
worker) and opens a consumer span per message, the child of its producer's span; group commit
fires each message's own signals with its own headers (worker/celery_ext/group_commit.py), so
that holds on the grouped path too. SQLAlchemyInstrumentor spans each statement under the span
current when it runs.

What a group needs besides (this module): a group's statements run once for all its messages,
and a span has one parent. `group_write` opens one span for the group's transaction, the child of
its first message's consumer span, linked to every member's consumer span (and each of those to
it), so the SQL hangs under it once and every message's trace leads to it. A member settled on
its own (a retry, a dead letter) runs under its own consumer span (`current`), so a retry's
message carries its own trace on. Each consumer span gets the session id, the outcome and the
group size as attributes.

Exporters come from the standard variables: OTEL_TRACES_EXPORTER (`otlp`, the default, is
OTLP over HTTP: OTEL_EXPORTER_OTLP_ENDPOINT; `console`; `none`), OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*. A process that already set a tracer provider (a producer
application with its own OpenTelemetry set-up) keeps it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from celery import signals, states

from worker.errors import ConfigurationError
from worker.logs import message_outcome, session_id

#: Span attributes this project adds to each message's consumer span.
SESSION_ID = "writing_sessions.session_id"
OUTCOME = "writing_sessions.outcome"
GROUP_SIZE = "writing_sessions.group_size"

_set_up = False


def setup() -> None:
    """Turn tracing on in this process (once): tracer provider, Celery instrumentation."""
    global _set_up
    if _set_up:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigurationError(
            "WRITING_SESSIONS_TRACING=1 needs the otel extra: pip install 'writing-sessions[otel]'"
        ) from exc
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME") or "writing-sessions"}
        )
        provider = TracerProvider(resource=resource)
        for exporter in _exporters():
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()
    # Wraps sqlalchemy.create_engine: every engine made from now on (worker/db.py makes each
    # lazily, on first use) spans its statements. The instrumentation declares "sqlalchemy <
    # 2.1" and would do nothing on 2.1, whose engine events it uses are unchanged:
    # tests/test_tracing.py proves the spans.
    SQLAlchemyInstrumentor().instrument(enable_commenter=False, skip_dep_check=True)
    signals.task_success.connect(_succeeded, weak=False)
    signals.task_failure.connect(_failed, weak=False)
    signals.task_retry.connect(_retried, weak=False)
    signals.worker_process_shutdown.connect(_flush, weak=False)
    signals.worker_shutdown.connect(_flush, weak=False)
    _set_up = True


def group_write(messages: Sequence[Any]) -> Any:
    """The span of a group's transaction (a context manager; nothing when tracing is off)."""
    if not _set_up:
        return nullcontext()
    return _group_span(messages)


def current(message: Any) -> Any:
    """Make this message's consumer span the current one (a context manager)."""
    if not _set_up:
        return nullcontext()
    from opentelemetry import trace

    span = _consumer_span(message.name, message.id)
    return trace.use_span(span, end_on_exit=False) if span is not None else nullcontext()


@contextmanager
def _group_span(messages: Sequence[Any]) -> Iterator[None]:
    from opentelemetry import trace

    spans = [_consumer_span(message.name, message.id) for message in messages]
    members = [span for span in spans if span is not None and span.is_recording()]
    for span in members:
        span.set_attribute(GROUP_SIZE, len(messages))
    parent = trace.set_span_in_context(members[0]) if members else None
    tracer = trace.get_tracer(__name__)
    with tracer.start_as_current_span(
        "writing_sessions write group",
        context=parent,
        kind=trace.SpanKind.INTERNAL,
        links=[trace.Link(span.get_span_context()) for span in members],
        attributes={"messaging.batch.message_count": len(messages), GROUP_SIZE: len(messages)},
    ) as group:
        for span in members[1:]:
            span.add_link(group.get_span_context())
        yield


def _consumer_span(task_name: str, task_id: str) -> Any:
    from celery import current_app
    from opentelemetry.instrumentation.celery import utils

    found = utils.retrieve_context(current_app.tasks.get(task_name), task_id)
    return found[0] if found else None


def _annotate(task: Any, outcome: str) -> None:
    request = task.request
    span = _consumer_span(task.name, request.id)
    if span is None or not span.is_recording():
        return
    ws_id = session_id(task.name, request.args)
    if ws_id:
        span.set_attribute(SESSION_ID, ws_id)
    span.set_attribute(OUTCOME, outcome)
    if not span.attributes.get(GROUP_SIZE):
        span.set_attribute(GROUP_SIZE, 1)


def _succeeded(sender: Any, result: Any = None, **_: Any) -> None:
    _annotate(sender, message_outcome(result, states.SUCCESS))


def _failed(sender: Any, **_: Any) -> None:
    _annotate(sender, message_outcome(None, states.FAILURE))


def _retried(sender: Any, **_: Any) -> None:
    _annotate(sender, message_outcome(None, states.RETRY))


def _flush(**_: Any) -> None:
    # A pool child leaves by os._exit: no atexit handler sends its last spans.
    from opentelemetry import trace

    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        flush(5000)


def _exporters() -> list[Any]:
    from importlib.metadata import entry_points

    names = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").replace(" ", "").split(",")
    exporters = []
    for name in filter(None, names):
        if name == "none":
            continue
        if name == "otlp":
            name = "otlp_proto_http"  # the OTLP exporter the extra ships
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER names {name!r}, which no installed package provides"
            )
        exporters.append(next(iter(found)).load()())
    return exporters
