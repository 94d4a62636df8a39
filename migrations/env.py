"""Alembic environment: URL from worker.settings, metadata from worker.models, one migrator."""

from alembic import context
from sqlalchemy import text

from worker.db import make_engine
from worker.models import Base
from worker.settings import settings

# An arbitrary, fixed key: concurrent `migrate` runs queue on this advisory lock instead of
# racing to create the same tables.
MIGRATION_LOCK_KEY = 0x5753_4D49_4752  # "WSMIGR"

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
                connection.execute(
                    text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
                connection.commit()
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


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
