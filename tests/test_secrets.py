"""No password appears anywhere: settings, inspect, report, the CLI, logs, Flower, Redis, tables."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.conftest import CELERY, new_session, run_cli, service_env, wait_for
from tests.faults import PrivateRedis, RabbitVhost, ctl, free_port
from tests.test_flower import Flower
from worker.settings import load_settings

DB_PASSWORD = "db-pw-7f3a9c"
BROKER_PASSWORD = "broker-pw-51be0d"
RESULTS_PASSWORD = "results-pw-c2d8e4"
FLOWER_PASSWORD = "flower-pw-9e61aa"
RABBIT_PASSWORD = "rabbit-pw-0b47f2"
PASSWORDS = (DB_PASSWORD, BROKER_PASSWORD, RESULTS_PASSWORD, FLOWER_PASSWORD, RABBIT_PASSWORD)


def celery(env: dict[str, str], cwd: Path, node: str, *command: str) -> str:
    """What `celery -A worker <command>` prints (an inspect asks only `node`); it must succeed."""
    destination = ["-d", node] if command[0] == "inspect" else []
    run = subprocess.run(
        [CELERY, "-A", "worker", *command, *destination],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # A command that fails early (no reply, a bad configuration) prints little or nothing, and
    # an output without the password proves nothing then.
    assert run.returncode == 0, f"celery {' '.join(command)}: {run.stderr}"
    return run.stdout + run.stderr


def assert_no_password(outputs: dict[str, str]) -> None:
    """Fail naming every output that shows a password."""
    leaks = {
        name: [password for password in PASSWORDS if password in text]
        for name, text in outputs.items()
    }
    leaked = {name: found for name, found in leaks.items() if found}
    assert not leaked, f"passwords leaked in: {leaked}"
    assert all(outputs.values()), [name for name, text in outputs.items() if not text]


def test_settings_repr_and_str_mask_every_password():
    settings = load_settings(
        {
            "DATABASE_URL": f"postgresql://ws:{DB_PASSWORD}@db/ws",
            "CELERY_BROKER_URL": f"amqp://ws:{BROKER_PASSWORD}@rabbit//",
            "CELERY_RESULT_BACKEND": f"redis://:{RESULTS_PASSWORD}@redis/0",
            "FLOWER_BASIC_AUTH": f"ops:{FLOWER_PASSWORD},admin:{FLOWER_PASSWORD}",
        }
    )

    shown = {"repr": repr(settings), "str": str(settings), "format": f"{settings}"}

    assert_no_password(shown)
    assert "postgresql+psycopg2://ws:***@db/ws" in shown["repr"]
    assert "flower_basic_auth='ops:***,admin:***'" in shown["repr"]


@pytest.fixture
def secured_redis(private_redis: PrivateRedis) -> tuple[str, str]:
    """A private Redis with a broker user and a results user, each with its own password."""
    admin = redis.Redis.from_url(private_redis.url)
    for user, password in (("ws-broker", BROKER_PASSWORD), ("ws-results", RESULTS_PASSWORD)):
        admin.acl_setuser(
            user,
            enabled=True,
            passwords=[f"+{password}"],
            keys="*",
            channels="*",
            commands=["+@all"],
        )
    admin.close()
    host = f"127.0.0.1:{private_redis.port}/0"
    return (
        f"redis://ws-broker:{BROKER_PASSWORD}@{host}",
        f"redis://ws-results:{RESULTS_PASSWORD}@{host}",
    )


def redis_contents(url: str) -> str:
    """Every key and value of a Redis database, as text (strings, hashes, lists, sets)."""
    client = redis.Redis.from_url(url)
    parts = []
    for key in client.scan_iter(count=1000):
        readers = {
            b"string": client.get,
            b"hash": client.hgetall,
            b"list": lambda name: client.lrange(name, 0, -1),
            b"set": client.smembers,
            b"zset": lambda name: client.zrange(name, 0, -1),
        }
        value = readers.get(client.type(key), lambda _name: b"")(key)
        parts.append(f"{key!r} {value!r}")
    client.close()
    return "\n".join(parts) or "(empty)"


def table_contents(engine: sa.Engine) -> str:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT row_to_json(t)::text FROM dead_letter t UNION ALL "
                "SELECT row_to_json(t)::text FROM writing_session t"
            )
        ).scalars()
        return "\n".join(rows) or "(empty)"


def test_no_password_leaks_through_worker_cli_flower_results_or_tables(
    db, database_url, secured_redis, start_worker, tmp_path
):
    broker_url, results_url = secured_redis
    db_url = make_url(database_url).set(password=DB_PASSWORD).render_as_string(False)
    env = service_env(
        DATABASE_URL=db_url,
        CELERY_BROKER_URL=broker_url,
        CELERY_RESULT_BACKEND=results_url,
        FLOWER_BASIC_AUTH=f"ops:{FLOWER_PASSWORD}",
    )
    worker = start_worker(concurrency=1, base_env=env, loglevel="DEBUG")
    node = worker.node.replace("%h", subprocess.check_output(["hostname"], text=True).strip())
    flower_port = free_port()
    flower_log = tmp_path / "flower.log"
    with flower_log.open("wb") as out:
        flower_process = subprocess.Popen(
            [CELERY, "-A", "worker", "flower", f"--port={flower_port}", "--address=127.0.0.1"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    flower = Flower(flower_port, flower_process, flower_log, f"ops:{FLOWER_PASSWORD}")
    outputs: dict[str, str] = {}
    try:
        wait_for(lambda: flower.get("/healthcheck", auth=False)[0] == 200, 60, "Flower")
        good = new_session(topic="Secrets")

        def cli(name: str, *args: str) -> str:
            result = run_cli(*args, env=env, cwd=tmp_path)
            outputs[f"writing-sessions {name}"] = result.stdout + result.stderr
            # Only the output of a command that did its work shows it leaks nothing.
            assert result.returncode == 0, f"writing-sessions {name}: {result.stderr}"
            return result.stdout

        cli("migrate", "migrate")
        cli("health", "health", "--workers")
        sent = run_cli("send", "--id", good["id"], "--topic", "Secrets", "--wait", env=env)
        outputs["writing-sessions send --wait"] = sent.stdout + sent.stderr
        assert sent.returncode == 0, sent.stderr
        assert '"outcome": "created"' in sent.stdout, sent.stderr
        bad = run_cli("send", "--topic", " ", env=env)
        outputs["writing-sessions send (bad)"] = bad.stdout + bad.stderr
        # It must fail at validation, with the configuration loaded, not on something earlier.
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert bad.stderr.strip() == "Error: topic: must not be empty or only whitespace"
        app_send = subprocess.run(
            [
                str(Path(CELERY).parent / "python"),
                "-c",
                "from worker.app import app; "
                "app.send_task('writing_sessions.save', args=[{'topic': 7}]).get(timeout=30, "
                "propagate=False)",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        outputs["producer of a bad message"] = app_send.stdout + app_send.stderr + "(ran)"
        assert app_send.returncode == 0, app_send.stderr
        cli("delete", "delete", good["id"], "--revision", "1", "--wait")
        cli("list", "list")
        cli("list --json", "list", "--json")
        cli("show", "show", good["id"])
        wait_for(
            lambda: "1 " in cli("dead-letters list", "dead-letters", "list") or None,
            30,
            "the dead letter",
        )
        cli("dead-letters show", "dead-letters", "show", "1")
        cli("dead-letters replay", "dead-letters", "replay", "1")
        cli("bench", "bench", "--count", "20", "--json")
        for command in (
            ("inspect", "conf"),
            ("inspect", "stats"),
            ("inspect", "registered"),
            ("inspect", "active_queues"),
            ("report",),
        ):
            outputs[f"celery {' '.join(command)}"] = celery(env, tmp_path, node, *command)
        assert DB_PASSWORD not in outputs["celery inspect conf"]
        assert "task_acks_late" in outputs["celery inspect conf"]

        def listed() -> str:
            status, body = flower.get("/api/workers?refresh=1")
            return body if status == 200 and node in body and '"conf"' in body else ""

        outputs["Flower /api/workers?refresh=1"] = wait_for(listed, 60, "Flower's worker list")
        for path in (
            "/api/workers",
            "/api/tasks",
            f"/worker/{node}",
            "/tasks",
            "/workers",
            "/metrics",
        ):
            status, body = flower.get(path)
            assert status == 200, (path, status)
            outputs[f"Flower {path}"] = body
    finally:
        flower_process.terminate()
        flower_process.wait(30)
        stopped = worker.stop()
    outputs["worker log (DEBUG)"] = worker.log()
    assert stopped == 0, outputs["worker log (DEBUG)"][-3000:]
    outputs["Flower log"] = flower_log.read_text(errors="replace")
    outputs["Redis keys and values (results, unacked, bindings)"] = redis_contents(results_url)
    outputs["dead_letter and writing_session rows"] = table_contents(db)

    assert_no_password(outputs)
    assert "writing_sessions.save" in outputs["Flower /api/tasks"]
    assert json.loads(outputs["Flower /api/workers"])


@pytest.fixture
def rabbit_user() -> Iterator[str]:
    """A RabbitMQ vhost and a user of the test's own, with a password."""
    vhost = RabbitVhost()
    user = f"ws-{uuid.uuid4().hex[:8]}"
    ctl("add_user", user, RABBIT_PASSWORD)
    ctl("set_permissions", "-p", vhost.name, user, ".*", ".*", ".*")
    yield f"amqp://{user}:{RABBIT_PASSWORD}@127.0.0.1:5672/{vhost.name}"
    ctl("delete_user", user)
    vhost.delete()


def test_no_password_leaks_with_a_rabbitmq_broker(
    db, database_url, redis_url, rabbit_user, start_worker, tmp_path
):
    env = service_env(
        DATABASE_URL=database_url, CELERY_BROKER_URL=rabbit_user, CELERY_RESULT_BACKEND=redis_url
    )
    worker = start_worker(concurrency=1, base_env=env, loglevel="DEBUG")
    node = worker.node.replace("%h", subprocess.check_output(["hostname"], text=True).strip())
    outputs: dict[str, str] = {}

    for command in (("inspect", "conf"), ("inspect", "stats"), ("report",)):
        outputs[f"celery {' '.join(command)}"] = celery(env, tmp_path, node, *command)
    health = run_cli("health", "--workers", env=env, cwd=tmp_path)
    outputs["writing-sessions health --workers"] = health.stdout + health.stderr
    stopped = worker.stop()
    outputs["worker log (DEBUG)"] = worker.log()

    assert_no_password(outputs)
    assert health.returncode == 0, health.stdout + health.stderr
    assert stopped == 0, outputs["worker log (DEBUG)"][-3000:]
    assert "amqp://" in outputs["celery inspect stats"] or "py-amqp" in outputs["celery report"]
