"""Group commit for Celery: messages of a task waiting in a worker run as one pool job.

Celery hands each message to a pool child as a job of its own. This Strategy (a task's
`Strategy = "worker.celery_ext.group_commit:strategy"`) builds Celery's own Request for each
message in the main process, as Celery's default strategy does, but buffers it instead; a pool
process that is free takes what waits as one job (at the end of the event-loop turn that
delivered it, or at once when the task's `group_limit` is reached), which calls the task's
`group_runner` (a dotted path to `runner(messages, failed) -> [(state, value), ...]`) once for
the whole group. Groups form while the previous ones are written, as a database's group commit
does, on any broker: one message on an idle worker runs at once, alone. A task with
`group_messages = False` keeps Celery's path, one job per message, but its runner still settles
its hard time limits (see Request).

A group member's fate is its own; the group is an optimisation of settling each message:

- In the child each message gets Celery's task signals (task_prerun before the runner,
  task_success / task_failure / task_retry and task_postrun after it, each with the message's
  own request pushed on its task, headers included) and its own result; in the main process its
  own task events and its own acknowledgement, after the runner returned.
- A runner that raises is the group's failure, not its members': the group is split and each
  message runs alone, so only the message that causes it fails.
- A child that dies requeues the group (task_reject_on_worker_lost). A terminated member (Flower's
  Terminate: revoke with terminate=True) is revoked alone; the rest of its group runs again at
  once. A group killed at its hard time limit goes back to the runner with `failed` set, so each
  message counts an attempt (retry or dead letter, as the runner decides), never an endless
  requeue. Messages with different time limits never share a group.
- Messages Celery must handle itself (protocol 1, an ETA or countdown, callbacks, errbacks, chains
  and chords) take Celery's own path; so does everything when the worker has no event loop (the
  embedded broker) or the task says `group_messages = False` (group commit switched off).
- A retry (headers.retries > 0) runs alone on Celery's path too, even with no countdown (full
  jitter can draw 0 s): a valid message retried beside the one that hung its group must not
  share that message's next hard time limit and spend an attempt on it again.

Whatever a message contains, the Strategy either builds a Request or raises InvalidTaskError,
which the consumer turns into a malformed-message record (consumer.py beside it): a body that is
not `[args, kwargs, embed]`, args that are not a list, kwargs or embed that are not mappings,
header values Celery cannot use. Stock Celery 5.7's default Strategy raises ValueError or
TypeError on these, which its consumer does not catch: "Unrecoverable error", and the worker
stops.

Celery-batches (PyPI 0.11) has the buffering shape but acknowledges failed batches, sends no
per-message events, results or signals, and leaves a killed child's messages unacknowledged.
The Celery internals used here (the Strategy signature, Request and its handlers, the pool's
apply_async callbacks, billiard's job exceptions) are pinned by tests/test_pins.py. Delete this
module if Celery grows a grouping Strategy that settles each message on its own.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery import current_app, signals, states
from celery.app.task import Context
from celery.exceptions import InvalidTaskError, Retry
from celery.utils.imports import symbol_by_name
from celery.worker.request import Request as CeleryRequest
from celery.worker.request import create_request_cls
from celery.worker.state import task_ready, task_reserved

from worker.celery_ext.results import store_results

logger = logging.getLogger(__name__)

#: A group holds at most this many messages (a task's `group_limit` overrides it).
GROUP_LIMIT = 500

#: A runner's states: Celery's SUCCESS, FAILURE and RETRY (value: the result, the exception, the
#: Retry of Task.retry(throw=False)), and REJECTED (value ignored): back on the queue.
REQUEUE = states.REJECTED


@dataclass
class Message:
    """One message of a group, as the runner in the pool child sees it."""

    id: str
    name: str
    args: Sequence[Any]
    kwargs: dict[str, Any]
    #: Celery's request dict of the message (its headers, delivery info and embed), from which
    #: Celery's trace builds `task.request`.
    request: dict[str, Any]
    _context: Any = field(default=None, repr=False, compare=False)

    @property
    def retries(self) -> int:
        """How many times this message was retried before."""
        return int(self.request.get("retries") or 0)

    @property
    def context(self) -> Context:
        """The task request (`task.request`) of this message, as Celery's trace makes it."""
        if self._context is None:
            # Its custom headers given, Context skips finding them by popping each of its own
            # attribute names from a copy of the request: most of its cost.
            headers = {k: v for k, v in self.request.items() if k not in _CONTEXT_KEYS}
            self._context = Context(
                self.request,
                args=self.args,
                kwargs=self.kwargs,
                called_directly=False,
                is_eager=False,
                headers=headers,
            )
        return self._context

    @contextmanager
    def current(self) -> Iterator[Any]:
        """Yield this message's task with this message as its `task.request` (Task.retry
        reads it, so a retry keeps the message's id, headers and options)."""
        task = current_app.tasks[self.name]
        task.request_stack.push(self.context)
        try:
            yield task
        finally:
            task.request_stack.pop()


