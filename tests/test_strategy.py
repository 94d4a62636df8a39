"""The group-commit Strategy (worker/celery_ext/group_commit.py) against a stub consumer: which
messages become one pool job, which take Celery's own path, and what a malformed one raises.

No worker process: a Celery app in this process, a consumer that records what the Strategy asks
of it (pool jobs, Celery's request handler, its timer, acknowledgements, events), and kombu
Messages built by Celery's own producer code (app.amqp.as_task_v1/as_task_v2).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from billiard.exceptions import TimeLimitExceeded
from celery import Celery, states
from celery.exceptions import InvalidTaskError
from celery.worker import state as worker_state
from kombu import Message

from worker.celery_ext import group_commit
from worker.celery_ext.group_commit import Decision, GroupFailed, run_group

pytestmark = pytest.mark.unit

STRATEGY = "worker.celery_ext.group_commit:strategy"
REQUEST = "worker.celery_ext.group_commit:Request"
RUNNER = "tests.test_strategy:run_echo"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# shared=False: Celery would otherwise add the test tasks to every app, the project's too.
OPTIONS = {"Strategy": STRATEGY, "Request": REQUEST, "group_runner": RUNNER, "shared": False}


def run_echo(messages: list[Any], failed: BaseException | None = None) -> list[Decision]:
    """The test tasks' runner: the pool is a stub here, so only its path reaches a job."""
    return [(states.SUCCESS, message.args[0]) for message in messages]


# -- the stub consumer ---------------------------------------------------------------------


class Hub:
    """The event loop, as far as the Strategy uses it: callbacks for the end of this turn."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], Any]] = []

    def call_soon(self, callback: Callable[[], Any]) -> None:
        self.soon.append(callback)

    def end_turn(self) -> None:
        """Run what this turn scheduled, as the loop does before it polls again."""
        while self.soon:
            self.soon.pop(0)()


@dataclass
class Job:
    target: Any
    args: tuple[Any, ...]
    options: dict[str, Any]
    #: Its id in the pool's cache, as billiard's ApplyResult has it.
    _job: int = 0

    @property
    def runner(self) -> str:
        return self.args[0]

    @property
    def ids(self) -> list[str]:
        return [message.id for message in self.args[1]]

    @property
    def failed(self) -> Any:
        return self.args[2]

    def finish(self) -> None:
        """The child wrote the group: its reports reach the main process."""
        self.options["callback"]([(states.SUCCESS, repr(m.args[0]), 0.0) for m in self.args[1]])


@dataclass
class Pool:
    """billiard's pool, as far as the Strategy uses it: jobs recorded, never run."""

    num_processes: int = 1
    jobs: list[Job] = field(default_factory=list)

    def apply_async(self, target: Any, args: tuple[Any, ...] = (), **options: Any) -> Job:
        job = Job(target, args, options, _job=len(self.jobs) + 1)
        self.jobs.append(job)
        return job  # the Strategy keeps a weak reference to it, as to billiard's ApplyResult


@dataclass
class Eventer:
    enabled: bool = True
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def send(self, type: str, **fields: Any) -> None:
        self.sent.append((type, fields))

    def of(self, type: str) -> list[str]:
        return [fields["uuid"] for sent, fields in self.sent if sent == type]


