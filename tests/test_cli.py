"""The `writing-sessions` command, run as users run it: a subprocess with an environment."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
import sqlalchemy as sa

from tests.conftest import count_rows, run_cli, run_python, service_env
from tests.faults import stopped


def test_send_wait_list_and_show_round_trip(env, start_worker, tmp_path):
    start_worker()
    content = tmp_path / "essay.txt"
    content.write_text("今日は 晴れ です", encoding="utf-8")
    session_id = str(uuid.uuid4())

    sent = run_cli(
        "send",
        "--id",
        session_id,
        "--topic",
        " Diary ",
        "--content-file",
        str(content),
        "--author-id",
        "u-1",
        "--revision",
        "3",
        "--wait",
        env=env,
        cwd=tmp_path,
    )
    listed = run_cli("list", "--json", env=env, cwd=tmp_path)
    shown = run_cli("show", session_id, env=env, cwd=tmp_path)

    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout.splitlines()[-1]) == {
        "id": session_id,
        "outcome": "created",
        "revision": 3,
    }
    assert json.loads(listed.stdout.splitlines()[0])["id"] == session_id
    row = json.loads(shown.stdout)
    assert (row["topic"], row["content"], row["word_count"], row["char_count"]) == (
        "Diary",
        "今日は 晴れ です",
        3,
        7,
    )


def test_send_refuses_a_bad_payload_before_enqueueing(env, db, tmp_path):
    result = run_cli("send", "--topic", "x" * 300, env=env, cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.strip() == "Error: topic: must be at most 200 characters, got 300"
    assert "Traceback" not in result.stderr
    assert count_rows(db) == 0


def test_show_of_an_unknown_id_is_one_clear_line(env, tmp_path):
    missing = str(uuid.uuid4())

    result = run_cli("show", missing, env=env, cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: no writing session {missing}"


def test_a_bad_environment_variable_is_named_without_a_traceback(tmp_path):
    result = run_cli("list", env=service_env(CELERY_VISIBILITY_TIMEOUT="an hour"), cwd=tmp_path)

    assert result.returncode == 1
    assert "CELERY_VISIBILITY_TIMEOUT must be an integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_health_passes_with_a_worker_and_fails_without(env, start_worker, tmp_path):
    without = run_cli("health", "--workers", "--timeout", "1", env=env, cwd=tmp_path)
    start_worker()
    with_worker = run_cli("health", "--workers", env=env, cwd=tmp_path)

    assert without.returncode == 1
    assert "FAIL workers: no answer to ping" in without.stdout
    assert with_worker.returncode == 0, with_worker.stdout
    lines = with_worker.stdout.splitlines()
    assert [line.split(":")[0].split(" ")[0] for line in lines] == ["ok", "ok", "ok"]
    assert "workers: 1 answered" in with_worker.stdout


def test_health_of_one_node_fails_for_a_stopped_node_while_the_others_answer(
    env, start_worker, tmp_path
):
    workers = [start_worker(name=f"node{n}-{tmp_path.name[-6:]}@%h") for n in range(3)]
    with stopped([workers[1].pid]):
        each = [
            run_cli("health", "--node", worker.node, "--timeout", "2", env=env, cwd=tmp_path)
            for worker in workers
        ]
        anyone = run_cli("health", "--workers", "--timeout", "2", env=env, cwd=tmp_path)

    assert [result.returncode for result in each] == [0, 1, 0], [r.stdout for r in each]
    silent = workers[1].node.replace("%h", socket.gethostname())
    assert f"FAIL worker {silent}: no answer to ping" in each[1].stdout
    assert "1 answered" in each[0].stdout and "1 answered" in each[2].stdout
    assert anyone.returncode == 0  # why a container must not use --workers
    assert "2 answered" in anyone.stdout


def test_health_fails_on_an_unreachable_database_and_masks_the_password(env, tmp_path):
    bad = {**env, "DATABASE_URL": "postgresql://ws:hunter2@127.0.0.1:1/none"}

    result = run_cli("health", env=bad, cwd=tmp_path)

    assert result.returncode == 1
    assert "FAIL database" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr


def test_worker_command_leaves_celerys_cli_plugins_out_of_the_worker(env, tmp_path):
    # `celery worker` loads every celery.commands plugin (Flower, the REPL) into the parent, and
    # every prefork child inherits it: about 22 MB each. `writing-sessions worker` runs Celery's
    # worker command on its own; its options still work.
    script = """
