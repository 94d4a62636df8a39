"""The embedded default: no configuration, no server, everything under ./var/."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import run_cli, run_python, service_env, wait_for

SEND_SCRIPT = """
import sys
from worker.producer import send_writing_session, send_writing_sessions
count, batch = int(sys.argv[1]), int(sys.argv[2])
for i in range(count):
    send_writing_session(topic=f"Embedded {i}", content="one two three")
if batch:
    send_writing_sessions([{"topic": f"Batch {i}"} for i in range(batch)])
"""


@pytest.fixture
def embedded(tmp_path: Path) -> dict[str, str]:
    """An empty directory and an environment with none of the service's variables."""
    result = run_cli("migrate", env=service_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return service_env()


def rows(directory: Path) -> int:
    with sqlite3.connect(directory / "var" / "writing-sessions.db") as connection:
        return connection.execute("SELECT count(*) FROM writing_session").fetchone()[0]


def send(directory: Path, env: dict[str, str], count: int, batch: int = 0) -> None:
    run_python(SEND_SCRIPT, str(count), str(batch), env=env, cwd=directory)


def test_embedded_migrate_worker_send_and_list_need_no_server(embedded, start_worker, tmp_path):
    start_worker(base_env=embedded, cwd=tmp_path)

    sent = [
        run_cli(
            "send",
            "--topic",
            f"CLI {i}",
            "--content",
            "今日は 晴れ",
            "--wait",
            env=embedded,
            cwd=tmp_path,
        )
        for i in range(3)
    ]
    send(tmp_path, embedded, 97)

    assert all(result.returncode == 0 for result in sent), [r.stderr for r in sent]
    assert json.loads(sent[0].stdout.splitlines()[-1])["outcome"] == "created"
    wait_for(lambda: rows(tmp_path) == 100, 120, "100 rows in SQLite")
    listed = run_cli("list", "--limit", "500", "--json", env=embedded, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 100
    assert sorted((tmp_path / "var").iterdir())[0].name == "broker.db"


def test_embedded_two_workers_writing_sqlite_concurrently_lose_nothing(
    embedded, start_worker, tmp_path
):
    start_worker(base_env=embedded, cwd=tmp_path, concurrency=2, name="one@%h")
    start_worker(base_env=embedded, cwd=tmp_path, concurrency=2, name="two@%h")

    send(tmp_path, embedded, 200, batch=300)

    wait_for(lambda: rows(tmp_path) == 500, 180, "500 rows in SQLite")
    with sqlite3.connect(tmp_path / "var" / "writing-sessions.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("SELECT count(*) FROM dead_letter").fetchone()[0] == 0


def test_embedded_revision_rule_matches_postgresql(embedded, start_worker, tmp_path):
    start_worker(base_env=embedded, cwd=tmp_path)
    script = """
import json, uuid
from worker.producer import send_writing_session, delete_writing_session
id = str(uuid.uuid4())
outcomes = [send_writing_session(id=id, topic="t", revision=r, confirm=True).result["outcome"]
            for r in (2, 3, 3, 1)]
outcomes.append(delete_writing_session(id, 4, confirm=True).result["outcome"])
for revision in (4, 5):
    outcome = send_writing_session(id=id, topic="back", revision=revision, confirm=True)
    outcomes.append(outcome.result["outcome"])
print(json.dumps(outcomes))
"""

    result = run_python(script, env=embedded, cwd=tmp_path)

    assert json.loads(result.stdout) == [
        "created",
        "updated",
        "duplicate",
        "stale",
        "deleted",
        "duplicate",
        "updated",
    ]
