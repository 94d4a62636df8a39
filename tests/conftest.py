"""Service fixtures: a migrated PostgreSQL database per run, a Redis db index per test, and
real Celery workers started as subprocesses."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CELERY = str(BIN / "celery")
CLI = str(BIN / "writing-sessions")
ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Variables of the service that must not leak from the developer's shell into a test.
SERVICE_VARIABLES = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "CELERY_VISIBILITY_TIMEOUT",
    "SQL_ECHO",
    "LOG_FORMAT",
)


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def create_database(name: str) -> str:
    """Create an empty PostgreSQL database and return its psycopg2 URL."""
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    """Drop a test database, ending any connection still attached to it."""
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def service_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without the service's variables, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env.update(overrides)
    return env


def run_cli(
    *args: str,
    env: dict[str, str],
    cwd: Path | None = None,
    timeout: float = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the installed `writing-sessions` command."""
    return subprocess.run(
        [CLI, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def run_python(
    script: str, *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a new process (a producer, as users run one); it must succeed."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result


def worker_connections(
    engine: sa.Engine, database_url: str, columns: str = "application_name, state"
) -> list[Any]:
    """`columns` of pg_stat_activity (application_name and state by default) for every worker
    connection to the test database."""
    with engine.connect() as connection:
        return list(
            connection.execute(
                sa.text(
                    f"SELECT {columns} FROM pg_stat_activity WHERE datname = :db "
                    "AND application_name LIKE 'writing-sessions:%'"
                ),
                {"db": make_url(database_url).database},
            )
        )


# Test processes run side by side (scripts/test runs two): a test that restarts a shared server
# (marked `exclusive`) must run while no other test does. Every other test holds the shared lock;
# the gate, taken before it, lets a waiting exclusive test in before the next shared holder.
_LOCKS = Path(tempfile.gettempdir()) / "writing-sessions-tests"


# A test that starts worker processes or servers of its own takes seconds: it is `slow`, so that
# `pytest -m "not slow"` runs the rest (in-process, quick and unit) in well under a minute.
SLOW_FIXTURES = {"start_worker", "private_redis", "flower", "tls_redis", "sentinel_set", "rabbit"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("faults") or SLOW_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _one_test_at_a_time_around_a_server_restart(request: pytest.FixtureRequest) -> Iterator[None]:
    exclusive = request.node.get_closest_marker("exclusive") is not None
    _LOCKS.mkdir(exist_ok=True)
    with (_LOCKS / "gate").open("a") as gate, (_LOCKS / "services").open("a") as services:
        fcntl.flock(gate, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(services, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of this test run, migrated to head by the real `migrate` command."""
    name = f"ws_test_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    try:
        result = run_cli("migrate", env=service_env(DATABASE_URL=url))
        assert result.returncode == 0, result.stderr
        yield url
    finally:
        drop_database(name)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[sa.Engine]:
    """The test process's own engine on the test database (for arranging and asserting)."""
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine: sa.Engine) -> sa.Engine:
    """The test database, emptied of writing sessions and dead letters before the test."""
    with engine.begin() as connection:
        connection.execute(sa.text("TRUNCATE writing_session, dead_letter RESTART IDENTITY"))
    return engine


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database index of this test's own: one found empty, flushed afterwards."""
    for index in range(1, 16):
        client = redis.Redis.from_url(f"{REDIS_URL}/{index}")
        # SETNX of a claim key makes the index ours even if another test run looks at once.
        if client.dbsize() == 0 and client.set("writing-sessions-test-claim", "1", nx=True):
            try:
                yield f"{REDIS_URL}/{index}"
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    pytest.fail("no empty Redis database index (1-15) is free for this test")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of the test's own, with append-only persistence (tests/faults.py)."""
    from tests.faults import PrivateRedis  # tests.faults imports this module

    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory)
    yield server
    server.stop()


@pytest.fixture
def rabbit() -> Iterator[Any]:
    """A RabbitMQ virtual host of the test's own (tests.faults.RabbitVhost), deleted after."""
    from tests.faults import RabbitVhost  # tests/faults.py imports this module

    vhost = RabbitVhost()
    yield vhost
    vhost.delete()


@pytest.fixture
def env(database_url: str, redis_url: str, db: sa.Engine) -> dict[str, str]:
    """The environment of a worker or CLI of this test."""
    return service_env(
        DATABASE_URL=database_url, CELERY_BROKER_URL=redis_url, CELERY_RESULT_BACKEND=redis_url
    )


@pytest.fixture
def producer(redis_url: str) -> Iterator[Celery]:
    """A bare Celery client, like a producer's: it knows the broker, not our code."""
    app = Celery("test-producer", broker=redis_url, backend=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    yield app
    app.close()


@dataclass
class WorkerProcess:
    """A `celery -A worker worker` subprocess and its log."""

    process: subprocess.Popen[bytes]
    log_path: Path
    node: str
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> set[int]:
        """Pids of the pool's child processes."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return {int(pid) for pid in path.read_text().split()}
        except FileNotFoundError:
            return set()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """Warm shutdown (SIGTERM), then SIGKILL of the whole group if it does not end in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        # Pool children of a main process killed by a test must not outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.stopped = True
        return self.process.returncode


@pytest.fixture
def start_worker(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real workers (prefork by default) and stop them all after the test."""
    workers: list[WorkerProcess] = []

    def start(
        pool: str = "prefork",
        concurrency: int = 2,
        name: str | None = None,
        wait_ready: bool = True,
        extra_env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        base_env: dict[str, str] | None = None,
        cwd: Path | None = None,
        loglevel: str = "INFO",
    ) -> WorkerProcess:
        node = name or f"w{len(workers) + 1}-{uuid.uuid4().hex[:6]}@%h"
        log_path = tmp_path / f"worker-{len(workers) + 1}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    CELERY,
                    "-A",
                    "worker",
                    "worker",
                    "-P",
                    pool,
                    "-c",
                    str(concurrency),
                    "-n",
                    node,
                    "-l",
                    loglevel,
                    "--without-mingle",
                    "--without-gossip",
                    *args,
                ],
                # base_env (the embedded mode's) needs no PostgreSQL or Redis fixture at all.
                env={**(base_env or request.getfixturevalue("env")), **(extra_env or {})},
                cwd=cwd or tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(process, log_path, node)
        workers.append(worker)
        if wait_ready:
            wait_for(
                lambda: " ready." in worker.log() or not worker.alive(),
                60,
                "the worker to be ready",
            )
            assert worker.alive(), worker.log()
        return worker

    yield start
    for worker in workers:
        worker.stop()


def inspect(env: dict[str, str], worker: WorkerProcess, verb: str) -> Any:
    """`celery inspect <verb>` of one worker: its reply."""
    node = worker.node.replace("%h", socket.gethostname())
    shown = subprocess.run(
        [CELERY, "-A", "worker", "inspect", verb, "-d", node, "-j"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(shown.stdout)[node]


def send_save(producer: Celery, payload: Any) -> Any:
    """Enqueue writing_sessions.save as any producer would."""
    return producer.send_task("writing_sessions.save", args=[payload])


def new_session(**fields: Any) -> dict[str, Any]:
    """A valid writing-session object with a fresh id."""
    return {"id": str(uuid.uuid4()), "topic": "A topic", "content": "some words here", **fields}


def count_rows(engine: sa.Engine, table: str = "writing_session") -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
