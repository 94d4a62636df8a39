"""Group commit: the `save` and `delete` messages waiting in a worker are written together.

Celery hands each message to a pool child as a job of its own: per message a pipe round trip
to a child, a transaction, a result write. Here the tasks' Strategy (selected on the tasks in
tasks/writing_sessions.py) builds Celery's own Request for each message in the main process, as
Celery's default strategy does, but instead of sending it to the pool it buffers it; at the end
of the event-loop turn that delivered it (or at GROUP_LIMIT messages) the buffer goes to the pool
as one job. Groups form only from what is already waiting: one message on an idle worker is
written at once.

In the child, `run_group` validates every message on its own, writes the valid ones in one
transaction through the same revision rule and upsert as save_many (`store.write_group`),
dead-letters each invalid one, stores every result in one round trip and logs one line per
message. Back in the main process each message gets what Celery gives it: its task events
(received, started, succeeded/failed/retried), its result, and its acknowledgement, only after
the group committed. A group whose child dies is requeued at once (task_reject_on_worker_lost);
a group that fails on a transient fault is retried message by message, with backoff.

Celery-batches (PyPI 0.11) has this shape but acknowledges failed batches, sends no per-message
events or results, and leaves a killed child's messages unacknowledged; see issue 14. The
Celery internals used here (the Strategy signature, Request and its handlers, the pool's
apply_async callbacks) are pinned in pyproject.toml and checked by tests/test_pins.py.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import signals, states
from celery.exceptions import TimeLimitExceeded
from celery.utils.imports import symbol_by_name
from celery.worker.request import create_request_cls
from celery.worker.state import task_ready, task_reserved

from worker import store
from worker.db import check_for_leak, task_db
from worker.errors import InvalidPayloadError, TransientError, one_line
from worker.logs import log_outcome
from worker.results import store_results
from worker.schemas import parse_delete, parse_writing_session
from worker.settings import settings
from worker.task import backoff, is_transient, log_retry
from worker.times import utcnow
from worker.upsert import Row, Tombstone

logger = logging.getLogger(__name__)

# A group holds at most this many messages: one transaction, one pool job.
GROUP_LIMIT = 500


@dataclass(frozen=True)
class Item:
    """One message of a group, as the pool child needs it."""

    task_id: str
    task_name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retries: int
    root_id: str | None
    parent_id: str | None


# What the child reports for each message: (state, value, runtime). value: the result for
# SUCCESS, the error for FAILURE and RETRY, None for REQUEUE.
Report = tuple[str, Any, float]
REQUEUE = "REQUEUE"


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """The Strategy of writing_sessions.save and .delete: Celery's, with group commit."""
    from celery.worker.strategy import default

    celery_default = default(task, app, consumer, **kwargs)
    if consumer.hub is None:
        return celery_default  # no event loop (the embedded broker): one message at a time
    grouper = _grouper(consumer)
    hostname = consumer.hostname
    eventer = consumer.event_dispatcher
    task_sends_events = eventer and eventer.enabled and task.send_events
    revoked_tasks = consumer.controller.state.revoked
    Request = create_request_cls(
        symbol_by_name(task.Request), task, consumer.pool, hostname, eventer, app=app
    )
    utc = app.uses_utc_timezone()

    def task_message_handler(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **options: Any
    ) -> Any:
        headers = message.headers
        if body is not None or headers.get("eta") or "args" in message.payload:
            # Protocol 1, a countdown (retries) or a hybrid message: Celery's own path.
            return celery_default(message, body, ack, reject, callbacks, **options)
        request = Request(
            message,
            on_ack=ack,
            on_reject=reject,
            app=app,
            hostname=hostname,
            eventer=eventer,
            task=task,
            connection_errors=consumer.connection_errors,
            body=message.body,
            headers=headers,
            decoded=False,
            utc=utc,
        )
        if (request.expires or request.id in revoked_tasks) and request.revoked():
            return None
        signals.task_received.send(sender=consumer, request=request)
        if task_sends_events:
            eventer.send(
                "task-received",
                uuid=request.id,
                name=request.name,
                args=request.argsrepr,
                kwargs=request.kwargsrepr,
                root_id=request.root_id,
                parent_id=request.parent_id,
                retries=request.request_dict.get("retries", 0),
                eta=None,
                expires=request.expires and request.expires.isoformat(),
            )
        task_reserved(request)
        if callbacks:
            for callback in callbacks:
                callback(request)
        grouper.add(request)
        return None

    return task_message_handler


_groupers: weakref.WeakKeyDictionary[Any, Grouper] = weakref.WeakKeyDictionary()


def _grouper(consumer: Any) -> Grouper:
    # One buffer per consumer, shared by the save and delete strategies.
    if consumer not in _groupers:
        _groupers[consumer] = Grouper(consumer)
    return _groupers[consumer]