class Consumer:
    """What Celery's consumer gives a Strategy (celery/worker/strategy.py `default` and ours),
    each part recording what is asked of it."""

    hostname = "stub@test"
    connection_errors = ()
    disable_rate_limits = True

    def __init__(self, hub: bool = True, processes: int = 1) -> None:
        self.hub = Hub() if hub else None
        self.task_buckets: dict[str, Any] = {}
        self.pool = Pool(processes)
        self.event_dispatcher = Eventer()
        self.controller = SimpleNamespace(state=worker_state)
        self.qos = SimpleNamespace(increment_eventually=lambda: None)
        self.timer = SimpleNamespace(call_at=self._call_at)
        #: Requests handed to Celery's own path (one pool job each in a real worker).
        self.handled: list[Any] = []
        #: Requests Celery's path scheduled for their ETA.
        self.scheduled: list[Any] = []
        #: (what, task id) of each acknowledgement and reject.
        self.settled: list[tuple[str, str]] = []

    def on_task_request(self, request: Any) -> None:
        self.handled.append(request)

    def apply_eta_task(self, request: Any) -> None:
        self.handled.append(request)

    def _call_at(self, eta: float, fun: Any, args: tuple[Any, ...], priority: int = 0) -> Any:
        self.scheduled.extend(args)
        return SimpleNamespace(cancel=lambda: None)

    def _limit_task(self, *args: Any) -> None:
        raise AssertionError("rate limits are disabled")

    _limit_post_eta = _limit_task

    def deliver(self, strategies: dict[str, Any], message: Message) -> None:
        """Hand `message` to its task's Strategy as Celery's consumer does (on_task_received)."""
        headers = message.headers
        payload = None if "task" in headers else message.decode()  # protocol 1: decoded here
        name = headers["task"] if payload is None else payload["task"]
        task_id = headers.get("id") if payload is None else payload["id"]

        def ack(*_: Any) -> None:
            self.settled.append(("ack", task_id))

        def reject(_logger: Any, _errors: Any, requeue: bool = False) -> None:
            self.settled.append(("requeue" if requeue else "reject", task_id))

        strategies[name](message, payload, ack, reject, [])

    @property
    def jobs(self) -> list[Job]:
        return self.pool.jobs


# -- messages ------------------------------------------------------------------------------


def kombu_message(headers: Any, body: Any, properties: dict[str, Any] | None = None) -> Message:
    """A kombu Message as the transport delivers it: `body` JSON-encoded."""
    return Message(
        body=json.dumps(body).encode(),
        delivery_tag=str(uuid.uuid4()),
        content_type="application/json",
        content_encoding="utf-8",
        delivery_info={"exchange": "", "routing_key": "celery"},
        properties=properties or {},
        headers=headers,
        accept={"application/json"},
    )


def task_message(
    app: Celery, name: str, *args: Any, protocol: int = 2, extra: Any = None, **options: Any
) -> Message:
    """A message of task `name` as Celery's producer builds it (`options`: as_task_v2's:
    countdown, callbacks, time_limit, retries, ...); `extra` adds custom headers."""
    build = app.amqp.as_task_v2 if protocol == 2 else app.amqp.as_task_v1
    built = build(str(uuid.uuid4()), name, args=list(args), kwargs={}, **options)
    return kombu_message({**built.headers, **(extra or {})}, built.body, built.properties)


def raw_message(app: Celery, name: str, body: Any, **headers: Any) -> Message:
    """A protocol-2 message with Celery's headers around any `body` at all."""
    built = app.amqp.as_task_v2(str(uuid.uuid4()), name, args=[], kwargs={})
    return kombu_message({**built.headers, **headers}, body, built.properties)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def app() -> Iterator[Celery]:
    """A Celery app of this test with group-commit tasks, as a worker would have them."""
    app = Celery("test-strategy", set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], enable_utc=True, task_acks_late=True
    )

    @app.task(name="t.grouped", group_messages=True, **OPTIONS)
    def grouped(value: Any) -> Any:
        return value

    @app.task(name="t.limited", group_messages=True, group_limit=3, **OPTIONS)
    def limited(value: Any) -> Any:
        return value

    @app.task(name="t.alone", group_messages=False, **OPTIONS)
    def alone(value: Any) -> Any:
        return value

    app.finalize()
    yield app
    app.close()


@pytest.fixture(autouse=True)
def _fresh_worker_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The Strategy keeps its grouper, and Celery its reserved requests, in module globals: a
    # test must not see another's.
    monkeypatch.setattr(group_commit, "_process_grouper", None)
    worker_state.reset_state()
    yield
    worker_state.reset_state()


