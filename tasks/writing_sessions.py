"""Thin tasks: validate, open the one Session, call the store, return plain data."""

from __future__ import annotations

from typing import Any

from worker import store
from worker.app import app
from worker.db import task_db
from worker.errors import InvalidPayloadError
from worker.schemas import parse_batch, parse_delete, parse_writing_session
from worker.task import GroupCommitTask, WritingSessionsTask, add_dead_letter


@app.task(name="writing_sessions.save", base=GroupCommitTask)
def save(writing_session: Any) -> dict[str, Any]:
    """Persist one writing session: created, updated, duplicate or stale by revision."""
    item = parse_writing_session(writing_session)
    with task_db() as db:
        return store.save(db, item).as_dict()


@app.task(name="writing_sessions.save_many", base=WritingSessionsTask, bind=True)
def save_many(self: WritingSessionsTask, writing_sessions: Any) -> dict[str, int]:
    """Persist 1-1,000 sessions in one transaction; dead-letter each invalid item on its own."""
    batch = parse_batch(writing_sessions)
    with task_db() as db:
        written = store.save_many(db, batch.items)
        rejected = [(r.item, r.error) for r in batch.rejected]
        for valid_index, error in written.refused:
            position = batch.positions[valid_index]
            rejected.append((writing_sessions[position], f"writing_sessions[{position}].{error}"))
        # These dead letters commit with the valid items: a retry writes both again, never
        # one of them twice.
        for item, error in rejected:
            add_dead_letter(self, db, args=[[item]], kwargs={}, error=InvalidPayloadError(error))
    return {**written.counts, "rejected": len(rejected)}


@app.task(name="writing_sessions.delete", base=GroupCommitTask)
def delete(id: Any, revision: Any) -> dict[str, Any]:
    """Erase a session to a tombstone: deleted, duplicate or stale by revision."""
    target = parse_delete(id, revision)
    with task_db() as db:
        return store.delete(db, target.id, target.revision).as_dict()
