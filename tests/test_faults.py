"""Crash-proof delivery: kills, restarts and brokers, against real processes.

Every test here ends with each message sent either in writing_session or in dead_letter,
exactly once per id: nothing lost, at the production visibility timeout (an hour), so that a
dead worker's messages can only come back by heartbeat (celery_ext/broker.py). Each fault checks
that it hit work in flight and counts the duplicates it caused (a redelivered message that was
already written ends `duplicate`). Figures go to test-artifacts/faults.jsonl for the README's
Guarantees.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from tests.conftest import (
    CELERY,
    count_rows,
    new_session,
    service_env,
    wait_for,
    worker_connections,
)
from tests.faults import (
    ctl,
    duplicates,
    held_by,
    kill9,
    report,
    stopped,
    wait_gone,
)
from worker.celery_ext.broker import Channel

pytestmark = pytest.mark.faults

FAST_RETRIES = {
    # Transient faults (a database restart) retried every second, not with minutes of backoff.
    "WRITING_SESSIONS_RETRY_BACKOFF_MAX": "1",
    "WRITING_SESSIONS_MAX_RETRIES": "30",
}
# A dead consumer's messages are restored once its heartbeat is this old, plus up to one
# heartbeat interval until a live worker looks, plus the restore itself.
RECOVERY_BOUND = Channel.consumer_heartbeat_timeout + 2 * Channel.consumer_heartbeat_interval + 3


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


def missing(engine: sa.Engine, payloads: list[dict]) -> int:
    """Payloads sent whose id is not in writing_session: what the report calls lost."""
    return len({p["id"] for p in payloads} - persisted_ids(engine))


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


def start_fed_python(script: str, env: dict[str, str]) -> subprocess.Popen:
    """Run `script` in a new Python process whose stdin the test feeds, a few payloads at a time."""
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def feed(process: subprocess.Popen, payloads: list[dict]) -> None:
    assert process.stdin is not None
    process.stdin.write("".join(json.dumps(p) + "\n" for p in payloads))
    process.stdin.flush()


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
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    payloads = [new_session() for _ in range(5000)]
    # A backlog queued before the worker starts: it keeps up with one producer, and would
    # otherwise hold nothing at the kill.
    fill(client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]), payloads)
    worker = start_worker(concurrency=2)

    wait_for(
        lambda: count_rows(db) >= 600 and held_by(broker, worker.pid) > 0,
        120,
        "600 rows, and the worker holding messages, before the kill",
    )
    held = held_by(broker, worker.pid)
    victim = min(worker.children())
    kill9(victim)
    wait_for(lambda: count_rows(db) == 5000, 180, "5,000 rows after the kill")

    assert_every_message_home(db, payloads)
    assert held > 0, "the kill must hit messages in flight"
    wait_for(
        lambda: victim not in worker.children() and len(worker.children()) == 2,
        30,
        "the pool to replace the killed child",
    )
    assert worker.alive()
    report(
        "kill -9 of one prefork child",
        sent=len(payloads),
        held_at_kill=held,
        rows=count_rows(db),
        lost=missing(db, payloads),
        duplicates=duplicates(worker.log()),
        dead_letters=count_rows(db, "dead_letter"),
    )
    broker.close()


def wait_restored(broker: redis.Redis, pid: int, since: float) -> float:
    """Seconds from `since` until no message is recorded for the dead worker `pid` any more."""
    wait_for(lambda: held_by(broker, pid) == 0, 120, f"the messages of dead worker {pid} back")
    return time.monotonic() - since


def test_kill_9_of_the_main_process_every_held_message_comes_back_by_heartbeat(
    db, env, start_worker
):
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    app = client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
    worker = start_worker(concurrency=2)
    sent = 0
    for repetition in range(5):
        # A backlog, queued while the children are stopped: the worker, faster than one
        # producer, would otherwise keep up with the fill and hold nothing at the kill.
        payloads = [new_session() for _ in range(3000)]
        with stopped(worker.children()):
            fill(app, payloads)

        wait_for(
            lambda s=sent, w=worker: count_rows(db) >= s + 400 and held_by(broker, w.pid) > 0,
            120,
            "400 rows, and the worker holding messages, before the kill",
        )
        children = worker.children()
        killed_at = time.monotonic()
        kill9(worker.pid)
        held = held_by(broker, worker.pid)
        wait_gone(children)
        dead = worker.pid
        worker = start_worker(concurrency=2)
        back_after = wait_restored(broker, dead, killed_at)
        sent += len(payloads)
        wait_for(lambda s=sent: count_rows(db) == s, 180, "every row after the restart")

        assert held > 0, "the kill must hit messages in flight"
        assert back_after <= RECOVERY_BOUND, f"held messages back after {back_after:.1f} s"
        report(
            "kill -9 of the main process (Redis, visibility timeout 3600 s), new worker",
            repetition=repetition + 1,
            sent=len(payloads),
            held_at_kill=held,
            back_after_seconds=round(back_after, 1),
            lost=sent - count_rows(db),
            duplicates=duplicates(worker.log()),  # the redelivered copies run on the new one
        )

    assert count_rows(db) == sent
    assert count_rows(db, "dead_letter") == 0
    assert worker.alive()
    broker.close()


def test_a_kill_right_after_a_fetch_and_before_any_task_ran_loses_nothing(db, env, start_worker):
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    first = start_worker(concurrency=2)
    children = first.children()
    for child in children:  # no task can run: whatever the main process fetches, it only holds
        os.kill(child, signal.SIGSTOP)
    payloads = [new_session() for _ in range(50)]
    fill(client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]), payloads)

    held = wait_for(lambda: held_by(broker, first.pid), 30, "the worker to fetch")
    killed_at = time.monotonic()
    kill9(first.pid)
    rows_at_kill = count_rows(db)
    for child in children:
        kill9(child)
    wait_gone(children)
    second = start_worker(concurrency=2)
    back_after = wait_restored(broker, first.pid, killed_at)
    wait_for(lambda: count_rows(db) == 50, 120, "all 50 rows")

    assert held > 0 and rows_at_kill == 0
    assert back_after <= RECOVERY_BOUND
    assert_every_message_home(db, payloads)
    report(
        "kill -9 of the main process right after a fetch, before any task ran",
        sent=50,
        held_at_kill=held,
        back_after_seconds=round(back_after, 1),
        lost=missing(db, payloads),
        duplicates=duplicates(first.log(), second.log()),
    )
    broker.close()


def test_confirming_producers_bring_every_message_home_across_main_process_kills(
    db, env, start_worker
):
    payloads = [new_session() for _ in range(240)]
    producer_env = {**env, **FAST_RETRIES}
    worker = start_worker(concurrency=2, extra_env=FAST_RETRIES)
    running = confirming_producers(producer_env, payloads, processes=6)
    kills = 0
    logs: list[str] = []
    for threshold in (40, 100, 160):
        wait_for(lambda t=threshold: count_rows(db) >= t, 120, f"{threshold} rows")
        children = worker.children()
        kill9(worker.pid)
        wait_gone(children)
        logs.append(worker.log())
        kills += 1
        worker = start_worker(concurrency=2, extra_env=FAST_RETRIES)

    outcomes, errors = finish(running)

    assert set(outcomes) <= {"created", "duplicate"}
    assert len(outcomes) == 240
    assert_every_message_home(db, payloads)
    report(
        "kill -9 of the main process x3 with confirming producers (Redis)",
        sent=240,
        rows=count_rows(db),
        lost=missing(db, payloads),
        resends=errors.count("no outcome for"),
        kills=kills,
        duplicate_outcomes=outcomes.count("duplicate"),
        duplicates=duplicates(*logs, worker.log()),
        dead_letters=count_rows(db, "dead_letter"),
    )


def test_warm_shutdown_mid_load_and_restart_loses_and_doubles_nothing(db, env, start_worker):
    app = client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
    payloads = [new_session() for _ in range(4000)]
    # A backlog queued before the worker starts: it keeps up with one producer, and would
    # otherwise hold nothing at the shutdown.
    fill(app, payloads[:3700])
    first = start_worker(concurrency=2)

    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    wait_for(
        lambda: count_rows(db) >= 300 and held_by(broker, first.pid) > 0,
        120,
        "300 rows, and the worker holding messages, before the shutdown",
    )
    held = held_by(broker, first.pid)
    first.process.send_signal(signal.SIGTERM)
    fill(app, payloads[3700:])  # producers go on while the worker restarts
    assert first.process.wait(60) == 0
    returned = broker.llen("celery")
    second = start_worker(concurrency=2)
    wait_for(lambda: count_rows(db) == 4000, 180, "4,000 rows after the restart")

    assert_every_message_home(db, payloads)
    with db.connect() as connection:
        rewritten = connection.execute(
            sa.text("SELECT count(*) FROM writing_session WHERE updated_at <> created_at")
        ).scalar_one()
    doubled = duplicates(first.log(), second.log())
    assert rewritten == 0 and doubled == 0
    assert held > 0, "the shutdown must find messages in flight"
    assert held_by(broker, first.pid) == 0, "a warm shutdown returns what it held"
    broker.close()
    report(
        "warm shutdown (SIGTERM) and restart",
        sent=len(payloads),
        rows=count_rows(db),
        held_at_shutdown=held,
        waiting_after_shutdown=returned,
        rewritten=rewritten,
        duplicates=doubled,
        lost=missing(db, payloads),
        dead_letters=count_rows(db, "dead_letter"),
    )


@pytest.mark.exclusive  # restarts the machine's PostgreSQL, which every test process uses
def test_postgresql_restart_mid_load_the_pool_recovers(db, env, start_worker):
    # A backlog queued before the worker starts: it keeps up with one producer, and would
    # otherwise hold nothing at the restart.
    payloads = [new_session() for _ in range(5000)]
    fill(client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]), payloads)
    worker = start_worker(concurrency=2, extra_env=FAST_RETRIES)

    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    wait_for(
        lambda: count_rows(db) >= 300 and held_by(broker, worker.pid) > 0,
        120,
        "300 rows, and the worker holding messages, before the restart",
    )
    held = held_by(broker, worker.pid)
    broker.close()
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
    wait_for(lambda: count_rows(db) == 5000, 180, "5,000 rows after the restart")

    assert held > 0, "the restart must hit messages in flight"
    assert_every_message_home(db, payloads)
    assert worker.alive()
    report(
        "PostgreSQL restarted mid-load",
        sent=len(payloads),
        held_at_restart=held,
        rows=count_rows(db),
        retries=worker.log().count("transient fault, retry"),
        duplicates=duplicates(worker.log()),
        lost=missing(db, payloads),
        dead_letters=count_rows(db, "dead_letter"),
    )


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


def unread_bytes(pid: int) -> int:
    """Bytes waiting in the pipes process `pid` holds (a job written to a pool child, say)."""
    waiting = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if not os.readlink(fd).startswith("pipe:"):
            continue
        reopened = os.open(fd, os.O_RDONLY | os.O_NONBLOCK)  # the same pipe, as a reader
        try:
            waiting += struct.unpack("i", fcntl.ioctl(reopened, termios.FIONREAD, b"\0" * 4))[0]
        finally:
            os.close(reopened)
    return waiting


def test_warm_shutdown_reads_the_results_of_groups_a_child_had_not_yet_accepted(
    db, env, start_worker
):
    # Children stopped: each gets a group written into its pipe that it cannot acknowledge, and
    # the warm shutdown starts with both groups in that state. Celery's pool flush forgets such
    # jobs; the children run them once continued, so their messages must be acknowledged, not
    # returned to the queue to run again.
    first = start_worker(concurrency=2)
    children = first.children()
    payloads = [new_session() for _ in range(200)]
    with stopped(children):
        fill(client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]), payloads)
        wait_for(lambda: all(unread_bytes(c) for c in children), 30, "a group in each child's pipe")
        first.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "Warm shutdown" in first.log(), 30, "the warm shutdown to start")
    assert first.process.wait(60) == 0
    written_by_first = count_rows(db)
    second = start_worker(concurrency=2)
    wait_for(lambda: count_rows(db) == len(payloads), 120, "every row")

    assert written_by_first > 0, "the groups in the children's pipes must have run"
    assert_every_message_home(db, payloads)
    assert duplicates(first.log(), second.log()) == 0
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    assert held_by(broker, first.pid) == 0
    broker.close()
    report(
        "warm shutdown with groups written to stopped children",
        sent=len(payloads),
        written_before_exit=written_by_first,
        duplicates=duplicates(first.log(), second.log()),
        lost=missing(db, payloads),
    )


def test_broker_restarts_mid_load_the_worker_reconnects_and_persists_everything(
    db, database_url, private_redis, start_worker, tmp_path
):
    env = service_env(
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=private_redis.url,
        CELERY_RESULT_BACKEND=private_redis.url,
        **FAST_RETRIES,
    )
    worker = start_worker(concurrency=2, base_env=env)
    plain = [new_session() for _ in range(2500)]
    confirmed = [new_session() for _ in range(300)]
    # The plain producer is fed ahead of the restarts (400 payloads, then 130 more before each),
    # so it is still sending at every restart however fast the worker drains.
    sender = start_fed_python(SENDING_PRODUCER, env)
    feed(sender, plain[:400])
    fed = 400
    confirmers = confirming_producers(env, confirmed, processes=4)

    broker = redis.Redis.from_url(private_redis.url)
    in_flight = []
    for restart in range(16):
        wait_for(
            lambda r=restart: count_rows(db) >= 120 * (r + 1) or sender.poll() is not None,
            120,
            "progress",
        )
        assert sender.poll() is None, f"the producer stopped: {sender.stderr.read()[-2000:]}"
        feed(sender, plain[fed : fed + 130])
        fed += 130
        in_flight.append(broker.hlen("unacked"))
        private_redis.restart()
        assert worker.alive(), worker.log()[-3000:]
    feed(sender, plain[fed:])
    out, err = sender.communicate(timeout=240)
    assert sender.returncode == 0, err[-2000:]
    assert int(out) == len(plain)
    outcomes, errors = finish(confirmers)
    total = len(plain) + len(confirmed)
    wait_for(lambda: count_rows(db) == total, 240, "every row")
    wait_for(
        lambda: broker.llen("celery") == 0 and broker.hlen("unacked") == 0,
        120,
        "queue and unacked set drained",
    )
    broker.close()

    ids = persisted_ids(db)
    assert {p["id"] for p in plain + confirmed} == ids
    assert len(outcomes) == len(confirmed)
    assert sum(1 for held in in_flight if held) >= 12, f"restarts that hit work: {in_flight}"
    assert count_rows(db, "dead_letter") == 0
    assert worker.alive()
    assert "Unrecoverable error" not in worker.log()
    report(
        "Redis (AOF everysec) restarted x16 mid-load, producers sending throughout",
        sent_plain=len(plain),
        sent_confirmed=len(confirmed),
        restarts=16,
        held_at_each_restart=in_flight,
        rows=count_rows(db),
        lost_unconfirmed=missing(db, plain),
        lost_confirmed=missing(db, confirmed),
        resends=errors.count("no outcome for"),
        duplicates=duplicates(worker.log()),
        dead_letters=count_rows(db, "dead_letter"),
    )


def rabbitmq_backlog(
    rabbit: Any, database_url: str, redis_url: str, start_worker: Any
) -> tuple[dict[str, str], list[dict], Any]:
    """3,000 saves on the test's RabbitMQ vhost, then a prefork worker on them: its environment,
    the payloads and the worker. Queued first: a worker keeps up with one producer, and would
    otherwise hold nothing when the test strikes."""
    env = service_env(
        DATABASE_URL=database_url, CELERY_BROKER_URL=rabbit.url, CELERY_RESULT_BACKEND=redis_url
    )
    payloads = [new_session() for _ in range(3000)]
    fill(client(rabbit.url, redis_url), payloads)
    return env, payloads, start_worker(concurrency=2, base_env=env)


def test_rabbitmq_end_to_end_with_kills_of_a_child_and_the_main_process(
    db, database_url, redis_url, rabbit, start_worker
):
    env, payloads, worker = rabbitmq_backlog(rabbit, database_url, redis_url, start_worker)

    wait_for(lambda: count_rows(db) >= 500, 120, "500 rows before killing a child")
    held_at_child_kill = rabbit.unacknowledged()
    kill9(min(worker.children()))
    wait_for(lambda: count_rows(db) >= 1500, 120, "1,500 rows before killing the main process")
    children = worker.children()
    held_at_main_kill = rabbit.unacknowledged()
    kill9(worker.pid)
    wait_gone(children)
    successor = start_worker(concurrency=2, base_env=env)
    wait_for(lambda: count_rows(db) == 3000, 180, "3,000 rows on RabbitMQ")

    assert held_at_child_kill > 0 and held_at_main_kill > 0
    assert_every_message_home(db, payloads)
    report(
        "RabbitMQ: kill -9 of a child, then of the main process",
        sent=3000,
        held_at_kills=[held_at_child_kill, held_at_main_kill],
        rows=count_rows(db),
        lost=missing(db, payloads),
        duplicates=duplicates(worker.log(), successor.log()),
        dead_letters=count_rows(db, "dead_letter"),
    )


def test_rabbitmq_connections_closed_mid_drain_the_worker_reconnects_and_writes_everything(
    db, database_url, redis_url, rabbit, start_worker
):
    # A broker that drops the worker's connections (a restart, a failover, a cancelled
    # consumer) while groups wait for a process: what waited is redelivered, and group commit
    # must not go on counting the jobs the pool forgot, nor wait for a flush the closed loop
    # dropped (either left the worker connected and idle).
    _, payloads, worker = rabbitmq_backlog(rabbit, database_url, redis_url, start_worker)

    for closed in range(3):
        wait_for(lambda c=closed: count_rows(db) >= 500 * (c + 1), 120, "rows before the close")
        ctl("close_all_connections", "-p", rabbit.name, "closed by the test")
        wait_for(lambda: "Connected to amqp" in worker.log().rpartition("lost")[2], 60, "reconnect")
    wait_for(lambda: count_rows(db) == 3000, 180, "3,000 rows after three closed connections")

    assert_every_message_home(db, payloads)
    assert worker.alive()
    report(
        "RabbitMQ: every connection closed three times mid-drain",
        sent=3000,
        lost=missing(db, payloads),
        duplicates=duplicates(worker.log()),
    )


def test_two_nodes_on_one_queue_one_killed_the_survivor_finishes_its_messages(
    db, env, start_worker
):
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    payloads = [new_session() for _ in range(3000)]
    victim = start_worker(concurrency=2, name="victim@%h")
    # The victim's children stopped: what its main process takes stays held until the kill (on
    # a loaded machine the survivor alone could otherwise drain the queue before the victim
    # takes anything).
    children = victim.children()
    for child in children:
        os.kill(child, signal.SIGSTOP)
    survivor = start_worker(concurrency=2, name="survivor@%h")
    fill(client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]), payloads)

    wait_for(
        lambda: count_rows(db) >= 500 and held_by(broker, victim.pid),
        120,
        "500 rows, and the victim holding messages, before the kill",
    )
    killed_at = time.monotonic()
    kill9(victim.pid)
    held = held_by(broker, victim.pid)
    for child in children:
        kill9(child)
    wait_gone(children)
    back_after = wait_restored(broker, victim.pid, killed_at)
    wait_for(lambda: count_rows(db) == 3000, 180, "3,000 rows")

    assert held > 0, "the kill must hit messages in flight"
    assert back_after <= RECOVERY_BOUND
    assert_every_message_home(db, payloads)
    assert survivor.alive()
    report(
        "two nodes (Redis), one kill -9'd, the survivor restores its messages",
        sent=len(payloads),
        held_at_kill=held,
        back_after_seconds=round(back_after, 1),
        rows=count_rows(db),
        lost=missing(db, payloads),
        duplicates=duplicates(survivor.log(), victim.log()),
        dead_letters=count_rows(db, "dead_letter"),
    )
    broker.close()


STOCK_WORKER = """
import sys
from worker.app import app
app.conf.broker_transport = None  # kombu's own Redis transport, as before this project's
app.worker_main(sys.argv[1:])
"""


def test_a_fleet_mid_upgrade_restores_both_kinds_of_workers_messages(
    db, env, start_worker, tmp_path
):
    # kombu's stock transport knows only the visibility timeout: give it a short one here.
    fleet_env = {**env, "CELERY_VISIBILITY_TIMEOUT": "8"}
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    app = client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
    first, second = [new_session() for _ in range(1500)], [new_session() for _ in range(3000)]
    ours = start_worker(concurrency=1, name="ours@%h", base_env=fleet_env)
    with (tmp_path / "stock.log").open("wb") as log:
        stock = subprocess.Popen(
            [
                sys.executable,
                "-c",
                STOCK_WORKER,
                "worker",
                "-c",
                "1",
                "-n",
                "stock@%h",
                "-l",
                "INFO",
                "--without-mingle",
                "--without-gossip",
            ],
            env=fleet_env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        fleet_mid_upgrade(
            db, broker, app, ours, stock, fleet_env, start_worker, first, second, tmp_path
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stock.pid, signal.SIGKILL)  # a failing test must not leave it consuming
        stock.wait(30)


def fleet_mid_upgrade(  # the body of the test above, which kills its stock worker whatever happens
    db, broker, app, ours, stock, fleet_env, start_worker, first, second, tmp_path
):
    # Ours' children stopped before the first messages: what its main process takes stays held
    # until the kill (both workers keep up with one producer, and would otherwise hold nothing
    # then). Killed at once: the stock worker's sweep restores what has been unacknowledged
    # for 8 s, ours' held messages included, and the test would then find nothing held.
    children = ours.children()
    for child in children:
        os.kill(child, signal.SIGSTOP)
    fill(app, first[:200])
    wait_for(lambda: held_by(broker, ours.pid) > 0, 60, "ours to hold messages")
    ours_held = held_by(broker, ours.pid)
    kill9(ours.pid)
    for child in children:
        kill9(child)
    wait_gone(children)
    fill(app, first[200:])  # the load goes on, for the stock worker alone
    # Only the stock worker is left: its visibility-timeout sweep restores ours' messages.
    wait_for(lambda: held_by(broker, ours.pid) == 0, 60, "the stock worker to restore ours'")
    fill(app, second)
    wait_for(lambda: count_rows(db) >= 2000, 120, "2,000 rows before the second kill")
    # What this tests: messages either kind of worker recorded as unacknowledged come back
    # through the other kind. kombu's stock transport can also lose the message of a BRPOP in
    # flight when its worker dies (kombu's loss; celery_ext/broker.py closes that window), which
    # nothing can restore: cancel its consumer first, with its children stopped so that what
    # it holds stays held, then kill it.
    stock_children = {
        int(pid) for pid in Path(f"/proc/{stock.pid}/task/{stock.pid}/children").read_text().split()
    }
    for child in stock_children:
        os.kill(child, signal.SIGSTOP)
    hostname = subprocess.check_output(["hostname"], text=True).strip()
    cancelled = subprocess.run(
        [CELERY, "-A", "worker", "control", "cancel_consumer", "celery", "-d", f"stock@{hostname}"],
        env=fleet_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "no longer consuming" in cancelled.stdout, cancelled.stdout + cancelled.stderr
    stock_held = broker.hlen("unacked")
    os.killpg(stock.pid, signal.SIGKILL)
    successor = start_worker(concurrency=2, name="successor@%h", base_env=fleet_env)
    wait_for(lambda: count_rows(db) == 4500, 180, "4,500 rows")

    assert ours_held > 0 and stock_held > 0, (ours_held, stock_held)
    assert_every_message_home(db, first + second)
    report(
        "a fleet mid-upgrade: kill -9 of a worker of ours, then of a stock kombu worker "
        "whose consumer was cancelled first",
        sent=len(first) + len(second),
        held_by_ours_at_kill=ours_held,
        held_by_stock_at_kill=stock_held,
        rows=count_rows(db),
        lost=missing(db, first + second),
        duplicates=duplicates(ours.log(), (tmp_path / "stock.log").read_text(), successor.log()),
    )
    broker.close()


@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 3), ("threads", 4), ("solo", 1)])
def test_connection_budget_under_load(db, env, start_worker, database_url, pool, concurrency):
    worker = start_worker(pool=pool, concurrency=concurrency)
    payloads = [new_session() for _ in range(3000)]
    most = 0
    pids: set[int] = set()

    fill(client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]), payloads)

    def sample() -> bool:
        nonlocal most
        names = [name for name, _ in worker_connections(db, database_url)]
        most = max(most, len(names))
        pids.update(int(name.rsplit(":", 1)[1]) for name in names)
        return count_rows(db) == len(payloads)

    wait_for(sample, 180, "3,000 rows", interval=0.02)
    # The load is over: what is left open now must be idle, not inside a transaction.
    states = [state for _, state in worker_connections(db, database_url)]

    assert most <= concurrency, f"{most} connections for {concurrency} {pool} workers"
    if pool == "prefork":
        assert worker.pid not in pids
        assert pids <= worker.children()
    else:
        assert pids == {worker.pid}
    assert "idle in transaction" not in states
    report(
        f"connection budget, {pool} -c {concurrency}",
        sent=len(payloads),
        lost=missing(db, payloads),
        max_connections=most,
        worker_processes_or_threads=concurrency,
        idle_in_transaction=states.count("idle in transaction"),
    )
