"""Operators' logs: one line per task outcome, JSON on request, no password anywhere."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import (
    CELERY,
    CLI,
    WorkerProcess,
    create_database,
    drop_database,
    new_session,
    send_save,
    wait_for,
)
from worker.logs import mask_passwords


def test_mask_passwords_hides_every_url_password_in_a_text():
    text = "db postgresql://ws:pa55@db:5432/ws and amqp://guest:guest@rabbit// and redis://:r3d@r/0"

    masked = mask_passwords(text)

    assert "pa55" not in masked and ":guest@" not in masked and "r3d" not in masked
    assert "postgresql://ws:***@db:5432/ws" in masked


# --include'd by the JSON workers below: noise in each of their processes, at import in the main
# process and in each pool child as it starts.
NOISE = """\
import os
import threading
import warnings

from celery import signals


def noise(where):
    warnings.warn(f"a warning in {where}", UserWarning)
    print(f"a print in {where}")
    thread = threading.Thread(target=fail, args=(where,))
    thread.start()
    thread.join()


def fail(where):
    raise RuntimeError(f"an uncaught error in a thread of {where}")


noise("the main process")


@signals.worker_process_init.connect
def _in_each_child(**_):
    noise(f"pool child {os.getpid()}")
"""

COMMANDS = {"celery": [CELERY, "-A", "worker", "worker"], "writing-sessions": [CLI, "worker"]}


@pytest.fixture
def run_worker(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `celery -A worker worker` or `writing-sessions worker` with LOG_FORMAT=json, its
    stdout and stderr in one file; stop them all after the test."""
    workers: list[WorkerProcess] = []

    def run(command: str, *args: str, extra_env: dict[str, str] | None = None) -> WorkerProcess:
        node = f"json-{uuid.uuid4().hex[:6]}@%h"
        log_path = tmp_path / f"worker-{len(workers) + 1}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*COMMANDS[command], "-n", node, "--without-mingle", "--without-gossip", *args],
                env={**env, "LOG_FORMAT": "json", **(extra_env or {})},
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        workers.append(WorkerProcess(process, log_path, node))
        return workers[-1]

    yield run
    for worker in workers:
        worker.stop()


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON object; fails naming the lines that are not one."""
    records, others = [], []
    for line in text.removesuffix("\n").split("\n"):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            others.append(line)
    assert not others, f"{len(others)} of {len(records) + len(others)} lines not JSON: {others}"
    return records


@pytest.mark.parametrize("command", COMMANDS)
def test_json_logs_are_one_json_object_per_line_from_start_to_warm_shutdown(
    command, db, producer, run_worker, database_url, tmp_path
):
    (tmp_path / "noise.py").write_text(NOISE)
    with_password = make_url(database_url).set(password="s3cret-db-pw")
    worker = run_worker(
        command,
        *("-P", "prefork", "-c", "2", "-l", "INFO", "--include", "noise"),
        extra_env={"DATABASE_URL": with_password.render_as_string(hide_password=False)},
    )
    wait_for(lambda: " ready." in worker.log() or not worker.alive(), 60, "the worker ready")
    assert worker.alive(), worker.log()
    # A pool child killed: billiard's main process says so; the pool starts another.
    first = wait_for(lambda: len(c := worker.children()) == 2 and c, 30, "two children")
    wait_for(lambda: all(f"pool child {pid}" in worker.log() for pid in first), 30, "their noise")
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"pid:{victim} exited with" in worker.log(), 30, "the child's exit logged")
    (spare,) = wait_for(lambda: worker.children() - first, 30, "a new child")
    wait_for(lambda: f"pool child {spare}" in worker.log(), 30, "the new child's noise")
    good = new_session()

    send_save(producer, good).get(timeout=30)
    send_save(producer, {"id": str(uuid.uuid4())}).get(timeout=30, propagate=False)
    producer.send_task("writing_sessions.delete", args=[good["id"], 1]).get(timeout=30)
    wait_for(lambda: worker.log().count('"writing_sessions.tasks"') == 3, 30, "3 outcome lines")
    assert worker.stop() == 0

    records = json_lines(worker.log())
    created, failed, deleted = [r for r in records if r["logger"] == "writing_sessions.tasks"]
    assert (created["task"], created["session_id"], created["outcome"]) == (
        "writing_sessions.save",
        good["id"],
        "created",
    )
    assert failed["outcome"] == "failure"
    assert (deleted["task"], deleted["outcome"]) == ("writing_sessions.delete", "deleted")
    assert all(line["duration_ms"] >= 0 and line["task_id"] for line in (created, failed, deleted))
    assert "s3cret-db-pw" not in worker.log()
    # Bad input is an expected failure: the only tracebacks are the noise's uncaught errors.
    assert {r["logger"] for r in records if "exception" in r} == {"writing_sessions.uncaught"}

    def messages(logger: str) -> list[str]:
        return [r["message"] for r in records if r["logger"] == logger]

    (banner,) = [r for r in records if r["message"].endswith(" starting")]
    assert banner["logger"] == "celery.apps.worker"
    assert banner["concurrency"] == "2 (prefork)" and "celery" in banner["queues"]
    assert banner["transport"].startswith("worker.celery_ext.broker:Transport://")
    assert banner["results"].startswith("redis://")
    assert "writing_sessions.save" in banner["tasks"]
    warned = messages("py.warnings")
    # The noise of every process: both first children, and the one started after the kill.
    for where in ["the main process", *(f"pool child {pid}" for pid in (*first, spare))]:
        assert any(f"UserWarning: a warning in {where}\n" in m for m in warned), where
        assert f"a print in {where}" in messages("celery.redirected")
        assert any(
            m.endswith(f"a thread of {where}") for m in messages("writing_sessions.uncaught")
        )
    if os.geteuid() == 0:  # Celery's SecurityWarning, before it sets up logging
        assert any("SecurityWarning: You're running the worker with superuser" in m for m in warned)
    assert any(
        m.endswith(f"pid:{victim} exited with 'signal 9 (SIGKILL)'")
        for m in messages("multiprocessing")
    )
    assert "worker: Warm shutdown (MainProcess)" in messages("celery.apps.worker")


@pytest.fixture
def empty_database_url() -> Iterator[str]:
    """A database without the schema."""
    name = f"ws_test_empty_{uuid.uuid4().hex[:12]}"
    yield create_database(name)
    drop_database(name)


@pytest.mark.parametrize("command", COMMANDS)
def test_json_logs_show_an_uncaught_exception_that_stops_a_worker_as_one_json_object(
    command, env, run_worker, tmp_path
):
    (tmp_path / "broken.py").write_text('raise RuntimeError("this module cannot load")\n')
    worker = run_worker(command, "--include", "broken")

    assert worker.process.wait(60) == 1

    (uncaught,) = [r for r in json_lines(worker.log()) if "exception" in r]
    assert (uncaught["logger"], uncaught["level"], uncaught["message"]) == (
        "writing_sessions.uncaught",
        "CRITICAL",
        "uncaught RuntimeError: this module cannot load",
    )
    assert 'broken.py", line 1' in uncaught["exception"]


@pytest.mark.parametrize("command", COMMANDS)
def test_json_logs_say_that_the_schema_is_behind_in_json(
    command, env, run_worker, empty_database_url
):
    worker = run_worker(command, extra_env={"DATABASE_URL": empty_database_url})

    assert worker.process.wait(60) == 1

    records = [(r["logger"], r["message"]) for r in json_lines(worker.log())]
    assert any(
        logger == "worker.migrate" and "run `writing-sessions migrate`" in message
        for logger, message in records
    ), records
    # SystemExit's message, which Python itself writes to sys.stderr.
    assert any(
        logger == "celery.redirected" and message.startswith("writing-sessions: database ")
        for logger, message in records
    ), records


def test_text_logs_and_banner_never_show_the_broker_password(db, env, tmp_path):
    bad_broker = {**env, "CELERY_BROKER_URL": "amqp://guest:guest-secret-pw@127.0.0.1:5672//"}
    worker = subprocess.Popen(
        [CELERY, "-A", "worker", "worker", "-c", "1", "--without-mingle", "--without-gossip"],
        env=bad_broker,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = threading.Timer(60, worker.kill)  # bounds the read below
    deadline.start()
    output = b""
    try:
        assert worker.stdout is not None
        # A refused login ends the worker; the timer ends it otherwise.
        while chunk := worker.stdout.read1(65536):
            output += chunk
    finally:
        deadline.cancel()
        worker.kill()
        worker.wait(30)

    text = output.decode(errors="replace")
    assert "ACCESS_REFUSED" in text
    assert "transport:   amqp://guest:**@127.0.0.1:5672//" in text
    assert "guest-secret-pw" not in text


def test_text_logs_have_one_outcome_line_per_message_with_ids_and_duration(
    db, producer, start_worker
):
    worker = start_worker(concurrency=1)
    session = new_session()

    send_save(producer, session).get(timeout=30)

    line = wait_for(
        lambda: next((li for li in worker.log().splitlines() if "outcome=created" in li), None),
        10,
        "the outcome line",
    )
    assert re.search(
        r"INFO/ForkPoolWorker-\d+\] task created task_id=[0-9a-f-]{36} "
        rf"task=writing_sessions\.save session_id={session['id']} outcome=created "
        r"duration_ms=\d+(\.\d+)?$",
        line,
    ), line


def test_sql_echo_logs_the_statements(db, producer, start_worker):
    worker = start_worker(concurrency=1, extra_env={"SQL_ECHO": "1"})

    send_save(producer, new_session()).get(timeout=30)

    wait_for(lambda: "INSERT INTO writing_session" in worker.log(), 10, "the SQL in the log")
    assert "ON CONFLICT (id) DO UPDATE" in worker.log()
