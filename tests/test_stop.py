"""SIGTERM to the worker's whole process group (systemd's default KillMode, `timeout`, `tini -g`,
`kill -- -PGID`) is a warm shutdown (worker/celery_ext/stop.py): the pool children finish what
they run instead of dying by it, the worker exits within compose's grace period, and nothing is
lost once a worker runs again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import count_rows, new_session, run_cli, service_env, wait_for
from tests.faults import duplicates, report
from tests.test_embedded import rows, send
from tests.test_faults import client, fill

pytestmark = pytest.mark.faults

GRACE = 60  # docker compose's stop_grace_period for the worker (docker-compose.yml)


def stop_the_group(worker) -> float:
    """SIGTERM to every process of the worker at once; seconds until the main process exits."""
    children = worker.children()
    assert children, "a prefork worker has children to signal"
    started = time.monotonic()
    os.killpg(worker.pid, signal.SIGTERM)
    code = worker.process.wait(GRACE)
    took = time.monotonic() - started
    log = worker.log()
    assert code == 0, log
    assert "signal 15 (SIGTERM)" not in log, "a pool child died by the SIGTERM"
    assert "WorkerLostError" not in log
    assert "left to the main process" in log, "the children must have been signalled too"
    return took


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_sigterm_to_the_process_group_of_a_loaded_worker_is_a_warm_shutdown(
    broker, db, database_url, redis_url, start_worker, request
):
    broker_url = redis_url if broker == "redis" else request.getfixturevalue("rabbit").url
    env = service_env(
        DATABASE_URL=database_url, CELERY_BROKER_URL=broker_url, CELERY_RESULT_BACKEND=redis_url
    )
    payloads = [new_session() for _ in range(6000)]
    fill(client(broker_url, redis_url), payloads)
    first = start_worker(base_env=env, concurrency=2)
    wait_for(lambda: count_rows(db) >= 500, 120, "500 rows before the stop")

    took = stop_the_group(first)
    at_stop = count_rows(db)
    second = start_worker(base_env=env, concurrency=2)
    wait_for(lambda: count_rows(db) == len(payloads), 180, "every row after the restart")

    assert at_stop < len(payloads), "the stop must come mid-load"
    assert count_rows(db, "dead_letter") == 0
    assert duplicates(first.log(), second.log()) == 0, "a warm shutdown runs nothing twice"
    report(
        f"SIGTERM to the process group, loaded worker ({broker})",
        sent=len(payloads),
        rows_at_stop=at_stop,
        exited_after_seconds=round(took, 1),
        lost=len(payloads) - count_rows(db),
        duplicates=duplicates(first.log(), second.log()),
    )


def test_sigterm_to_the_process_group_of_the_embedded_worker_returns_promptly(
    tmp_path: Path, start_worker
):
    embedded = service_env()
    assert run_cli("migrate", env=embedded, cwd=tmp_path).returncode == 0
    sent, took = 0, []
    for _ in range(3):
        worker = start_worker(base_env=embedded, cwd=tmp_path)
        send(tmp_path, embedded, 40)
        sent += 40
        wait_for(lambda s=sent: rows(tmp_path) > s - 40, 60, "the worker writing")
        took.append(stop_the_group(worker))

    start_worker(base_env=embedded, cwd=tmp_path)
    wait_for(lambda: rows(tmp_path) == sent, 120, "every row after the restarts")
    report(
        "SIGTERM to the process group, embedded worker",
        runs=len(took),
        exited_after_seconds=[round(seconds, 1) for seconds in took],
        lost=sent - rows(tmp_path),
    )
