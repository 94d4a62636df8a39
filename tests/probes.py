"""Probes loaded into real workers by tests (`-I tests.probes`, the checkout on PYTHONPATH).

- A recorder of Celery's task signals: every task_prerun, task_success, task_failure,
  task_retry and task_postrun, with the task id it names, the id and `x-probe` header of
  `task.request` at that moment, pushed as JSON onto the Redis list PROBE_LIST of the broker.
- `probe.echo`, a group-commit task whose runner (`run_echo`) raises for its whole group when
  any message of it says "poison": a runner fault, as only the machinery sees it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import signals, states

from worker.app import app
from worker.celery_ext.group_commit import Decision, Message

PROBE_LIST = "probe:signals"
_client = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])


def _record(signal: str, task_id: Any, task: Any) -> None:
    request = task.request
    entry = {
        "signal": signal,
        "task_id": task_id,
        "request_id": request.id,
        "header": getattr(request, "x-probe", None) or (request.headers or {}).get("x-probe"),
    }
    _client.rpush(PROBE_LIST, json.dumps(entry))


@signals.task_prerun.connect
def _prerun(task_id: Any = None, task: Any = None, **_: Any) -> None:
    _record("prerun", task_id, task)


@signals.task_postrun.connect
def _postrun(task_id: Any = None, task: Any = None, **_: Any) -> None:
    _record("postrun", task_id, task)


@signals.task_success.connect
def _success(sender: Any = None, **_: Any) -> None:
    _record("success", sender.request.id, sender)


@signals.task_failure.connect
def _failure(sender: Any = None, task_id: Any = None, **_: Any) -> None:
    _record("failure", task_id, sender)


@signals.task_retry.connect
def _retry(sender: Any = None, request: Any = None, **_: Any) -> None:
    _record("retry", request.id, sender)


def run_echo(messages: list[Message], failed: BaseException | None = None) -> list[Decision]:
    """Echo each message's argument; raise for the whole group if one of them is "poison"."""
    if any(message.args[0] == "poison" for message in messages):
        raise RuntimeError("poison in the group")
    return [(states.SUCCESS, {"echo": message.args[0]}) for message in messages]


@app.task(
    name="probe.echo",
    Strategy="worker.celery_ext.group_commit:strategy",
    Request="worker.celery_ext.group_commit:Request",
    group_runner="tests.probes:run_echo",
    group_messages=True,
)
def echo(value: Any) -> Any:
    """Never called on the grouped path: the runner answers for the group."""
    return {"echo": value}