# What Context._get_custom_headers leaves out of a request's custom headers.
_CONTEXT_KEYS = frozenset(
    (*Context.__dict__, "lang", "task", "argsrepr", "kwargsrepr", "compression")
)

# What a runner returns for each message: (state, value).
Decision = tuple[str, Any]
# What the child reports to the main process for each message: (state, value's repr or the
# error as Celery's events show it, runtime).
Report = tuple[str, Any, float]


@dataclass(frozen=True)
class GroupFailed:
    """The runner raised for the group as a whole: the main process splits it."""

    error: str


# -- the main process ----------------------------------------------------------------------


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default Strategy, with group commit and malformed messages made InvalidTaskError."""
    from celery.worker.strategy import default

    celery_default = default(task, app, consumer, **kwargs)
    runner: str = getattr(task, "group_runner", None) or ""
    grouper = _grouper(consumer) if runner else None
    # Without an event loop (the embedded broker) nothing marks the end of a delivery: no groups.
    grouping = bool(grouper and consumer.hub and getattr(task, "group_messages", True))
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
        check_headers(headers)
        payload = message.payload  # decodes: DecodeError / ContentDisallowed go to the consumer
        if body is not None or (isinstance(payload, dict) and "args" in payload):
            check_protocol1(body if body is not None else payload)
            return _celerys_path(celery_default, message, body, ack, reject, callbacks, options)
        embed = check_body(payload)
        if not grouping or headers.get("eta") or headers.get("retries") or _needs_celery(embed):
            return _celerys_path(celery_default, message, body, ack, reject, callbacks, options)
        try:
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
        except InvalidTaskError:
            raise
        except Exception as exc:
            raise InvalidTaskError(f"cannot make a task request of the message: {exc!r}") from exc
        if (request.expires or request.id in revoked_tasks) and _revoked(request):
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
        grouper.add(request)  # type: ignore[union-attr]  # grouping: there is one
        return None

    return task_message_handler


def _celerys_path(
    celery_default: Any,
    message: Any,
    body: Any,
    ack: Any,
    reject: Any,
    callbacks: Any,
    options: Any,
) -> Any:
    # The message passed the checks above; what Celery's Request still cannot use of it is the
    # message's fault too (stock Celery would stop the worker on it).
    try:
        return celery_default(message, body, ack, reject, callbacks, **options)
    except InvalidTaskError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise InvalidTaskError(f"cannot make a task request of the message: {exc!r}") from exc


def check_headers(headers: Any) -> None:
    """Raise InvalidTaskError unless the protocol-2 headers Celery reads have usable types."""
    if not isinstance(headers, dict):
        raise InvalidTaskError(f"headers: must be a mapping, got {type(headers).__name__}")
    if "task" not in headers:
        return  # protocol 1: the body says
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise InvalidTaskError(f"headers.id: must be a non-empty string, got {task_id!r:.80}")
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(v is None or (isinstance(v, int | float) and v > 0) for v in limits)
    ):
        raise InvalidTaskError(f"headers.timelimit: must be [hard, soft], got {limits!r:.80}")
    retries = headers.get("retries")
    if retries is not None and (not isinstance(retries, int) or retries < 0):
        raise InvalidTaskError(f"headers.retries: must be a whole number, got {retries!r:.80}")


def check_body(payload: Any) -> dict[str, Any]:
    """The embed of a protocol-2 body `[args, kwargs, embed]`; InvalidTaskError names what is
    wrong with it."""
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        got = f"{len(payload)} items" if isinstance(payload, list | tuple) else _kind(payload)
        raise InvalidTaskError(f"body: must be [args, kwargs, embed], got {got}")
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        raise InvalidTaskError(f"body: args must be a list, got {_kind(args)}")
    if not isinstance(kwargs, dict):
        raise InvalidTaskError(f"body: kwargs must be a mapping, got {_kind(kwargs)}")
    if embed is not None and not isinstance(embed, dict):
        raise InvalidTaskError(f"body: embed must be a mapping, got {_kind(embed)}")
    return embed or {}


def check_protocol1(body: Any) -> None:
    """Raise InvalidTaskError unless a protocol-1 body has list args and mapping kwargs."""
    if not isinstance(body, dict):
        raise InvalidTaskError(f"body: must be a mapping, got {_kind(body)}")
    if not isinstance(body.get("args", ()), list | tuple):
        raise InvalidTaskError(f"body: args must be a list, got {_kind(body.get('args'))}")
    if not isinstance(body.get("kwargs", {}), dict):
        raise InvalidTaskError(f"body: kwargs must be a mapping, got {_kind(body.get('kwargs'))}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _needs_celery(embed: dict[str, Any]) -> bool:
    # Callbacks, errbacks, chains and chords are run by Celery's trace: a group does not.
    return any(embed.get(key) for key in ("callbacks", "errbacks", "chain", "chord"))


# The worker's grouper: one buffer per consumer (a worker has one), shared by every task with
# this Strategy; Request below finds it here.
_process_grouper: Grouper | None = None


def connection_closed(consumer: Any, cache: Any) -> None:
    """Tell the worker's grouper that `consumer` closed its channel (consumer.py's on_close)."""
    if _process_grouper is not None and _process_grouper.consumer is consumer:
        _process_grouper.closed(cache)


def _grouper(consumer: Any) -> Grouper:
    global _process_grouper
    if _process_grouper is None or _process_grouper.consumer is not consumer:
        _process_grouper = Grouper(consumer)
    return _process_grouper


class Request(CeleryRequest):
    """Celery's Request, but a hard time limit is one failed attempt settled by the task's
    group runner (retry or dead letter), where Celery records FAILURE and acknowledges it.

    The task's `Request` (on the per-message path too, group commit on or off).
    """

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if soft or not _settles_time_limits(self):
            super().on_timeout(soft, timeout)
            return
        logger.error(
            "hard time limit (%ss) exceeded by %s[%s]: settled as a failed attempt",
            timeout,
            self.name,
            self.id,
        )

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, TimeLimitExceeded) and _settles_time_limits(self):
            assert _process_grouper is not None
            _process_grouper.send(_process_grouper.key(self), [self], failed=exc)
            return
        super().on_failure(exc_info, send_failed_event, return_ok)


def _settles_time_limits(request: Any) -> bool:
    return _process_grouper is not None and bool(getattr(request.task, "group_runner", None))


class Grouper:
    """Buffers Requests in the main process and hands a pool process a group when it is free.

    The database's own group commit: a group forms while the previous one is being written. A
    message that finds a process free goes out at the end of the loop turn that delivered it
    (with whatever that turn delivered beside it: one fetch on Redis); messages that arrive while
    every process is busy wait, and the first process to finish takes everything that waited
    (up to the group limit). No timer: an idle worker writes a message at once, alone. So
    groups form on any broker, on RabbitMQ too, where each message is its own delivery.
    """

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.buffered: dict[tuple[Any, ...], list[Any]] = {}
        self.scheduled = False
        #: Group jobs handed to the pool and not yet settled: a token each, with the pool's
        #: ApplyResult once apply_async returned it (the solo pool returns none).
        self.jobs: dict[object, Any] = {}
        # The threads pool calls back from its threads, while the loop's thread adds; the solo
        # pool runs a job (and its callback) inside `send`: reentrant.
        self.lock = threading.RLock()

    @staticmethod
    def key(request: Any) -> tuple[Any, ...]:
        """What the messages of one group share: runner, size limit and time limits."""
        task = request.task
        hard, soft = request.time_limits
        limit = getattr(task, "group_limit", GROUP_LIMIT)
        return (task.group_runner, limit, hard or task.time_limit, soft or task.soft_time_limit)

    @property
    def running(self) -> int:
        """Group jobs in the pool."""
        return len(self.jobs)

    @property
    def free(self) -> int:
        """Pool processes with no group of ours to write."""
        processes = max(1, getattr(self.consumer.pool, "num_processes", 1) or 1)
        return max(0, processes - self.running)

    def add(self, request: Any) -> None:
        """Buffer a request; it goes out at the end of this turn if a process is free, else
        when one is; a full group goes out at once to a free process."""
        key = self.key(request)
        with self.lock:
            waiting = self.buffered.setdefault(key, [])
            waiting.append(request)
            if len(waiting) >= key[1] and self.free:
                del self.buffered[key]
                self.dispatch(key, waiting, processes=1)
            elif not self.scheduled:
                self.scheduled = True
                self.consumer.hub.call_soon(self.flush)

    def flush(self) -> None:
        """Share what waits among the free processes (the rest waits for the next one free)."""
        with self.lock:
            self.scheduled = False
            keys = list(self.buffered)
            for left, key in zip(range(len(keys), 0, -1), keys, strict=True):
                free = self.free
                if not free:
                    return
                share = max(1, free // left)  # each group of requests its part, the last the rest
                requests = self.buffered.pop(key)
                self.dispatch(key, requests[: key[1] * share], processes=share)
                if len(requests) > key[1] * share:
                    self.buffered[key] = requests[key[1] * share :]

    def dispatch(self, key: tuple[Any, ...], requests: list[Any], processes: int) -> None:
        """Hand the pool the requests not revoked meanwhile, shared over `processes` jobs."""
        waiting = [request for request in requests if not _revoked(request)]
        size = max(1, min(key[1], -(-len(waiting) // processes)))
        for start in range(0, len(waiting), size):
            self.send(key, waiting[start : start + size])

    def done(self, token: object) -> None:
        """A group job ended: a process is free for what waited meanwhile."""
        with self.lock:
            self.jobs.pop(token, None)
            if self.buffered and not self.scheduled:
                self.flush()

    def closed(self, cache: Any) -> None:
        """The consumer closed its channel (a lost connection, a shutdown): what waits here can
        no longer be acknowledged (the broker redelivers it), and jobs the pool forgot (not in
        its `cache` any more: billiard's ApplyResults by job id) will never call back."""
        with self.lock:
            self.buffered.clear()
            # A flush the closed loop had scheduled may never run: the next message schedules
            # its own (else, waiting for it, the worker would never hand out a group again).
            self.scheduled = False
            if cache is None:
                return
            for token, result in list(self.jobs.items()):
                if result is not None and result._job not in cache:
                    del self.jobs[token]

    def send(self, key: tuple[Any, ...], group: list[Any], failed: Any = None) -> None:
        """One pool job for `group`; `failed` hands the runner a failure to settle instead."""
        runner, _, hard, soft = key
        messages = [_message(request) for request in group]
        token = object()
        with self.lock:
            self.jobs[token] = None
        try:
            result = self.consumer.pool.apply_async(
                run_group,
                args=(runner, messages, failed),
                accept_callback=lambda pid, accepted: _accepted(group, pid, accepted),
                timeout_callback=lambda soft, timeout: _on_timeout(group, soft, timeout),
                callback=lambda reports: self.ended(token, self.on_reports, key, group, reports),
                error_callback=lambda exc: self.ended(token, self.on_error, key, group, exc),
                soft_timeout=soft,
                timeout=hard,
                correlation_id=group[0].id,
            )
        except Exception:
            # The pool refused the job (it is shutting down, say): back on the queue.
            with self.lock:
                self.jobs.pop(token, None)
            logger.exception("could not hand a group of %d messages to the pool", len(group))
            for request in group:
                _settle(request, REQUEUE, None, 0.0)
            return
        # For `revoke --terminate`, as Celery's own Request.execute_using_pool keeps it. The
        # solo pool runs the job at once and returns nothing.
        reference = weakref.ref(result) if result is not None else None
        for request in group:
            request._apply_result = reference
        with self.lock:
            if result is not None and token in self.jobs:
                self.jobs[token] = result

    def ended(self, token: object, settle: Callable[..., None], *args: Any) -> None:
        """A group job's callback: settle its messages, then the freed process takes what
        waited (after settling: a re-sent group goes first)."""
        try:
            settle(*args)
        finally:
            self.done(token)

    def on_reports(self, key: tuple[Any, ...], group: list[Any], reports: Any) -> None:
        """Settle each message of a group that ran (or split a group whose runner raised)."""
        if isinstance(reports, ExceptionInfo):  # the threads pool's way of saying the job died
            self.on_error(key, group, reports)
            return
        if isinstance(reports, GroupFailed):
            self.split(key, group, reports.error)
            return
        for request, (state, value, runtime) in zip(group, reports, strict=True):
            _settle(request, state, value, runtime)

    def on_error(self, key: tuple[Any, ...], group: list[Any], exc_info: ExceptionInfo) -> None:
        """The pool lost the group's job: each member by its own fate."""
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        if isinstance(exc, TimeLimitExceeded):
            # Killed at the hard limit, nothing committed: each message counts an attempt.
            self.send(key, group, failed=exc)
            return
        revoked = [request for request in group if _revoked_or_cancelled(request)]
        rest = [request for request in group if request not in revoked]
        for request in revoked:
            _celery_failure(request, exc_info)  # Terminated: revoked, as Celery announces it
        if not rest:
            return
        if isinstance(exc, Terminated):
            # A member was terminated (revoke --terminate) and the child with it: the others
            # did nothing wrong and run again at once.
            self.send(key, rest)
        elif isinstance(exc, WorkerLostError | SystemExit | KeyboardInterrupt):
            for request in rest:  # the child died: requeued (task_reject_on_worker_lost)
                _celery_failure(request, exc_info)
        else:
            self.split(key, rest, repr(exc))

    def split(self, key: tuple[Any, ...], group: list[Any], error: str) -> None:
        """Run each message alone, so that only the one that causes `error` fails."""
        if len(group) == 1:
            # Even alone: Celery's way for a task that raised (FAILURE, acknowledged).
            logger.error("group runner raised for %s alone: %s", group[0].id, error)
            try:
                raise RuntimeError(f"group runner raised: {error}")
            except RuntimeError:
                _celery_failure(group[0], ExceptionInfo())
            return
        logger.warning("group runner raised for %d messages (%s): each alone", len(group), error)
        for request in group:
            self.send(key, [request])


def _revoked(request: Any) -> bool:
    try:
        return bool(request.revoked())
    except Exception:
        # Announcing the revoke failed (the result backend, say): not run, back on the queue.
        logger.exception("could not check whether %s was revoked; requeued", request.id)
        _settle(request, REQUEUE, None, 0.0)
        return True


def _revoked_or_cancelled(request: Any) -> bool:
    return bool(request._already_revoked or request._already_cancelled)


# Of a request dict, what the child needs no copy of: the arguments (a Message has them), their
# reprs (as long as the arguments) and the message properties. The rest, headers included, is
# the child's task.request, but for None values: Context's own defaults for them.
_NOT_SENT = frozenset(("args", "kwargs", "argsrepr", "kwargsrepr", "properties"))


def _message(request: Any) -> Message:
    _, _, embed = request._payload
    context = {
        k: v for k, v in request.request_dict.items() if v is not None and k not in _NOT_SENT
    }
    if embed:
        context.update((k, v) for k, v in embed.items() if v is not None)
    return Message(request.id, request.type, request.args, request.kwargs, context)


def _accepted(group: list[Any], pid: int, accepted: float) -> None:
    for request in group:
        request.on_accepted(pid, accepted)


def _on_timeout(group: list[Any], soft: bool, timeout: float) -> None:
    logger.log(
        logging.WARNING if soft else logging.ERROR,
        "%s time limit (%ss) exceeded by a group of %d messages (first %s)",
        "soft" if soft else "hard",
        timeout,
        len(group),
        group[0].id,
    )


def _settle(request: Any, state: str, value: Any, runtime: float) -> None:
    """Events, state and acknowledgement of one message, as Celery's Request gives them."""
    try:
        if state == states.SUCCESS:
            request.on_success((False, value, runtime))  # value: the result's repr
            return
        task_ready(request)
        if state == REQUEUE:
            request.reject(requeue=True)
            return
        request.acknowledge()
        event = "task-failed" if state == states.FAILURE else "task-retried"
        request.send_event(event, exception=value, traceback="")
    except Exception:
        # One message's settlement never stops another's (a lost connection: redelivered).
        logger.exception("could not settle %s (%s)", request.id, state)


def _celery_failure(request: Any, exc_info: ExceptionInfo) -> None:
    try:
        request.on_failure(exc_info)
    except Exception:
        logger.exception("could not settle %s after %r", request.id, exc_info.exception)


# -- in the pool child ---------------------------------------------------------------------


def run_group(runner_path: str, messages: list[Message], failed: Any = None) -> Any:
    """The pool job: the runner once for the group, around it each message's signals and
    result. Never raises: a runner that raises gives GroupFailed, and the main process splits."""
    app = current_app
    started = time.perf_counter()
    try:
        runner = symbol_by_name(runner_path)
        tasks = [app.tasks[message.name] for message in messages]
        for task, message in zip(tasks, messages, strict=True):
            task.request_stack.push(message.context)
            try:
                signals.task_prerun.send(
                    sender=task, task_id=message.id, task=task, args=message.args,
                    kwargs=message.kwargs,
                )  # fmt: skip
            finally:
                task.request_stack.pop()
    except Exception as exc:
        logger.exception("could not start a group of %d messages", len(messages))
        return GroupFailed(repr(exc))
    try:
        decisions = runner(messages, failed)
        if len(decisions) != len(messages):
            raise RuntimeError(f"{len(decisions)} decisions for {len(messages)} messages")
    except Exception as exc:
        logger.exception("the group runner raised for %d messages", len(messages))
        _postrun(tasks, messages, [(states.FAILURE, exc)] * len(messages))
        return GroupFailed(repr(exc))
    runtime = time.perf_counter() - started
    _store_results(app, tasks, messages, decisions)
    _postrun(tasks, messages, decisions)
    return [
        (state, repr(value) if state == states.SUCCESS else _error(state, value), runtime)
        for state, value in decisions
    ]


def _store_results(
    app: Any, tasks: list[Any], messages: list[Message], decisions: list[Decision]
) -> None:
    stored = [
        (message.id, value.exc if isinstance(value, Retry) else value, state)
        for task, message, (state, value) in zip(tasks, messages, decisions, strict=True)
        if state != REQUEUE and not _ignores_result(task, message)
    ]
    try:
        store_results(app.backend, stored)
    except Exception:
        # The outcomes are already committed: acknowledge them all the same. A producer that
        # waits for a result times out and resends, which ends `duplicate`.
        logger.exception("could not store the results of %d messages", len(stored))


def _ignores_result(task: Any, message: Message) -> bool:
    ignore = message.request.get("ignore_result")
    return bool(task.ignore_result if ignore is None else ignore)


def _postrun(tasks: list[Any], messages: list[Message], decisions: list[Decision]) -> None:
    # In the reverse order of task_prerun, as nested context managers would exit: signal
    # handlers that attach a context in prerun (OpenTelemetry's) detach it in order.
    for task, message, (state, value) in reversed(
        list(zip(tasks, messages, decisions, strict=True))
    ):
        try:
            _send_outcome(task, message, state, value)
        except Exception:  # a signal's receivers cannot raise; building the einfo could
            logger.exception("could not send the signals of %s", message.id)


def _send_outcome(task: Any, message: Message, state: str, value: Any) -> None:
    task.request_stack.push(message.context)
    try:
        if state == states.SUCCESS:
            signals.task_success.send(sender=task, result=value)
        elif state == states.FAILURE:
            einfo = _einfo(value)
            signals.task_failure.send(
                sender=task, task_id=message.id, exception=value, args=message.args,
                kwargs=message.kwargs, traceback=einfo.tb, einfo=einfo,
            )  # fmt: skip
        elif state == states.RETRY:
            signals.task_retry.send(
                sender=task, request=message.context, reason=value, einfo=_einfo(value.exc)
            )
        signals.task_postrun.send(
            sender=task, task_id=message.id, task=task, args=message.args,
            kwargs=message.kwargs, retval=value, state=state,
        )  # fmt: skip
    finally:
        task.request_stack.pop()


def _einfo(exc: BaseException) -> ExceptionInfo:
    if exc.__traceback__ is None:  # made, never raised (a decision): give it a traceback
        try:
            raise exc
        except BaseException:
            return ExceptionInfo()
    return ExceptionInfo((type(exc), exc, exc.__traceback__))


def _error(state: str, value: Any) -> str | None:
    """An exception as Celery shows it in task events (and so in Flower)."""
    if state == REQUEUE or value is None:
        return None
    if isinstance(value, Retry):
        value = value.exc
    return f"{type(value).__name__}({str(value)!r})"
