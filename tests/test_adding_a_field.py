"""Adding a column to WritingSession: what the tombstone and the benchmark's plain-SQL rows take
from the model, and the error that names the column when they cannot (docs/code.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, cast

import pytest
from sqlalchemy import Column, MetaData, String, Table

from tests.conftest import ROOT
from worker.models import WritingSession
from worker.upsert import (
    TOMBSTONE_EMPTIED,
    ColumnsOutOfStep,
    PostgresqlUpsert,
    SqliteUpsert,
    Tombstone,
    tombstone_values,
)

pytestmark = pytest.mark.quick

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _benchmark() -> ModuleType:
    # benchmarks/ is scripts, not a package: load run.py by its path, as its tests run it.
    spec = importlib.util.spec_from_file_location("benchmark_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _benchmark()


def model_like(*extra: Column[Any], without: tuple[str, ...] = ()) -> Table:
    """writing_session's columns as the model declares them, with `extra` added last (as a new
    mapped_column at the end of the class) and the columns named in `without` left out."""
    table = cast(Table, WritingSession.__table__)
    columns = [c._copy() for c in table.columns if c.name not in without]
    return Table("writing_session", MetaData(), *columns, *extra)


def test_todays_model_gives_the_tombstone_and_the_benchmark_rows_they_always_wrote():
    assert TOMBSTONE_EMPTIED == {"topic": None, "content": "", "author_id": None, "ended_at": None}
    assert run.VALUES == {
        "id": "%s",
        "topic": "%s",
        "content": "%s",
        "author_id": "%s",
        "word_count": "%s",
        "char_count": "%s",
        "started_at": "now()",
        "ended_at": "NULL",
        "revision": "0",
        "deleted_at": "NULL",
        "created_at": "now()",
        "updated_at": "now()",
    }
    assert run.ONE_ROW == "(%s, %s, %s, %s, %s, %s, now(), NULL, 0, NULL, now(), now())"


def test_a_tombstone_reaches_both_dialects_with_every_emptied_column():
    tombstone = Tombstone(id=uuid.UUID(int=1), revision=3, deleted_at=NOW)

    as_json = json.loads(PostgresqlUpsert._rows_json.dump_json([tombstone]))[0]
    as_parameters = SqliteUpsert._values(tombstone, NOW)

    assert as_json == {
        "id": "00000000-0000-0000-0000-000000000001",
        "revision": 3,
        "deleted_at": "2026-01-01T00:00:00Z",
        "started_at": None,
        "topic": None,
        "content": "",
        "author_id": None,
        "ended_at": None,
        "counts": [0, 0],
    }
    assert as_parameters == {
        "id": uuid.UUID(int=1),
        "topic": None,
        "content": "",
        "author_id": None,
        "started_at": None,
        "ended_at": None,
        "revision": 3,
        "deleted_at": NOW,
        "word_count": 0,
        "char_count": 0,
        "created_at": NOW,
        "updated_at": NOW,
        "now": NOW,
    }


def test_a_new_nullable_column_is_null_in_a_tombstone_and_a_benchmark_row_with_no_edit():
    table = model_like(Column("mood", String(20), nullable=True))

    assert tombstone_values(table)["mood"] is None
    assert run.values_of(table)["mood"] == "NULL"


def test_a_new_not_null_column_with_a_default_takes_the_default_in_both():
    table = model_like(Column("mood", String(20), nullable=False, default="calm's"))

    assert tombstone_values(table)["mood"] == "calm's"
    assert run.values_of(table)["mood"] == "'calm''s'"


def test_a_new_not_null_column_without_a_default_is_named_with_the_edits_that_would_fill_it():
    table = model_like(Column("mood", String(20), nullable=False))

    with pytest.raises(ColumnsOutOfStep) as tombstone:
        tombstone_values(table)
    with pytest.raises(ColumnsOutOfStep) as benchmark:
        run.values_of(table)

    for error in (tombstone, benchmark):
        assert "writing_session.mood: NOT NULL without a default" in str(error.value)
        assert "default in worker/models.py" in str(error.value)
    assert "declare the field in class Tombstone (worker/upsert.py)" in str(tombstone.value)
    assert "give it a value in SET in benchmarks/run.py" in str(benchmark.value)


def test_a_column_gone_from_the_model_is_named_where_it_is_still_given():
    with pytest.raises(ColumnsOutOfStep, match=r"Tombstone \(worker/upsert.py\).* started_at"):
        tombstone_values(model_like(without=("started_at",)))
    with pytest.raises(ColumnsOutOfStep, match=r"benchmarks/run.py gives author_id"):
        run.values_of(model_like(without=("author_id",)))


def test_a_benchmark_tuple_out_of_the_models_column_order_is_refused():
    # author_id moved after the stamps: the tuples of _loop and _batched would fill the wrong
    # columns.
    reordered = model_like(Column("author_id", String(64)), without=("author_id",))

    with pytest.raises(ColumnsOutOfStep, match="must follow the order"):
        run.values_of(reordered)


def test_the_worker_does_not_import_with_a_column_nothing_fills():
    # As if the column were added to the model: the check runs when worker.upsert is imported.
    added = (
        "import sqlalchemy as sa\n"
        "from worker.models import WritingSession\n"
        "WritingSession.__table__.append_column(sa.Column('mood', sa.Text, nullable=False))\n"
        "import worker.upsert\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", added], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 1
    assert "ColumnsOutOfStep: writing_session.mood: NOT NULL without a default" in result.stderr