def strategies(app: Celery, consumer: Consumer) -> dict[str, Any]:
    """Each task's Strategy for `consumer`, as Celery's consumer builds them at start-up."""
    return {
        name: task.start_strategy(app, consumer)
        for name, task in app.tasks.items()
        if not name.startswith("celery.")  # Celery's built-in tasks
    }


@pytest.fixture
def consumer() -> Consumer:
    return Consumer()


@pytest.fixture
def deliver(app: Celery, consumer: Consumer) -> Callable[..., list[str]]:
    """Deliver messages of `name` (one per value) in this turn; their task ids."""
    handlers = strategies(app, consumer)

    def deliver_values(name: str, *values: Any, **options: Any) -> list[str]:
        ids = []
        for value in values:
            message = task_message(app, name, value, **options)
            consumer.deliver(handlers, message)
            ids.append(message.headers["id"])
        return ids

    return deliver_values


# -- grouping ------------------------------------------------------------------------------


def test_messages_delivered_in_one_turn_go_to_the_pool_as_one_job_through_the_runner(
    consumer, deliver
):
    ids = deliver("t.grouped", "a", "b", "c", "d")

    assert consumer.jobs == []  # buffered until the turn ends
    consumer.hub.end_turn()

    (job,) = consumer.jobs
    assert job.target is run_group
    assert job.runner == RUNNER
    assert job.ids == ids
    assert [message.args for message in job.args[1]] == [["a"], ["b"], ["c"], ["d"]]
    assert job.failed is None
    assert job.options["correlation_id"] == ids[0]
    assert consumer.handled == []  # nothing went Celery's per-message way
    assert consumer.event_dispatcher.of("task-received") == ids  # each message its own event


def test_a_message_alone_on_an_idle_worker_goes_out_alone_at_the_end_of_its_turn(consumer, deliver):
    (task_id,) = deliver("t.grouped", "only")
    consumer.hub.end_turn()

    assert [job.ids for job in consumer.jobs] == [[task_id]]


def test_messages_of_the_next_turn_make_a_group_of_their_own(consumer, deliver):
    first = deliver("t.grouped", 1, 2)
    consumer.hub.end_turn()
    consumer.jobs[0].finish()
    second = deliver("t.grouped", 3)
    consumer.hub.end_turn()

    assert [job.ids for job in consumer.jobs] == [first, second]


def test_messages_that_arrive_while_every_process_is_busy_wait_and_go_out_together(
    consumer, deliver
):
    # RabbitMQ delivers one message per turn of the loop: groups form while a process writes.
    (first,) = deliver("t.grouped", 1)
    consumer.hub.end_turn()
    later = []
    for value in range(2, 6):
        later += deliver("t.grouped", value)
        consumer.hub.end_turn()

    assert [job.ids for job in consumer.jobs] == [[first]]  # an idle worker: out at once, alone
    consumer.jobs[0].finish()
    assert [job.ids for job in consumer.jobs] == [[first], later]  # all that waited, together
    consumer.jobs[1].finish()
    assert len(consumer.jobs) == 2 and consumer.hub.soon == []


def test_a_closed_channel_drops_what_waits_and_the_jobs_the_pool_forgot(consumer, deliver):
    # A lost connection: Celery's on_close flushes the pool, which forgets the jobs no child took
    # (their callbacks never come), and what waits here can no longer be acknowledged.
    (sent,) = deliver("t.grouped", 1)
    consumer.hub.end_turn()
    deliver("t.grouped", 2, 3)  # the one process is busy: these wait
    consumer.hub.end_turn()
    assert [job.ids for job in consumer.jobs] == [[sent]]

    group_commit.connection_closed(consumer, cache={})  # the pool forgot the job

    (after,) = deliver("t.grouped", 4)  # redelivered or new: a process is free again
    consumer.hub.end_turn()
    assert [job.ids for job in consumer.jobs] == [[sent], [after]]


