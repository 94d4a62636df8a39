"""Alembic environment: URL from worker.settings, metadata from worker.models, one migrator."""

import sys

from alembic import context
from sqlalchemy import Connection, text

from worker.db import make_engine
from worker.migrate import MIGRATION_LOCK_KEY
from worker.models import Base
from worker.settings import settings

target_metadata = Base.metadata
config = context.config


def database_url() -> str:
    """The URL given by the caller (tests, CLI), else the configured one."""
    return config.attributes.get("url") or settings.database_url


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`)."""
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations against the database, holding the migration lock."""
    engine = make_engine(database_url(), "writing-sessions:migrate")
    try:
        with engine.connect() as connection:
            postgres = connection.dialect.name == "postgresql"
            if postgres:
                take_the_migration_lock(connection)
            try:
                # Batch mode lets the same scripts alter tables on SQLite (embedded mode).
                context.configure(
                    connection=connection,
                    target_metadata=target_metadata,
                    render_as_batch=True,
                    transaction_per_migration=True,
                )
                with context.begin_transaction():
                    context.run_migrations()
            finally:
                if postgres:
                    connection.execute(
                        text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY}
                    )
                    connection.commit()
    finally:
        engine.dispose()


def take_the_migration_lock(connection: Connection) -> None:
    """Take the migration lock, saying so on stderr first if another migrate holds it."""
    key = {"key": MIGRATION_LOCK_KEY}
    if not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), key).scalar_one():
        sys.stderr.write(
            "another migrate holds the migration lock (PostgreSQL advisory lock "
            f"{MIGRATION_LOCK_KEY}); waiting for it to finish\n"
        )
        sys.stderr.flush()
        connection.execute(text("SELECT pg_advisory_lock(:key)"), key)
    connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
