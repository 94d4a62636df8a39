"""Alembic owns the schema: no drift, a clean round trip, and a worker that refuses a stale one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command

from tests.conftest import CELERY, create_database, drop_database, run_cli, service_env
from worker.migrate import MIGRATION_LOCK_KEY, alembic_config, upgrade


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"ws_empty_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    yield url
    drop_database(name)


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_models_and_migrations_do_not_drift(database_url):
    command.check(alembic_config(database_url))


def test_upgrade_downgrade_upgrade_round_trip(empty_database):
    upgrade(empty_database)
    assert {"writing_session", "dead_letter"} <= _tables(empty_database)

    command.downgrade(alembic_config(empty_database), "base")
    assert _tables(empty_database) == {"alembic_version"}

    upgrade(empty_database)
    assert {"writing_session", "dead_letter"} <= _tables(empty_database)


def test_concurrent_migrate_commands_both_succeed(empty_database, tmp_path):
    import subprocess

    env = service_env(DATABASE_URL=empty_database)
    runs = [
        subprocess.Popen(
            [CELERY.replace("celery", "writing-sessions"), "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]

    outputs = [run.communicate(timeout=120) for run in runs]

    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    assert {"writing_session", "dead_letter"} <= _tables(empty_database)


def test_migrate_says_it_waits_while_another_holds_the_migration_lock(empty_database, tmp_path):
    import select
    import subprocess

    holder = sa.create_engine(empty_database, poolclass=sa.NullPool)
    lock = {"key": MIGRATION_LOCK_KEY}
    try:
        with holder.connect() as connection:
            connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), lock)
            migrate = subprocess.Popen(
                [CELERY.replace("celery", "writing-sessions"), "migrate"],
                env=service_env(DATABASE_URL=empty_database),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert migrate.stderr is not None
            ready, _, _ = select.select([migrate.stderr], [], [], 60)
            said = migrate.stderr.readline() if ready else "(nothing within 60 s)"
            connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), lock)
            connection.commit()
        _, err = migrate.communicate(timeout=120)
    finally:
        holder.dispose()

    assert said.startswith("another migrate holds the migration lock"), said + err
    assert migrate.returncode == 0, err
    assert {"writing_session", "dead_letter"} <= _tables(empty_database)


def test_worker_refuses_an_unmigrated_database(empty_database, redis_url, tmp_path):
    import subprocess

    env = service_env(
        DATABASE_URL=empty_database, CELERY_BROKER_URL=redis_url, CELERY_RESULT_BACKEND=redis_url
    )

    result = subprocess.run(
        [CELERY, "-A", "worker", "worker", "-c", "1", "--without-mingle", "--without-gossip"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "run `writing-sessions migrate`" in result.stderr + result.stdout
    assert "schema revision none" in result.stderr + result.stdout


def test_migrate_command_masks_the_password(empty_database):
    url = (
        sa.engine.make_url(empty_database)
        .set(password="s3cret-pw")
        .render_as_string(hide_password=False)
    )

    result = run_cli("migrate", env=service_env(DATABASE_URL=url))

    assert result.returncode == 0, result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert "***" in result.stdout