class Grouper:
    """Buffers Requests in the main process and hands the pool one job per group."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.buffered: list[Any] = []

    def add(self, request: Any) -> None:
        """Buffer a request; the group goes out after this turn of the loop, or when full."""
        self.buffered.append(request)
        if len(self.buffered) >= GROUP_LIMIT:
            self.flush()
        elif len(self.buffered) == 1:
            self.consumer.hub.call_soon(self.flush)

    def flush(self) -> None:
        """Send the buffered requests to the pool: one job per process, GROUP_LIMIT at most."""
        waiting = [request for request in self.buffered if not request.revoked()]
        self.buffered = []
        processes = max(1, getattr(self.consumer.pool, "num_processes", 1) or 1)
        size = min(GROUP_LIMIT, -(-len(waiting) // processes))
        for start in range(0, len(waiting), size or 1):
            group = waiting[start : start + size]
            try:
                self._send(group)
            except Exception:
                # The pool refused the job (it is shutting down, say): back on the queue.
                logger.exception("could not hand a group of %d messages to the pool", len(group))
                for request in group:
                    task_ready(request)
                    request.reject(requeue=True)

    def _send(self, group: list[Any]) -> None:
        items = [
            Item(
                task_id=request.id,
                task_name=request.name,
                args=tuple(request.args),
                kwargs=dict(request.kwargs),
                retries=request.request_dict.get("retries") or 0,
                root_id=request.root_id,
                parent_id=request.parent_id,
            )
            for request in group
        ]
        hard, soft = group[0].time_limits
        task = group[0].task
        result = self.consumer.pool.apply_async(
            run_group,
            args=(items,),
            accept_callback=lambda pid, accepted: _each(group, "on_accepted", pid, accepted),
            timeout_callback=lambda soft, timeout: _on_timeout(group, soft, timeout),
            callback=lambda reports: _on_reports(group, reports),
            error_callback=lambda exc_info: _on_pool_error(group, exc_info),
            soft_timeout=soft or task.soft_time_limit,
            timeout=hard or task.time_limit,
            correlation_id=group[0].id,
        )
        # For `revoke --terminate`, as Celery's own Request.execute_using_pool keeps it. The
        # solo pool runs the job at once and returns nothing.
        reference = weakref.ref(result) if result is not None else None
        for request in group:
            request._apply_result = reference


def _each(group: list[Any], handler: str, *args: Any) -> None:
    for request in group:
        getattr(request, handler)(*args)


def _on_reports(group: list[Any], reports: list[Report]) -> None:
    """Settle each message of a group that ran: events, state, acknowledgement."""
    for request, (state, value, runtime) in zip(group, reports, strict=True):
        if state == states.SUCCESS:
            request.on_success((False, value, runtime))  # value: the result's repr
            continue
        task_ready(request)
        if state == REQUEUE:
            request.reject(requeue=True)
            continue
        request.acknowledge()
        event = "task-failed" if state == states.FAILURE else "task-retried"
        request.send_event(event, exception=value, traceback="")


def _on_timeout(group: list[Any], soft: bool, timeout: float) -> None:
    level = logging.WARNING if soft else logging.ERROR
    logger.log(
        level,
        "%s time limit (%ss) exceeded by a group of %d messages (first %s)",
        "soft" if soft else "hard",
        timeout,
        len(group),
        group[0].id,
    )


def _on_pool_error(group: list[Any], exc_info: ExceptionInfo) -> None:
    """The child died or was killed: the group's messages go back on the queue at once."""
    if isinstance(exc_info.exception, TimeLimitExceeded):
        # Killed at the hard time limit: nothing was committed. Requeue rather than drop.
        for request in group:
            task_ready(request)
            request.reject(requeue=True)
        return
    _each(group, "on_failure", exc_info)  # WorkerLostError: task_reject_on_worker_lost


# -- in the pool child ---------------------------------------------------------------------

# What the child decided for one message: (state, value): the result dict for SUCCESS, the
# exception for FAILURE and RETRY, None for REQUEUE.
Decision = tuple[str, Any]


def parse_row(item: Item, now: Any) -> Row:
    """The row a message asks for; InvalidPayloadError names what is wrong."""
    from worker.app import app

    arguments = app.tasks[item.task_name].check_arguments(item.args, item.kwargs)
    if item.task_name == "writing_sessions.delete":
        target = parse_delete(arguments["id"], arguments["revision"])
        return Tombstone(id=target.id, revision=target.revision, deleted_at=now)
    return parse_writing_session(arguments["writing_session"])


