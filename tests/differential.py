"""The grouped path and the per-task path end the same: generated mixes of messages, both ways.

`mixes()` draws a mix: saves and deletes of a few ids with repeated, lower and equal
revisions, and every kind of bad input the contract lists, each message `(task, args, kwargs)`.
`snapshot(engine)` is what a mix leaves: the rows (the time of a write, which differs by
nature, shown as "now") and the dead letters.

Run as a module (`python -m tests.differential EXAMPLES`, with the service's environment), it
checks many mixes in one process: each through the per-task body (Celery's eager `apply`, the
task's __call__ with a Session of its own) and through the group runner of the grouped path
(worker/celery_ext/group_commit.run_group, cut into groups of drawn sizes), on an emptied
database each time, and compares rows, dead letters and result states. It imports the service
only there, so that the generator can be shared with tests that start real workers.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from hypothesis import strategies as st

Message = tuple[str, list[Any], dict[str, Any]]

TIMES = [f"2024-0{month}-01T00:00:00Z" for month in (1, 3, 6, 9)]
SAVE, DELETE = "writing_sessions.save", "writing_sessions.delete"

# Bad input of every class the contract lists (a fresh id each time is not needed: they fail).
BAD: list[Message] = [
    (SAVE, [{"id": "7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e01", "topic": "   "}], {}),
    (SAVE, [{"id": "7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e02", "topic": "t", "colour": "red"}], {}),
    (SAVE, [{"id": "7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e03", "topic": "t", "revision": "7"}], {}),
    (SAVE, [{"id": "7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e04", "topic": "nul\x00"}], {}),
    (SAVE, [{"id": "7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e05", "topic": "t", "a\x00b": 1}], {}),
    (SAVE, [{"id": "7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e06", "topic": "\udc80"}], {}),
    (
        SAVE,
        [
            {
                "id": "7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e07",
                "topic": "t",
                "started_at": "0001-01-01T00:30:00+01:00",
            }
        ],
        {},
    ),
    (
        SAVE,
        [{"id": "7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e08", "topic": "t", "content": "c" * 1_000_001}],
        {},
    ),
    (SAVE, ["just a string"], {}),
    (SAVE, [{"id": "7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e09", "topic": "t"}, {}], {}),
    (SAVE, [], {"session": {}}),
    (DELETE, ["not a uuid", 1], {}),
    (DELETE, ["7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e0a"], {}),
    (DELETE, ["7c0d8b52-1f4e-4e3a-9d7c-2b0b7d3a9e0b", -1], {}),
]


@st.composite
def mixes(draw: Any, max_size: int = 30) -> list[Message]:
    """A mix of valid and bad save and delete messages on a few ids."""
    ids = [str(uuid.UUID(int=draw(st.integers(1, 2**64)))) for _ in range(3)]
    valid_save = st.builds(
        lambda id, topic, content, revision, started, ended, author: (
            SAVE,
            [
                {
                    "id": id,
                    "topic": topic,
                    "content": content,
                    "revision": revision,
                    **({"started_at": started} if started else {}),
                    **({"ended_at": ended} if ended else {}),
                    **({"author_id": author} if author else {}),
                }
            ],
            {},
        ),
        st.sampled_from(ids),
        st.sampled_from(["a", " spaced ", "日本語"]),
        st.sampled_from(["", "one two", "今日は\u3000晴れ"]),
        st.integers(0, 3),
        st.sampled_from([None, *TIMES]),
        st.sampled_from([None, *TIMES]),
        st.sampled_from([None, "author-1"]),
    )
    valid_delete = st.builds(
        lambda id, revision: (DELETE, [id, revision], {}), st.sampled_from(ids), st.integers(0, 3)
    )
    message = st.one_of(valid_save, valid_save, valid_delete, st.sampled_from(BAD))
    return draw(st.lists(message, min_size=1, max_size=max_size))


def snapshot(engine: sa.Engine) -> dict[str, Any]:
    """The rows and dead letters a mix left, comparable between runs."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT id, topic, content, author_id, word_count, char_count, started_at,"
                " ended_at, revision, deleted_at IS NOT NULL AS deleted FROM writing_session"
                " ORDER BY id"
            )
        ).all()
        letters = connection.execute(
            sa.text(
                "SELECT task_id, task_name, payload, error_type, error, attempts FROM dead_letter"
                " ORDER BY task_id"
            )
        ).all()
    return {
        "rows": [tuple(_when(value) for value in row) for row in rows],
        "letters": [tuple(letter) for letter in letters],
    }


def _when(value: Any) -> Any:
    # A producer's times are in 2024; anything later is the time of a write.
    if isinstance(value, datetime):
        return value.isoformat() if value.year < 2025 else "now"
    return str(value) if isinstance(value, uuid.UUID) else value


def _check(examples: int) -> None:
    from hypothesis import HealthCheck, given, settings

    from worker.app import app
    from worker.celery_ext.group_commit import Message as GroupMessage
    from worker.celery_ext.group_commit import run_group
    from worker.db import make_engine
    from worker.settings import settings as service

    app.loader.import_default_modules()  # the tasks, as a worker registers them
    engine = make_engine(service.database_url, "differential")

    def empty() -> None:
        with engine.begin() as connection:
            connection.execute(sa.text("TRUNCATE writing_session, dead_letter"))

    def per_task(mix: list[Message]) -> dict[str, Any]:
        empty()
        states = {}
        for n, (name, args, kwargs) in enumerate(mix):
            result = app.tasks[name].apply(args=args, kwargs=kwargs, task_id=f"task-{n}")
            states[f"task-{n}"] = result.state
        return {**snapshot(engine), "states": states}

    def grouped(mix: list[Message], sizes: list[int]) -> dict[str, Any]:
        empty()
        messages = [
            GroupMessage(f"task-{n}", name, args, kwargs, _request(f"task-{n}", name))
            for n, (name, args, kwargs) in enumerate(mix)
        ]
        states = {}
        start = 0
        for size in [*sizes, len(messages)]:
            group = messages[start : start + size]
            start += size
            if not group:
                continue
            reports = run_group("worker.group_runner:run_group", group)
            assert isinstance(reports, list), reports  # not GroupFailed
            states.update({m.id: state for m, (state, _, _) in zip(group, reports, strict=True)})
        return {**snapshot(engine), "states": states}

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mixes(), st.lists(st.integers(1, 10), max_size=5))
    def both_ways_end_the_same(mix: list[Message], sizes: list[int]) -> None:
        one, other = grouped(mix, sizes), per_task(mix)
        for key in one:
            assert one[key] == other[key], (key, one[key], other[key])

    try:
        both_ways_end_the_same()
    finally:
        engine.dispose()


def _request(task_id: str, name: str) -> dict[str, Any]:
    return {
        "id": task_id,
        "task": name,
        "retries": 0,
        "delivery_info": {"exchange": "", "routing_key": "celery"},
    }


if __name__ == "__main__":
    _check(int(sys.argv[1]))
    print(json.dumps({"examples": int(sys.argv[1]), "differences": 0}))