def test_a_flush_the_closed_loop_dropped_does_not_stop_the_next_groups(consumer, deliver):
    deliver("t.grouped", 1)  # its flush is scheduled for the end of this turn...
    group_commit.connection_closed(consumer, cache={})
    consumer.hub.soon.clear()  # ...and the loop that would have run it is gone

    (after,) = deliver("t.grouped", 2)
    consumer.hub.end_turn()
    assert [job.ids for job in consumer.jobs] == [[after]]


def test_a_closed_channel_keeps_counting_the_jobs_a_child_still_runs(consumer, deliver):
    (sent,) = deliver("t.grouped", 1)
    consumer.hub.end_turn()
    kept = {consumer.jobs[0]._job: consumer.jobs[0]}

    group_commit.connection_closed(consumer, cache=kept)
    (waiting,) = deliver("t.grouped", 2)
    consumer.hub.end_turn()
    assert [job.ids for job in consumer.jobs] == [[sent]]  # the process is still busy
    consumer.jobs[0].finish()
    assert [job.ids for job in consumer.jobs] == [[sent], [waiting]]


def test_what_waited_is_shared_among_the_processes_free_and_the_rest_waits_for_the_next(app):
    consumer = Consumer(processes=2)
    handlers = strategies(app, consumer)

    def deliver_one(value: Any) -> str:
        message = task_message(app, "t.grouped", value)
        consumer.deliver(handlers, message)
        consumer.hub.end_turn()
        return message.headers["id"]

    a, b = deliver_one("a"), deliver_one("b")  # two free processes: one job each
    waited = [deliver_one(value) for value in "cdef"]
    assert [job.ids for job in consumer.jobs] == [[a], [b]]
    consumer.jobs[1].finish()
    assert [job.ids for job in consumer.jobs] == [[a], [b], waited]


def test_each_message_of_a_group_carries_its_own_headers_to_the_runner(app, consumer):
    handlers = strategies(app, consumer)
    consumer.deliver(handlers, task_message(app, "t.grouped", "a", extra={"x-probe": "one"}))
    consumer.deliver(handlers, task_message(app, "t.grouped", "b", extra={"x-probe": "two"}))
    consumer.hub.end_turn()

    (job,) = consumer.jobs
    first, second = job.args[1]
    assert (first.request["x-probe"], first.retries) == ("one", 0)
    assert (second.request["x-probe"], second.retries) == ("two", 0)
    assert second.context.retries == 0  # task.request as Task.retry will read it
    assert second.name == "t.grouped" and second.kwargs == {}


def test_a_retry_without_a_countdown_runs_alone_with_its_retries_count(app, consumer):
    # Full jitter can draw a 0 s countdown: such a retry has no ETA, yet it must not join a group
    # (beside the message that hung its last group it would share its next hard time limit).
    handlers = strategies(app, consumer)
    plain = task_message(app, "t.grouped", "a")
    retried = task_message(app, "t.grouped", "b", retries=2)
    consumer.deliver(handlers, plain)
    consumer.deliver(handlers, retried)
    consumer.hub.end_turn()

    assert [job.ids for job in consumer.jobs] == [[plain.headers["id"]]]
    (alone,) = consumer.handled
    assert alone.id == retried.headers["id"]
    assert alone.request_dict["retries"] == 2


def test_a_group_limit_sends_a_full_group_at_once_and_the_rest_when_a_process_is_free(
    consumer, deliver
):
    ids = deliver("t.limited", *range(7))

    # A full group does not wait for the end of the turn; the next full one waits for a
    # process (one here), and so does the rest.
    assert [job.ids for job in consumer.jobs] == [ids[0:3]]
    consumer.hub.end_turn()
    assert [job.ids for job in consumer.jobs] == [ids[0:3]]
    consumer.jobs[0].finish()
    assert [job.ids for job in consumer.jobs] == [ids[0:3], ids[3:6]]
    consumer.jobs[1].finish()
    assert [job.ids for job in consumer.jobs] == [ids[0:3], ids[3:6], ids[6:]]


