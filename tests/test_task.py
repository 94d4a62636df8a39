"""The retry decisions of worker/task.py and the limits around them, in-process and fast."""

from __future__ import annotations

import psycopg2
import pytest
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy import exc as sa_exc

from tests.conftest import ROOT, run_python, service_env
from worker.errors import InvalidPayloadError, TransientError
from worker.settings import settings
from worker.task import backoff, is_transient

pytestmark = pytest.mark.quick


class _PgError(psycopg2.Error):
    """A DBAPI error carrying a SQLSTATE, as psycopg2 raises them."""

    def __init__(self, pgcode: str) -> None:
        super().__init__(f"sqlstate {pgcode}")
        self._code = pgcode

    @property
    def pgcode(self) -> str:  # type: ignore[override]
        return self._code


def dbapi_error(cls: type[sa_exc.DBAPIError], pgcode: str) -> sa_exc.DBAPIError:
    return cls("INSERT …", {}, _PgError(pgcode))


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (dbapi_error(sa_exc.OperationalError, "57P01"), True),  # the server shutting down
        (dbapi_error(sa_exc.DBAPIError, "40001"), True),  # serialization failure
        (dbapi_error(sa_exc.DBAPIError, "40P01"), True),  # deadlock
        (dbapi_error(sa_exc.DBAPIError, "53300"), True),  # too many connections
        (dbapi_error(sa_exc.InternalError, "25006"), True),  # read-only: a failover under way
        (TimeLimitExceeded(3), True),  # a group or a task killed at its hard time limit
        (SoftTimeLimitExceeded(), True),
        (dbapi_error(sa_exc.DBAPIError, "08006"), True),  # any connection exception
        (sa_exc.TimeoutError("QueuePool limit"), True),  # the pool had no connection
        (TransientError("database away"), True),
        (dbapi_error(sa_exc.IntegrityError, "23514"), False),  # a CHECK: the data is wrong
        (dbapi_error(sa_exc.DBAPIError, "22P02"), False),  # invalid text representation
        (InvalidPayloadError("topic: is required"), False),
        (ValueError("a bug"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_which_errors_are_retried(error, transient):
    assert is_transient(error) is transient


@pytest.mark.parametrize("retries", [0, 1, 3, 6, 7, 12])
def test_backoff_waits_a_random_time_up_to_two_to_the_retries_capped(retries):
    ceiling = min(2**retries, settings.retry_backoff_max)

    waits = [backoff(retries) for _ in range(300)]

    assert all(0 <= wait <= ceiling for wait in waits)
    assert len(set(waits)) > 1 or ceiling == 0  # full jitter, not a fixed step
    assert max(waits) > ceiling / 2


@pytest.mark.parametrize(
    ("visibility", "limit", "hard", "soft"),
    [("3600", "300", 300, 270), ("60", "300", 30, 27), ("4", "300", 2, 1)],
)
def test_the_time_limit_stays_below_the_visibility_timeout(visibility, limit, hard, soft):
    env = service_env(CELERY_VISIBILITY_TIMEOUT=visibility, WRITING_SESSIONS_TASK_TIME_LIMIT=limit)

    printed = run_python(
        "import celeryconfig as c; print(c.task_time_limit, c.task_soft_time_limit)",
        env=env,
        cwd=ROOT,
    )

    assert printed.stdout.split() == [str(hard), str(soft)]


LEAK = """
import logging, sys
from worker import db
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
db.init_engine()
held = db._engine.connect()
held.exec_driver_sql("SELECT 1")
db.check_for_leak("a test that forgot a connection")
held.close()
db.check_for_leak("a test that closed it")
"""


def test_the_connection_leak_detector_fires_on_a_connection_left_checked_out(
    database_url, tmp_path
):
    printed = run_python(LEAK, env=service_env(DATABASE_URL=database_url), cwd=tmp_path)

    lines = printed.stdout.splitlines()
    assert lines == [
        "connection leak: 1 connection(s) still checked out after a test that forgot a connection"
    ]
