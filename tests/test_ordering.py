"""Redelivery and reordering are harmless: the highest revision of an id wins, whatever arrives."""

from __future__ import annotations

import random
import uuid
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import count_rows

WRITES = ("created", "updated", "deleted")


def message(op: str, id: str, revision: int, topic: str) -> tuple[str, list[Any]]:
    if op == "delete":
        return "writing_sessions.delete", [id, revision]
    return "writing_sessions.save", [{"id": id, "topic": topic, "revision": revision}]


def final_rows(engine: sa.Engine, ids: list[str]) -> dict[str, Any]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT * FROM writing_session WHERE id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": ids},
        ).all()
    return {str(row.id): row for row in rows}


def assert_highest_revision_won(engine, plan, ids):
    rows = final_rows(engine, ids)
    for index, id in enumerate(ids):
        ops = [(revision, op, topic) for i, revision, op, topic in plan if i == index]
        if not ops:
            assert id not in rows
            continue
        revision, op, topic = max(ops)
        row = rows[id]
        assert row.revision == revision
        if op == "delete":
            assert (row.topic, row.content, row.deleted_at is not None) == (None, "", True)
        else:
            assert (row.topic, row.deleted_at) == (topic, None)


plans = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.integers(0, 30),
        st.sampled_from(["save", "delete"]),
        st.sampled_from(["alpha", "beta", "gamma"]),
    ),
    min_size=1,
    max_size=15,
    unique_by=lambda step: (step[0], step[1]),  # one operation per (id, revision)
)


def test_any_order_with_duplicates_ends_at_the_highest_revision(db, producer, start_worker):
    start_worker(concurrency=2)

    @settings(
        max_examples=20,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(plan=plans, data=st.data())
    def run(plan, data):
        ids = [str(uuid.uuid4()) for _ in range(3)]
        messages = [message(op, ids[i], revision, topic) for i, revision, op, topic in plan]
        copies = data.draw(st.lists(st.sampled_from(range(len(messages))), max_size=5))
        sent = data.draw(st.permutations(messages + [messages[i] for i in copies]))

        results = [producer.send_task(task, args=args) for task, args in sent]
        outcomes = [result.get(timeout=60) for result in results]

        assert_highest_revision_won(db, plan, ids)
        assert len(outcomes) == len(sent)
        for index, id in enumerate(ids):
            top = max((revision for i, revision, _, _ in plan if i == index), default=None)
            if top is None:
                continue
            # Pair each outcome with the revision its message carried.
            sent_revisions = [
                args[0]["revision"] if task.endswith("save") else args[1] for task, args in sent
            ]
            mine = [
                (revision, outcome)
                for revision, outcome in zip(sent_revisions, outcomes, strict=True)
                if outcome["id"] == id
            ]
            at_top = [outcome["outcome"] for revision, outcome in mine if revision == top]
            assert sum(o in WRITES for o in at_top) == 1, at_top
            assert set(at_top) <= {*WRITES, "duplicate"}
            assert all(outcome["revision"] <= top for _, outcome in mine)

    run()
    assert count_rows(db, "dead_letter") == 0


def test_two_worker_nodes_racing_on_the_same_ids_agree_without_deadlock(db, producer, start_worker):
    first = start_worker(name="racer-a@%h", concurrency=2)
    second = start_worker(name="racer-b@%h", concurrency=2)
    rng = random.Random(20261126)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    plan = [
        (index, revision, rng.choice(["save", "save", "delete"]), rng.choice(["alpha", "beta"]))
        for index in range(len(ids))
        for revision in range(60)
    ]
    messages = [message(op, ids[i], revision, topic) for i, revision, op, topic in plan] * 2
    # Batches racing with single saves on the same ids, in one transaction each.
    for start in range(0, len(plan), 25):
        items = [
            {"id": ids[i], "topic": topic, "revision": revision}
            for i, revision, op, topic in plan[start : start + 25]
            if op == "save"
        ]
        if items:
            messages.append(("writing_sessions.save_many", [items]))
    rng.shuffle(messages)

    results = [producer.send_task(task, args=args) for task, args in messages]
    for result in results:
        result.get(timeout=120, propagate=False)

    assert {result.state for result in results} == {"SUCCESS"}
    assert_highest_revision_won(db, plan, ids)
    assert count_rows(db, "dead_letter") == 0
    assert "deadlock" not in first.log() + second.log()
    assert "transient fault" not in first.log() + second.log()