def test_a_group_is_shared_out_over_the_pool_processes_one_job_each_at_most(app):
    consumer = Consumer(processes=2)
    handlers = strategies(app, consumer)
    messages = [task_message(app, "t.grouped", value) for value in range(5)]
    for message in messages:
        consumer.deliver(handlers, message)
    consumer.hub.end_turn()

    ids = [message.headers["id"] for message in messages]
    assert [job.ids for job in consumer.jobs] == [ids[0:3], ids[3:5]]


def test_messages_with_different_time_limits_never_share_a_group(app):
    consumer = Consumer(processes=3)
    handlers = strategies(app, consumer)

    def deliver(name: str, *values: Any, **options: Any) -> list[str]:
        messages = [task_message(app, name, value, **options) for value in values]
        for message in messages:
            consumer.deliver(handlers, message)
        return [message.headers["id"] for message in messages]

    default = deliver("t.grouped", 1, 2)
    short = deliver("t.grouped", 3, 4, time_limit=30, soft_time_limit=20)
    soft_only = deliver("t.grouped", 5, soft_time_limit=20)
    consumer.hub.end_turn()

    by_ids = {tuple(job.ids): job for job in consumer.jobs}
    assert set(by_ids) == {tuple(default), tuple(short), tuple(soft_only)}
    # The pool enforces each group's own limits on its job.
    assert by_ids[tuple(short)].options["timeout"] == 30
    assert by_ids[tuple(short)].options["soft_timeout"] == 20
    assert by_ids[tuple(soft_only)].options["soft_timeout"] == 20
    assert by_ids[tuple(default)].options["timeout"] is None


def test_tasks_with_the_same_runner_and_limits_share_a_group(app, consumer):
    @app.task(name="t.other", group_messages=True, **OPTIONS)
    def other(value: Any) -> Any:
        return value

    handlers = strategies(app, consumer)
    messages = [task_message(app, name, 1) for name in ("t.grouped", "t.other", "t.grouped")]
    for message in messages:
        consumer.deliver(handlers, message)
    consumer.hub.end_turn()

    (job,) = consumer.jobs
    assert [message.name for message in job.args[1]] == ["t.grouped", "t.other", "t.grouped"]


# -- Celery's own path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "options"),
    [
        ("a countdown", {"countdown": 60}),
        ("a retry", {"retries": 1}),
        ("an ETA", {"eta": "2099-01-01T00:00:00+00:00"}),
        ("callbacks", {"callbacks": [{"task": "t.grouped", "args": [], "kwargs": {}}]}),
        ("errbacks", {"errbacks": [{"task": "t.grouped", "args": [], "kwargs": {}}]}),
        ("a chain", {"chain": [{"task": "t.grouped", "args": [], "kwargs": {}}]}),
        ("a chord", {"chord": {"task": "t.grouped", "args": [], "kwargs": {}}}),
        ("protocol 1", {"protocol": 1}),
    ],
)
def test_a_message_celery_must_handle_itself_takes_celerys_path_not_a_group(
    app, consumer, what, options
):
    handlers = strategies(app, consumer)
    plain = task_message(app, "t.grouped", "plain")
    special = task_message(app, "t.grouped", "special", **options)
    consumer.deliver(handlers, plain)
    consumer.deliver(handlers, special)
    consumer.hub.end_turn()

    special_id = special.headers.get("id") or special.decode()["id"]
    celerys = consumer.handled + consumer.scheduled
    assert [request.id for request in celerys] == [special_id], what
    assert [job.ids for job in consumer.jobs] == [[plain.headers["id"]]]


def test_a_message_with_a_countdown_waits_on_celerys_timer(app, consumer):
    handlers = strategies(app, consumer)
    message = task_message(app, "t.grouped", "later", countdown=60)
    consumer.deliver(handlers, message)
    consumer.hub.end_turn()

    assert [request.id for request in consumer.scheduled] == [message.headers["id"]]
    assert consumer.handled == [] and consumer.jobs == []