def run_group(items: list[Item]) -> list[Report]:
    """Write a group of messages in one transaction; one report per message, in order."""
    started = time.perf_counter()
    now = utcnow()
    rows: list[Row | InvalidPayloadError] = []
    for item in items:
        try:
            rows.append(parse_row(item, now))
        except InvalidPayloadError as exc:
            rows.append(exc)
    try:
        decisions = _write(items, rows, now)
    except Exception as exc:
        if is_transient(exc):
            decisions = _retry_or_dead_letter(items, exc)
        else:
            # A bug, not bad input: each message alone, so that only its own fails.
            decisions = [
                _write_alone(item, row, now) for item, row in zip(items, rows, strict=True)
            ]
    runtime = time.perf_counter() - started
    check_for_leak(f"a group of {len(items)} messages (first {items[0].task_id})")
    _store_and_log(items, decisions, runtime)
    # What the main process needs: the result's repr for the task-succeeded event (a small
    # dict of ours: repr is safe), the error for the others.
    return [
        (state, repr(value) if state == states.SUCCESS else value and _error(value), runtime)
        for state, value in decisions
    ]


def _write(items: list[Item], rows: list[Row | InvalidPayloadError], now: Any) -> list[Decision]:
    """One transaction: the valid rows by the revision rule, a dead letter for each other."""
    valid = [index for index, row in enumerate(rows) if not isinstance(row, Exception)]
    decisions: list[Decision] = []
    try:
        with task_db() as db:
            written = store.write_group(db, [rows[index] for index in valid], now)  # type: ignore[misc]
            results: dict[int, Any] = dict(zip(valid, written, strict=True))
            for index, row in enumerate(rows):
                result = results.get(index, row)
                if isinstance(result, Exception):
                    _add_dead_letter(db, items[index], result)
                    decisions.append((states.FAILURE, result))
                else:
                    decisions.append((states.SUCCESS, result.as_dict()))
    except Exception as exc:
        if len(items) > 1 or is_transient(exc):
            raise
        # The one message of a bug's fallback: keep it for a replay once the bug is fixed.
        with task_db() as db:
            _add_dead_letter(db, items[0], exc)
        return [(states.FAILURE, exc)]
    return decisions


def _write_alone(item: Item, row: Row | InvalidPayloadError, now: Any) -> Decision:
    """One message of a group that failed on a bug; a transient fault meanwhile retries it."""
    try:
        return _write([item], [row], now)[0]
    except Exception as exc:
        if not is_transient(exc):
            raise
        return _retry_or_dead_letter([item], exc)[0]


def _retry_or_dead_letter(items: list[Item], exc: Exception) -> list[Decision]:
    """A transient fault: each message retried with backoff, or dead-lettered once out of
    retries (and retried at the cap if even that fails), as WritingSessionsTask does."""
    from worker.app import app

    error = TransientError(one_line(exc))
    exhausted = {item.task_id for item in items if item.retries >= settings.max_retries}
    lettered = False
    if exhausted:
        try:
            with task_db() as db:
                for item in items:
                    if item.task_id in exhausted:
                        _add_dead_letter(db, item, error)
            lettered = True
        except Exception as letter_exc:
            if not is_transient(letter_exc):
                raise
            # The database still refuses even the dead letters: keep them on the broker.
    decisions: list[Decision] = []
    with app.producer_or_acquire() as producer:
        for item in items:
            if item.task_id in exhausted and lettered:
                decisions.append((states.FAILURE, error))
                continue
            countdown = (
                settings.retry_backoff_max if item.task_id in exhausted else backoff(item.retries)
            )
            try:
                app.send_task(
                    item.task_name,
                    args=item.args,
                    kwargs=item.kwargs,
                    task_id=item.task_id,
                    retries=item.retries + 1,
                    countdown=countdown,
                    root_id=item.root_id,
                    parent_id=item.parent_id,
                    producer=producer,
                )
            except Exception as send_exc:
                logger.warning("could not send the retry of %s: %s", item.task_id, send_exc)
                decisions.append((REQUEUE, None))
                continue
            log_retry(item.retries + 1, countdown, error, item.task_id in exhausted)
            decisions.append((states.RETRY, error))
    return decisions


def _add_dead_letter(db: Any, item: Item, error: Exception) -> None:
    letter = store.add_dead_letter(
        db,
        task_name=item.task_name,
        task_id=item.task_id,
        args=item.args,
        kwargs=item.kwargs,
        error_type=type(error).__name__,
        error=str(error),
        attempts=item.retries + 1,
    )
    logger.warning(
        "dead letter %s for task %s[%s]: %s", letter.id, item.task_name, item.task_id, error
    )


def _error(exc: Exception) -> str:
    """An exception as Celery shows it in task events (and so in Flower)."""
    return f"{type(exc).__name__}({str(exc)!r})"


def _store_and_log(items: list[Item], decisions: list[Decision], runtime: float) -> None:
    from worker.app import app

    store_results(
        app.backend,
        [
            (item.task_id, value, state)
            for item, (state, value) in zip(items, decisions, strict=True)
            if state != REQUEUE
        ],
    )
    for item, (state, value) in zip(items, decisions, strict=True):
        log_outcome(item.task_id, item.task_name, item.args, value, state, runtime)