import sys
from worker.cli import main
try:
    main(["worker", "--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
loaded = sorted(m for m in ("flower", "prompt_toolkit", "click_repl", "celery.bin.celery")
                if m in sys.modules)
print("loaded:", loaded)
"""
    result = run_python(script, env=env, cwd=tmp_path)

    assert "--concurrency" in result.stdout and "writing-sessions worker" in result.stdout
    assert "loaded: []" in result.stdout


LETTERS = [
    ("2026-11-01T10:00:00+00", None),
    ("2026-11-10T10:00:00+00", "2026-11-11T00:00:00+00"),
    ("2026-11-20T10:00:00+00", None),
]


def insert_letters(db: sa.Engine, rows: list[tuple[str, str | None]]) -> None:
    """Dead letters that failed (and were replayed) at the given times, each error naming it."""
    with db.begin() as connection:
        for failed_at, replayed_at in rows:
            connection.execute(
                sa.text(
                    "INSERT INTO dead_letter (task_name, task_id, payload, error_type, error,"
                    " attempts, failed_at, replayed_at) VALUES ('writing_sessions.save', NULL,"
                    " '{}', 'InvalidPayloadError', :error, 1, :failed_at, :replayed_at)"
                ),
                {
                    "error": f"failed {failed_at[:10]}",
                    "failed_at": failed_at,
                    "replayed_at": replayed_at,
                },
            )


def test_dead_letters_list_filters_by_time_and_by_what_is_pending(db, env, tmp_path):
    insert_letters(db, LETTERS)

    def listed(*options: str) -> list[str]:
        result = run_cli("dead-letters", "list", *options, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return [line.rsplit("failed ", 1)[1][:10] for line in result.stdout.splitlines()]

    assert listed() == ["2026-11-20", "2026-11-10", "2026-11-01"]
    assert listed("--since", "2026-11-05") == ["2026-11-20", "2026-11-10"]
    assert listed("--until", "2026-11-15") == ["2026-11-10", "2026-11-01"]
    assert listed("--since", "2026-11-05", "--until", "2026-11-15") == ["2026-11-10"]
    assert listed("--pending") == ["2026-11-20", "2026-11-01"]


def test_dead_letters_purge_deletes_what_failed_before_a_date_and_keeps_the_rest(db, env, tmp_path):
    insert_letters(db, [*LETTERS, ("2026-11-05T10:00:00+00", "2026-11-06T00:00:00+00")])

    def purge(*options: str) -> str:
        result = run_cli("dead-letters", "purge", *options, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def left() -> list[str]:
        with db.connect() as connection:
            errors = connection.execute(sa.text("SELECT error FROM dead_letter ORDER BY failed_at"))
            return [error[len("failed ") :] for (error,) in errors]

    replayed = purge("--before", "2026-11-15", "--replayed-only")
    assert left() == ["2026-11-01", "2026-11-20"]
    everything = purge("--before", "2026-11-15")
    assert left() == ["2026-11-20"]
    missing = run_cli("dead-letters", "purge", env=env, cwd=tmp_path)

    assert replayed == "purged 2 replayed dead letter(s) that failed before 2026-11-15 00:00:00 UTC"
    assert everything == "purged 1 dead letter(s) that failed before 2026-11-15 00:00:00 UTC"
    assert missing.returncode == 2 and "--before" in missing.stderr


def test_delete_with_wait_prints_the_outcome(env, start_worker, tmp_path):
    start_worker()
    session_id = str(uuid.uuid4())
    sent = run_cli("send", "--id", session_id, "--topic", "Gone soon", "--wait", env=env)
    assert sent.returncode == 0, sent.stderr

    deleted = run_cli("delete", session_id, "--revision", "1", "--wait", env=env, cwd=tmp_path)

    assert deleted.returncode == 0, deleted.stderr
    first, second = deleted.stdout.splitlines()
    assert first.startswith(f"sent delete of {session_id} as task ")
    assert json.loads(second) == {"id": session_id, "outcome": "deleted", "revision": 1}


# The bench starts a worker of its own.
@pytest.mark.slow
@pytest.mark.parametrize("producers", [1, 2])
def test_bench_reports_the_sessions_sent_as_they_go_not_only_at_the_end(
    db, env, tmp_path, producers
):
    # Paced, so that sending lasts over half a second however fast the machine: the bar reports
    # every 0.1 s.
    script = f"""
import json
from worker.bench import BenchOptions, run

reports = []
options = BenchOptions(
    count=600, interval=0.002, producers={producers}, start_worker=True, concurrency=1
)
run(options, lambda stage, done, total: reports.append((stage, done, total)))
print(json.dumps(reports))
"""

    result = run_python(script, env=env, cwd=tmp_path, timeout=300)

    reports = json.loads(result.stdout.splitlines()[-1])
    sent = [done for stage, done, total in reports if stage == "sent" and total == 600]
    assert sent == sorted(set(sent)), sent  # each report a step forward
    assert sent[-1] == 600
    assert len([done for done in sent if 0 < done < 600]) >= 3, sent
    assert count_rows(db) == 0
