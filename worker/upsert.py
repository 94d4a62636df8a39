"""The revision-rule upsert: one statement per set of rows, one small implementation per dialect.

Every write is `INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE stored.revision <
incoming.revision`, so two workers racing on one id can neither both win nor deadlock (rows go
in id order, docs/contract.md). `upsert_for(db)` picks the implementation of the Session's
dialect; each returns the ids it wrote, whether each was inserted, and the revision stored.

The columns come from the model: a column of WritingSession takes the row field of the same
name, except the two counts (computed from the content, `Row.counts`) and the two timestamps of
the write. A tombstone empties every column it does not declare, by the model (`Tombstone`), so
adding a column is an edit of the model and of the schemas, and a migration (docs/code.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cache
from types import SimpleNamespace
from typing import Any, Protocol, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    model_serializer,
)
from sqlalchemy import (
    Boolean,
    ColumnDefault,
    Integer,
    Table,
    Text,
    and_,
    bindparam,
    case,
    column,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from worker.models import WritingSession
from worker.schemas import WritingSessionIn

_table = cast(Table, WritingSession.__table__)
_c = _table.c
COLUMNS = [c.name for c in _table.columns]
# Stamped with the time of the write; computed from the content, in the order of Row.counts.
_STAMPED = ("created_at", "updated_at")
_COUNTS = ("word_count", "char_count")
# The columns a row gives by field name.
ROW_FIELDS = [name for name in COLUMNS if name not in _STAMPED + _COUNTS]


class ColumnsOutOfStep(Exception):
    """Code that derives from the model cannot fill a column of it; the message says what to add
    and where. Raised at import, so a worker never starts writing rows that miss a column."""


def empty_values(table: Table, names: Iterable[str], instead: str) -> dict[str, Any]:
    """What each named column holds when a row says nothing of it: NULL where the column allows
    it, else the model's default (`content`: '').

    `instead`: the other edit that would fill such a column, for the error a column that has
    neither (NOT NULL, no scalar default) raises.
    """
    values: dict[str, Any] = {}
    unfilled = []
    for name in names:
        col = table.c[name]
        if col.nullable:
            values[name] = None
        elif isinstance(col.default, ColumnDefault) and col.default.is_scalar:
            values[name] = col.default.arg
        else:
            unfilled.append(name)
    if unfilled:
        named = ", ".join(f"{table.name}.{name}" for name in unfilled)
        raise ColumnsOutOfStep(
            f"{named}: NOT NULL without a default, so nothing fills it where a row says nothing"
            f" of it. Give it a default in worker/models.py (mapped_column(default=...)), or"
            f" {instead}"
        )
    return values


class Tombstone(BaseModel):
    """The row a delete writes: the session emptied, its id and revision kept.

    Its fields are the columns a tombstone sets or keeps; every other row column is emptied by
    `tombstone_values`, from the model, so a new column needs no field here unless a tombstone
    must keep it or it is NOT NULL without a default.
    """

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    revision: int
    deleted_at: datetime
    # Kept, not emptied: None makes the statement keep the stored started_at (or take the time
    # of the write), and the store groups rows by it.
    started_at: None = None
    counts: tuple[int, int] = (0, 0)

    @model_serializer(mode="wrap")
    def _with_emptied_columns(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Both dialects read a row as pydantic dumps it (JSON for PostgreSQL, a dict for SQLite).
        return {**TOMBSTONE_EMPTIED, **serialize(self)}


def tombstone_values(table: Table) -> dict[str, Any]:
    """The value a tombstone writes in each row column that is not a field of Tombstone."""
    row_columns = [c.name for c in table.columns if c.name not in _STAMPED + _COUNTS]
    declared = set(Tombstone.model_fields) - {"counts"}
    unknown = sorted(declared - set(row_columns))
    if unknown:
        raise ColumnsOutOfStep(
            f"Tombstone (worker/upsert.py) has field(s) {', '.join(unknown)}, which"
            f" {table.name} has no column for: remove them from Tombstone"
        )
    return empty_values(
        table,
        (name for name in row_columns if name not in declared),
        instead="declare the field in class Tombstone (worker/upsert.py) with the value a"
        " delete leaves in it",
    )


TOMBSTONE_EMPTIED = tombstone_values(_table)


Row = WritingSessionIn | Tombstone
# What an upsert wrote: by id, (inserted rather than updated, the revision stored).
Written = dict[uuid.UUID, tuple[bool, int]]


class Upsert(Protocol):
    """Write rows of distinct ids by the revision rule; rows not written are not in the result.

    now: the time of the write (created_at, updated_at, and started_at where a row has none).
    keep_started_at: the rows carry no started_at, and an update keeps the stored one.
    """

    def __call__(
        self, db: Session, rows: Sequence[Row], now: datetime, keep_started_at: bool
    ) -> Written: ...


def upsert_for(db: Session) -> Upsert:
    """The upsert of the Session's database, built once per process and dialect."""
    return _upsert(db.get_bind().dialect.name)


@cache
def _upsert(dialect: str) -> Upsert:
    return PostgresqlUpsert() if dialect == "postgresql" else SqliteUpsert()


