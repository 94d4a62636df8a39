"""Crash-proof delivery: kills, restarts and brokers, against real processes.

Every test here ends with each message sent either in writing_session or in dead_letter,
exactly once per id. Figures go to test-artifacts/faults.jsonl for the README's Guarantees.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from tests.conftest import count_rows, new_session, service_env, wait_for, worker_connections
from tests.faults import PrivateRedis, RabbitVhost, kill9, report, wait_gone

pytestmark = pytest.mark.faults

FAST_RECOVERY = {
    # Redelivery of a dead worker's unacknowledged messages after 4 s instead of an hour.
    "CELERY_VISIBILITY_TIMEOUT": "4",
    "WRITING_SESSIONS_RETRY_BACKOFF_MAX": "1",
    "WRITING_SESSIONS_MAX_RETRIES": "30",
}


def client(broker: str, backend: str) -> Celery:
    app = Celery("fault-producer", broker=broker, backend=backend)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    return app


def fill(app: Celery, payloads: list[dict]) -> None:
    """Enqueue saves over one producer connection."""
    with app.producer_or_acquire() as producer:
        for payload in payloads:
            app.send_task("writing_sessions.save", args=[payload], producer=producer)


def persisted_ids(engine: sa.Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(sa.text("SELECT id::text FROM writing_session")).scalars())


def assert_every_message_home(engine: sa.Engine, payloads: list[dict]) -> None:
    ids = {p["id"] for p in payloads}
    assert persisted_ids(engine) == ids
    assert count_rows(engine, "dead_letter") == 0


CONFIRMING_PRODUCER = """
import json, sys
from worker.producer import send_writing_session_object
outcomes = []
for line in sys.stdin:
    result = send_writing_session_object(json.loads(line), confirm=True, timeout=6, attempts=10)
    outcomes.append(result.result["outcome"])
