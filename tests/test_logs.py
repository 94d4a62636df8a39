"""Operators' logs: one line per task outcome, JSON on request, no password anywhere."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import uuid

from sqlalchemy.engine import make_url

from tests.conftest import CELERY, new_session, send_save, wait_for
from worker.logs import mask_passwords


def test_mask_passwords_hides_every_url_password_in_a_text():
    text = "db postgresql://ws:pa55@db:5432/ws and amqp://guest:guest@rabbit// and redis://:r3d@r/0"

    masked = mask_passwords(text)

    assert "pa55" not in masked and ":guest@" not in masked and "r3d" not in masked
    assert "postgresql://ws:***@db:5432/ws" in masked


def test_json_logs_have_one_line_per_outcome_with_ids_and_duration(
    db, env, producer, start_worker, database_url
):
    with_password = make_url(database_url).set(password="s3cret-db-pw")
    worker = start_worker(
        extra_env={
            "LOG_FORMAT": "json",
            "DATABASE_URL": with_password.render_as_string(hide_password=False),
        }
    )
    good = new_session()

    send_save(producer, good).get(timeout=30)
    send_save(producer, {"id": str(uuid.uuid4())}).get(timeout=30, propagate=False)
    producer.send_task("writing_sessions.delete", args=[good["id"], 1]).get(timeout=30)

    def outcome_lines() -> list[dict]:
        lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
        outcomes = [line for line in lines if line["logger"] == "writing_sessions.tasks"]
        return outcomes if len(outcomes) == 3 else []

    created, failed, deleted = wait_for(outcome_lines, 30, "three outcome lines")
    assert (created["task"], created["session_id"], created["outcome"]) == (
        "writing_sessions.save",
        good["id"],
        "created",
    )
    assert failed["outcome"] == "failure"
    assert (deleted["task"], deleted["outcome"]) == ("writing_sessions.delete", "deleted")
    assert all(line["duration_ms"] >= 0 and line["task_id"] for line in (created, failed, deleted))
    assert "s3cret-db-pw" not in worker.log()
    assert "Traceback" not in worker.log()  # bad input is an expected failure


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