def _started_at(incoming: Any, now: Any) -> Any:
    """started_at of a row as it is proposed: the producer's, else the stored one, else now.

    PostgreSQL and SQLite check CHECK constraints on the proposed row before they find the
    conflict that makes it an update (or, by the revision, no write at all). With `now` there,
    an update without started_at whose ended_at lies in the past would be refused, although the
    started_at it keeps is earlier; and a duplicate or stale row, which writes nothing, must not
    be refused for its ended_at either: for those the proposal is ended_at itself.
    """
    no_write = and_(_c.revision >= incoming.revision, incoming.ended_at < _c.started_at)
    stored = (
        select(case((no_write, incoming.ended_at), else_=_c.started_at))
        .where(_c.id == incoming.id)
        .scalar_subquery()
        .correlate_except(_table)
    )
    return func.coalesce(incoming.started_at, stored, now)


def _on_conflict(
    stmt: postgresql.Insert | sqlite.Insert, keep_started_at: bool
) -> postgresql.Insert | sqlite.Insert:
    kept = {"id", "created_at", *(["started_at"] if keep_started_at else [])}
    changes = {name: stmt.excluded[name] for name in COLUMNS if name not in kept}
    return stmt.on_conflict_do_update(
        index_elements=[_c.id], set_=changes, where=_c.revision < stmt.excluded.revision
    )


class PostgresqlUpsert:
    """One INSERT ... SELECT FROM json_to_recordset(:rows) for all the rows.

    pydantic writes the rows as one JSON text, which PostgreSQL reads faster than it parses a
    multi-row VALUES list; the text is bound as any parameter.
    """

    _rows_json = TypeAdapter(list[Row])

    def __init__(self) -> None:
        self._statements = {keep: self._statement(keep) for keep in (False, True)}

    @staticmethod
    def _statement(keep_started_at: bool) -> ReturningInsert[Any]:
        incoming = (
            func.json_to_recordset(bindparam("rows", type_=Text))
            .table_valued(
                *(column(name, _c[name].type) for name in ROW_FIELDS),
                column("counts", postgresql.JSON()),
            )
            .render_derived("incoming", with_types=True)
        )
        now = bindparam("now", type_=_c.created_at.type)
        values: dict[str, Any] = {}
        for name in COLUMNS:
            if name in _STAMPED:
                values[name] = now
            elif name in _COUNTS:
                values[name] = incoming.c.counts[_COUNTS.index(name)].astext.cast(Integer)
            elif name == "started_at" and keep_started_at:
                values[name] = _started_at(incoming.c, now)
            else:
                values[name] = incoming.c[name]
        stmt = postgresql.insert(_table).from_select(list(values), select(*values.values()))
        # xmax is 0 on a freshly inserted row version, and our transaction id on an update.
        inserted = literal_column("xmax = 0", Boolean).label("inserted")
        return _on_conflict(stmt, keep_started_at).returning(_c.id, _c.revision, inserted)

    def __call__(
        self, db: Session, rows: Sequence[Row], now: datetime, keep_started_at: bool
    ) -> Written:
        rows_json = self._rows_json.dump_json(list(rows)).decode()
        result = db.execute(self._statements[keep_started_at], {"rows": rows_json, "now": now})
        return {id: (inserted, revision) for id, revision, inserted in result}


class SqliteUpsert:
    """The one-row statement, executed for each row (Core's executemany).

    SQLite serialises writers (the transaction takes the lock at BEGIN IMMEDIATE), so reading
    the stored ids first is race-free and tells an insert from an update.
    """

    def __init__(self) -> None:
        values: dict[str, Any] = {name: bindparam(name, type_=_c[name].type) for name in COLUMNS}
        values["started_at"] = _started_at(
            SimpleNamespace(**values), bindparam("now", type_=_c.created_at.type)
        )
        self._statements = {
            keep: _on_conflict(sqlite.insert(_table).values(values), keep).returning(
                _c.id, _c.revision
            )
            for keep in (False, True)
        }

    def __call__(
        self, db: Session, rows: Sequence[Row], now: datetime, keep_started_at: bool
    ) -> Written:
        before = stored_revisions(db, [row.id for row in rows])
        parameters = [self._values(row, now) for row in rows]
        result = db.execute(self._statements[keep_started_at], parameters)
        return {id: (id not in before, revision) for id, revision in result}

    @staticmethod
    def _values(row: Row, now: datetime) -> dict[str, Any]:
        # As the PostgreSQL statement reads the rows: their dump, absent fields NULL.
        dumped = row.model_dump()
        values: dict[str, Any] = {name: dumped.get(name) for name in ROW_FIELDS}
        values.update(zip(_COUNTS, dumped["counts"], strict=True))
        values.update(dict.fromkeys(_STAMPED, now))
        values["now"] = now
        return values


def stored_revisions(db: Session, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
    """The stored revision of each of `ids` that has a row."""
    query = select(_c.id, _c.revision).where(_c.id.in_(list(ids)))
    return {row.id: row.revision for row in db.execute(query)}