def test_a_task_with_group_messages_false_is_not_grouped_but_keeps_the_projects_request(
    consumer, deliver
):
    ids = deliver("t.alone", 1, 2, 3)
    consumer.hub.end_turn()

    assert consumer.jobs == []
    assert [request.id for request in consumer.handled] == ids
    # Its hard time limits are still settled by the runner (group_commit.Request.on_timeout).
    assert all(isinstance(request, group_commit.Request) for request in consumer.handled)


def test_without_an_event_loop_nothing_is_grouped(app):
    consumer = Consumer(hub=False)
    handlers = strategies(app, consumer)
    message = task_message(app, "t.grouped", 1)
    consumer.deliver(handlers, message)

    assert consumer.jobs == []
    assert [request.id for request in consumer.handled] == [message.headers["id"]]


def test_the_projects_save_and_delete_share_groups_and_save_many_never_groups(
    consumer, monkeypatch
):
    import tasks.writing_sessions  # noqa: F401  (registers the tasks, as a worker imports them)
    from worker.app import app as project

    save, delete = project.tasks["writing_sessions.save"], project.tasks["writing_sessions.delete"]
    # WRITING_SESSIONS_GROUP_COMMIT=0 in the shell running the tests must not change this test.
    monkeypatch.setattr(save, "group_messages", True)
    monkeypatch.setattr(delete, "group_messages", True)
    handlers = {
        task.name: task.start_strategy(project, consumer)
        for task in (save, delete, project.tasks["writing_sessions.save_many"])
    }
    item = {"id": str(uuid.uuid4()), "topic": "t"}
    messages = [
        task_message(project, "writing_sessions.save", item),
        task_message(project, "writing_sessions.delete", item["id"], 2),
        task_message(project, "writing_sessions.save_many", [item]),
    ]
    for message in messages:
        consumer.deliver(handlers, message)
    consumer.hub.end_turn()

    ids = [message.headers["id"] for message in messages]
    (job,) = consumer.jobs
    assert (job.runner, job.ids) == ("worker.group_runner:run_group", ids[:2])
    assert [request.id for request in consumer.handled] == ids[2:]


# -- what the pool reports back ------------------------------------------------------------


def test_each_message_of_a_group_that_ran_is_settled_on_its_own(consumer, deliver):
    ok, failed, requeued = deliver("t.grouped", "ok", "bad", "again")
    consumer.hub.end_turn()
    (job,) = consumer.jobs

    job.options["callback"](
        [
            (states.SUCCESS, "'ok'", 0.01),
            (states.FAILURE, "InvalidPayloadError('topic')", 0.01),
            (group_commit.REQUEUE, None, 0.01),
        ]
    )

    assert sorted(consumer.settled) == sorted([("ack", ok), ("ack", failed), ("requeue", requeued)])
    assert consumer.event_dispatcher.of("task-succeeded") == [ok]
    assert consumer.event_dispatcher.of("task-failed") == [failed]


def test_a_runner_that_raised_for_its_group_has_each_message_run_alone(consumer, deliver):
    ids = deliver("t.grouped", 1, 2, 3)
    consumer.hub.end_turn()

    consumer.jobs[0].options["callback"](GroupFailed("RuntimeError('poison')"))

    assert [job.ids for job in consumer.jobs[1:]] == [[task_id] for task_id in ids]
    assert consumer.settled == []  # nothing settled until each ran alone


def test_a_group_killed_at_its_hard_time_limit_goes_back_to_the_runner_as_failed(consumer, deliver):
    ids = deliver("t.grouped", 1, 2)
    consumer.hub.end_turn()
    try:
        raise TimeLimitExceeded(30)
    except TimeLimitExceeded:
        killed = ExceptionInfo()

    consumer.jobs[0].options["error_callback"](killed)

    (_, again) = consumer.jobs
    assert again.ids == ids
    assert isinstance(again.failed, TimeLimitExceeded)  # each message counts an attempt
    assert consumer.settled == []  # not acknowledged as FAILURE, as Celery would