print(json.dumps(outcomes))
"""


def start_python(script: str, env: dict[str, str], payloads: list[dict]) -> subprocess.Popen:
    """Run `script` in a new Python process with one JSON payload per line on its stdin."""
    with tempfile.TemporaryFile("w+") as lines:
        lines.write("".join(json.dumps(p) + "\n" for p in payloads))
        lines.seek(0)
        return subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdin=lines,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def confirming_producers(env: dict[str, str], payloads: list[dict], processes: int):
    """Start producer processes that each send their share with confirm=True."""
    return [
        start_python(CONFIRMING_PRODUCER, env, payloads[share::processes])
        for share in range(processes)
    ]


def finish(running, timeout: float = 240) -> tuple[list[str], str]:
    outcomes: list[str] = []
    errors = ""
    for process in running:
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err[-2000:]
        outcomes += json.loads(out)
        errors += err
    return outcomes, errors


def test_kill_9_of_a_child_mid_load_redelivers_its_task(db, env, start_worker):
    worker = start_worker(concurrency=2)
    payloads = [new_session() for _ in range(3000)]
    fill(client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]), payloads)

    wait_for(lambda: count_rows(db) >= 600, 120, "600 rows before the kill")
    victim = min(worker.children())
    kill9(victim)
    wait_for(lambda: count_rows(db) == 3000, 180, "3,000 rows after the kill")

    assert_every_message_home(db, payloads)
    assert victim not in worker.children() and len(worker.children()) == 2
    assert worker.alive()
    report(
        "kill -9 of one prefork child",
        sent=3000,
        rows=count_rows(db),
        dead_letters=count_rows(db, "dead_letter"),
    )


def test_kill_9_of_the_main_process_redelivers_every_unacked_message(db, env, start_worker):
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    first = start_worker(concurrency=2, extra_env=FAST_RECOVERY)
    payloads = [new_session() for _ in range(1500)]
    fill(client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]), payloads)

    wait_for(lambda: count_rows(db) >= 400, 120, "400 rows before the kill")
    children = first.children()
    kill9(first.pid)
    wait_gone(children)
    unacked = broker.hlen("unacked")
    second = start_worker(concurrency=2, extra_env=FAST_RECOVERY)
    wait_for(lambda: count_rows(db) >= 1499, 180, "the rest after the restart")
    # Settle: nothing more arrives once queue and unacked set are empty.
    wait_for(lambda: broker.llen("celery") == 0 and broker.hlen("unacked") == 0, 60, "empty queues")

    lost = 1500 - count_rows(db)
    assert lost <= 1, "only the one message being received at the kill may be lost"
    assert count_rows(db, "dead_letter") == 0
    assert second.alive()
    report(
        "kill -9 of the main process (Redis), new worker",
        sent=len(payloads),
        unacked_at_kill=unacked,
        rows=count_rows(db),
        lost_in_receive_window=lost,
        dead_letters=0,
    )
    broker.close()


def test_confirming_producers_bring_every_message_home_across_main_process_kills(
    db, env, start_worker
):
    payloads = [new_session() for _ in range(240)]
    producer_env = {**env, **FAST_RECOVERY}
    worker = start_worker(concurrency=2, extra_env=FAST_RECOVERY)
    running = confirming_producers(producer_env, payloads, processes=6)
    kills = 0
    for threshold in (40, 100, 160):
        wait_for(lambda t=threshold: count_rows(db) >= t, 120, f"{threshold} rows")
        children = worker.children()
        kill9(worker.pid)
        wait_gone(children)
        kills += 1
        worker = start_worker(concurrency=2, extra_env=FAST_RECOVERY)

    outcomes, errors = finish(running)

    assert sorted(set(outcomes)) <= ["created", "duplicate"]
    assert len(outcomes) == 240
    assert_every_message_home(db, payloads)
    report(
        "kill -9 of the main process x3 with confirming producers (Redis)",
        sent=240,
        rows=count_rows(db),
        resends=errors.count("no outcome for"),
        kills=kills,
        duplicates=outcomes.count("duplicate"),
        dead_letters=0,
    )


def test_warm_shutdown_mid_load_and_restart_loses_and_doubles_nothing(db, env, start_worker):
    app = client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
    payloads = [new_session() for _ in range(1200)]
    first = start_worker(concurrency=2)
    fill(app, payloads[:900])

    wait_for(lambda: count_rows(db) >= 300, 120, "300 rows before the shutdown")
    first.process.send_signal(signal.SIGTERM)
    fill(app, payloads[900:])  # producers go on while the worker restarts
    assert first.process.wait(60) == 0
    start_worker(concurrency=2)
    wait_for(lambda: count_rows(db) == 1200, 180, "1,200 rows after the restart")

    assert_every_message_home(db, payloads)
    with db.connect() as connection:
        rewritten = connection.execute(
            sa.text("SELECT count(*) FROM writing_session WHERE updated_at <> created_at")
        ).scalar_one()
    assert rewritten == 0
    report(
        "warm shutdown (SIGTERM) and restart",
        sent=len(payloads),
        rows=count_rows(db),
        rewritten=rewritten,
        dead_letters=0,
    )


def test_postgresql_restart_mid_load_the_pool_recovers(db, env, start_worker):
    worker = start_worker(concurrency=2, extra_env=FAST_RECOVERY)
    payloads = [new_session() for _ in range(1000)]
    fill(client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]), payloads)

    wait_for(lambda: count_rows(db) >= 300, 120, "300 rows before the restart")
    version = next(iter(p.name for p in Path("/etc/postgresql").iterdir()))
    restarted = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restarted.returncode == 0, restarted.stderr
    wait_for(
        lambda: subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"]).returncode == 0,
        60,
        "PostgreSQL back",
    )
    wait_for(lambda: count_rows(db) == 1000, 180, "1,000 rows after the restart")

    assert_every_message_home(db, payloads)
    assert worker.alive()
    report(
        "PostgreSQL restarted mid-load",
        sent=len(payloads),
        rows=count_rows(db),
        retries=worker.log().count("transient fault, retry"),
        dead_letters=0,
    )


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory)
    yield server
    server.stop()


SENDING_PRODUCER = """
import json, sys, time
from worker.producer import send_writing_session_object
sent = 0
for line in sys.stdin:
    send_writing_session_object(json.loads(line))
    sent += 1
    time.sleep(0.002)
