"""Alembic from Python: upgrade a database to head, and the worker's schema-is-current check."""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import signals
from sqlalchemy.exc import SQLAlchemyError

import migrations
from worker.errors import SchemaNotCurrentError
from worker.settings import mask_url, settings

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger(__name__)

# An arbitrary, fixed PostgreSQL advisory-lock key: concurrent `migrate` runs queue on it
# (migrations/env.py) instead of racing to create the same tables.
MIGRATION_LOCK_KEY = 0x5753_4D49_4752  # "WSMIGR"

# Alembic is imported where it is used, never at module level: workers import this module, and
# whatever a prefork parent imports, every child carries in its resident memory.


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config pointing at the installed migrations, wherever the cwd is."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["url"] = url or settings.database_url
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database to `revision` (head by default)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    """The newest revision the installed migrations know."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def check_schema_current(url: str | None = None) -> None:
    """Raise SchemaNotCurrentError unless the database is at the head revision.

    Uses a throwaway engine, disposed before returning: no connection is left behind.
    """
    from alembic.runtime.migration import MigrationContext

    from worker.db import make_engine

    url = url or settings.database_url
    head = head_revision()
    engine = make_engine(url, "writing-sessions:schema-check")
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        cause = type(getattr(exc, "orig", None) or exc).__name__
        raise SchemaNotCurrentError(
            f"cannot read the schema revision of {mask_url(url)}: {cause}"
        ) from exc
    finally:
        engine.dispose()
    if current != head:
        raise SchemaNotCurrentError(
            f"database {mask_url(url)} is at schema revision {current or 'none'}, "
            f"the code needs {head}: run `writing-sessions migrate`"
        )


@signals.worker_init.connect
def _check_schema_before_consuming(**_: Any) -> None:
    # Runs in the main process before the pool forks. Signal handlers' exceptions are only
    # logged by Celery, so exit explicitly: SystemExit is not an Exception and propagates.
    # The check runs in a short-lived forked process, so that neither Alembic nor its engine
    # ever lives in the parent (nor, through it, in each child's memory).
    try:
        with ProcessPoolExecutor(1, mp_context=get_context("fork")) as checker:
            checker.submit(check_schema_current).result()
    except SchemaNotCurrentError as exc:
        logger.critical("%s", exc)
        raise SystemExit(f"writing-sessions: {exc}") from exc
