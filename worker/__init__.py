"""writing-sessions: a Celery worker that persists writing sessions into PostgreSQL.

`celery -A worker ...` finds the Celery application as `worker.app`, as with any Celery project.
It is loaded on first access, so importing a submodule (errors, schemas) configures nothing.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from worker.app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
