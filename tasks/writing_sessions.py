"""Thin tasks: validate, open the one Session, call the store, return plain data."""

from __future__ import annotations

from typing import Any

from worker import store
from worker.app import app
from worker.db import task_db
from worker.schemas import parse_writing_session
from worker.task import WritingSessionsTask


@app.task(name="writing_sessions.save", base=WritingSessionsTask)
def save(writing_session: Any) -> dict[str, Any]:
    """Persist one writing session: created, updated, duplicate or stale by revision."""
    item = parse_writing_session(writing_session)
    with task_db() as db:
        return store.save(db, item).as_dict()