def test_a_message_revoked_while_it_waits_is_left_out_of_its_group(consumer, deliver):
    kept, revoked = deliver("t.grouped", 1, 2)
    worker_state.revoked.add(revoked)
    consumer.hub.end_turn()

    assert [job.ids for job in consumer.jobs] == [[kept]]
    assert consumer.settled == [("ack", revoked)]
    assert consumer.event_dispatcher.of("task-revoked") == [revoked]


def test_a_pool_that_refuses_the_job_puts_its_messages_back_on_the_queue(consumer, deliver):
    def refuse(*_: Any, **__: Any) -> Any:
        raise RuntimeError("the pool is closing")

    ids = deliver("t.grouped", 1, 2)
    consumer.pool.apply_async = refuse  # type: ignore[method-assign]
    consumer.hub.end_turn()

    assert consumer.settled == [("requeue", task_id) for task_id in ids]


# -- malformed messages --------------------------------------------------------------------


MALFORMED_BODIES = [
    ("a mapping body", {"just": "a mapping"}, "body: must be [args, kwargs, embed], got dict"),
    ("two items", [[], {}], "body: must be [args, kwargs, embed], got 2 items"),
    ("a string body", "text", "body: must be [args, kwargs, embed], got str"),
    ("args not a list", [5, {}, EMBED], "body: args must be a list, got int"),
    ("args a mapping", [{"a": 1}, {}, EMBED], "body: args must be a list, got dict"),
    ("kwargs not a mapping", [[1], [], EMBED], "body: kwargs must be a mapping, got list"),
    ("kwargs null", [[1], None, EMBED], "body: kwargs must be a mapping, got null"),
    ("embed not a mapping", [[1], {}, 7], "body: embed must be a mapping, got int"),
]


@pytest.mark.parametrize("task", ["t.grouped", "t.alone"])
@pytest.mark.parametrize(
    ("what", "body", "error"), MALFORMED_BODIES, ids=[case[0] for case in MALFORMED_BODIES]
)
def test_a_malformed_body_raises_invalid_task_error_naming_what_is_wrong(
    app, consumer, task, what, body, error
):
    handlers = strategies(app, consumer)

    # InvalidTaskError, which Celery's consumer turns into a malformed-message record; a
    # ValueError or TypeError would escape it and stop the worker.
    with pytest.raises(InvalidTaskError) as raised:
        consumer.deliver(handlers, raw_message(app, task, body))

    assert str(raised.value) == error, what
    consumer.hub.end_turn()
    assert consumer.jobs == [] and consumer.handled == []


@pytest.mark.parametrize(
    ("what", "headers", "error"),
    [
        ("an id that is not a string", {"id": 42}, "headers.id: must be a non-empty string"),
        ("timelimit not a pair", {"timelimit": [5]}, "headers.timelimit: must be [hard, soft]"),
        ("a negative timelimit", {"timelimit": [-1, None]}, "headers.timelimit"),
        ("retries a string", {"retries": "2"}, "headers.retries: must be a whole number"),
        ("an ETA that is no date", {"eta": "soon"}, "invalid ETA value"),
    ],
)
def test_headers_celery_cannot_use_raise_invalid_task_error(app, consumer, what, headers, error):
    handlers = strategies(app, consumer)

    with pytest.raises(InvalidTaskError) as raised:
        consumer.deliver(handlers, raw_message(app, "t.grouped", [[1], {}, EMBED], **headers))

    assert error in str(raised.value), what


@pytest.mark.parametrize(
    ("what", "body", "error"),
    [
        ("args not a list", {"args": 5}, "body: args must be a list, got int"),
        ("kwargs not a mapping", {"kwargs": [1]}, "body: kwargs must be a mapping, got list"),
    ],
)
def test_a_malformed_protocol_1_body_raises_invalid_task_error(app, consumer, what, body, error):
    handlers = strategies(app, consumer)
    built = app.amqp.as_task_v1(str(uuid.uuid4()), "t.grouped", args=[1], kwargs={})

    with pytest.raises(InvalidTaskError) as raised:
        consumer.deliver(handlers, kombu_message({}, {**built.body, **body}, built.properties))

    assert str(raised.value) == error, what