print(sent)
"""


def test_broker_restarts_mid_load_the_worker_reconnects_and_persists_everything(
    db, database_url, private_redis, start_worker, tmp_path
):
    env = service_env(
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=private_redis.url,
        CELERY_RESULT_BACKEND=private_redis.url,
        **FAST_RECOVERY,
    )
    worker = start_worker(concurrency=2, base_env=env)
    plain = [new_session() for _ in range(2500)]
    confirmed = [new_session() for _ in range(300)]
    sender = start_python(SENDING_PRODUCER, env, plain)
    confirmers = confirming_producers(env, confirmed, processes=4)

    restarts = 0
    for _ in range(16):
        wait_for(lambda r=restarts: count_rows(db) >= 120 * (r + 1), 120, "progress")
        private_redis.restart()
        restarts += 1
        assert worker.alive(), worker.log()[-3000:]
    out, err = sender.communicate(timeout=240)
    assert sender.returncode == 0, err[-2000:]
    assert int(out) == len(plain)
    outcomes, errors = finish(confirmers)
    wait_for(lambda: count_rows(db) >= len(plain) + len(confirmed) - restarts, 240, "the rows")
    redis_client = redis.Redis.from_url(private_redis.url)
    wait_for(
        lambda: redis_client.llen("celery") == 0 and redis_client.hlen("unacked") == 0,
        120,
        "queue and unacked set drained",
    )
    redis_client.close()

    ids = persisted_ids(db)
    lost = {p["id"] for p in plain} - ids
    # Every confirmed message is home; an unconfirmed one can be lost only if Redis went down
    # while handing it to the worker (BRPOP popped it; the reply never arrived): at most the
    # one in flight per restart.
    assert {p["id"] for p in confirmed} <= ids
    assert len(outcomes) == len(confirmed)
    assert len(lost) <= restarts
    assert count_rows(db, "dead_letter") == 0
    assert worker.alive()
    assert "Unrecoverable error" not in worker.log()
    report(
        "Redis (AOF everysec) restarted x16 mid-load, producers sending throughout",
        sent_plain=len(plain),
        sent_confirmed=len(confirmed),
        restarts=restarts,
        rows=count_rows(db),
        lost_unconfirmed=len(lost),
        lost_confirmed=0,
        resends=errors.count("no outcome for"),
        unacked_records_retried=worker.log().count("while recording message"),
        dead_letters=0,
    )


@pytest.fixture
def rabbit(redis_url: str) -> Iterator[RabbitVhost]:
    vhost = RabbitVhost()
    yield vhost
    vhost.delete()


def test_rabbitmq_end_to_end_with_kills_of_a_child_and_the_main_process(
    db, database_url, redis_url, rabbit, start_worker
):
    env = service_env(
        DATABASE_URL=database_url, CELERY_BROKER_URL=rabbit.url, CELERY_RESULT_BACKEND=redis_url
    )
    payloads = [new_session() for _ in range(3000)]
    worker = start_worker(concurrency=2, base_env=env)
    fill(client(rabbit.url, redis_url), payloads)

    wait_for(lambda: count_rows(db) >= 500, 120, "500 rows before killing a child")
    kill9(min(worker.children()))
    wait_for(lambda: count_rows(db) >= 1500, 120, "1,500 rows before killing the main process")
    children = worker.children()
    kill9(worker.pid)
    wait_gone(children)
    start_worker(concurrency=2, base_env=env)
    wait_for(lambda: count_rows(db) == 3000, 180, "3,000 rows on RabbitMQ")

    assert_every_message_home(db, payloads)
    report(
        "RabbitMQ: kill -9 of a child, then of the main process",
        sent=3000,
        rows=count_rows(db),
        lost=0,
        dead_letters=0,
    )


def test_two_nodes_on_one_queue_one_killed_the_other_finishes(db, env, start_worker):
    payloads = [new_session() for _ in range(300)]
    survivor = start_worker(concurrency=2, name="survivor@%h", extra_env=FAST_RECOVERY)
    victim = start_worker(concurrency=2, name="victim@%h", extra_env=FAST_RECOVERY)
    running = confirming_producers({**env, **FAST_RECOVERY}, payloads, processes=6)

    wait_for(lambda: count_rows(db) >= 100, 120, "100 rows before the kill")
    children = victim.children()
    kill9(victim.pid)
    wait_gone(children)
    outcomes, errors = finish(running)

    assert len(outcomes) == 300
    assert_every_message_home(db, payloads)
    assert survivor.alive()
    report(
        "two nodes, one kill -9'd, confirming producers (Redis)",
        sent=300,
        rows=count_rows(db),
        resends=errors.count("no outcome for"),
        dead_letters=0,
    )


def test_connection_budget_under_load(db, env, start_worker, database_url):
    worker = start_worker(concurrency=3)
    payloads = [new_session() for _ in range(800)]
    most = 0
    pids: set[int] = set()

    fill(client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]), payloads)

    def sample() -> bool:
        nonlocal most
        names = [name for name, _ in worker_connections(db, database_url)]
        most = max(most, len(names))
        pids.update(int(name.rsplit(":", 1)[1]) for name in names)
        return count_rows(db) == 800

    wait_for(sample, 180, "800 rows", interval=0.02)
    # The load is over: what is left open now must be idle, not inside a transaction.
    states = [state for _, state in worker_connections(db, database_url)]

    assert most <= 3
    assert worker.pid not in pids
    assert pids <= worker.children()
    assert "idle in transaction" not in states
    report(
        "connection budget, prefork -c 3",
        sent=len(payloads),
        max_connections=most,
        worker_processes=3,
        idle_in_transaction=states.count("idle in transaction"),
    )
