"""Heartbeat recovery's edges (worker/celery_ext/broker.py): a stalled Redis, a long warm
shutdown, a restorer killed mid-restore. Live workers keep their messages; a dead one's come back
all the same.

Each test has a private redis-server: they stall it, and count what it holds.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from kombu import Connection

from tests.conftest import ROOT, count_rows, new_session, wait_for
from tests.faults import duplicates, held_by, kill9, report, restored_messages
from tests.test_broker import OURS, hold_and_die, publish
from tests.test_full_redis import on_private_broker
from tests.test_malformed import EMBED, envelope
from worker.celery_ext import broker

pytestmark = pytest.mark.faults


def queue_saves(url: str, count: int) -> list[dict]:
    sessions = [new_session() for _ in range(count)]
    client = redis.Redis.from_url(url)
    with client.pipeline(transaction=False) as pipe:
        for session in sessions:
            pipe.lpush("celery", envelope([[session], {}, EMBED]))
        pipe.execute()
    client.close()
    return sessions


def heartbeat_of(client: redis.Redis, pid: int) -> float | None:
    """The last heartbeat (Redis time) of the consumer in worker (main process) `pid`."""
    prefix = f"{socket.gethostname()}:{pid}:".encode()
    beats = client.zrange("unacked_heartbeats", 0, -1, withscores=True)
    scores = [score for member, score in beats if member.startswith(prefix)]
    return max(scores) if scores else None


def redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def test_a_redis_stall_longer_than_the_heartbeat_timeout_restores_no_live_workers_messages(
    db, database_url, redis_url, private_redis, start_worker
):
    sessions = queue_saves(private_redis.url, 12000)
    env = on_private_broker(database_url, private_redis.url, redis_url)
    one = start_worker(base_env=env, concurrency=1, name="one@%h")
    two = start_worker(base_env=env, concurrency=1, name="two@%h")
    client = redis.Redis.from_url(private_redis.url, socket_timeout=60)
    wait_for(lambda: count_rows(db) >= 1000, 60, "1000 rows before the stall")

    held = (held_by(client, one.pid), held_by(client, two.pid))
    client.execute_command("DEBUG", "SLEEP", 20)  # every heartbeat is 20 s old when it ends
    woke = time.monotonic()

    wait_for(lambda: count_rows(db) == len(sessions), 180, "every message written")
    assert all(held), f"both workers must hold messages at the stall: {held}"
    assert "restored" not in one.log() + two.log(), "a live worker's messages were restored"
    assert duplicates(one.log(), two.log()) == 0
    assert one.alive() and two.alive()
    report(
        "Redis stalled 20 s (DEBUG SLEEP) under two busy workers",
        sent=len(sessions),
        held_at_stall=sum(held),
        lost=len(sessions) - count_rows(db),
        restored=restored_messages(one.log(), two.log()),
        drained_after_seconds=round(time.monotonic() - woke, 1),
        duplicates=duplicates(one.log(), two.log()),
    )
    client.close()


def test_a_warm_shutdown_longer_than_the_heartbeat_timeout_keeps_its_messages(
    db, engine, database_url, redis_url, private_redis, start_worker
):
    sessions = queue_saves(private_redis.url, 300)
    env = on_private_broker(database_url, private_redis.url, redis_url)
    client = redis.Redis.from_url(private_redis.url)
    with engine.connect() as blocker:
        # Every write waits for this transaction: the task running at the shutdown runs long.
        blocker.execute(sa.text("LOCK TABLE writing_session IN EXCLUSIVE MODE"))
        stopping = start_worker(base_env=env, concurrency=1, name="stopping@%h")
        wait_for(lambda: waiting_on_a_lock(engine) >= 1, 60, "a group waiting on the lock")
        survivor = start_worker(base_env=env, concurrency=1, name="survivor@%h")
        held = held_by(client, stopping.pid)

        stopping.process.send_signal(signal.SIGTERM)  # a warm shutdown, as `docker stop` asks
        since = redis_time(client)
        wait_for(
            lambda: (heartbeat_of(client, stopping.pid) or 0) > since + 18,
            60,
            "the stopping worker to heartbeat 18 s into its warm shutdown",
        )
        restored = "restored" in survivor.log()
        beating_for = redis_time(client) - since
        blocker.rollback()

    assert stopping.process.wait(60) == 0, stopping.log()
    wait_for(lambda: count_rows(db) == len(sessions), 120, "every message written")
    assert held > 0
    assert not restored, "the survivor restored the messages of a worker shutting down"
    assert duplicates(stopping.log(), survivor.log()) == 0
    assert count_rows(db, "dead_letter") == 0
    report(
        "warm shutdown held up past the heartbeat timeout (a group waiting on a table lock)",
        sent=len(sessions),
        held_at_shutdown=held,
        still_beating_after_seconds=round(beating_for, 1),
        restored=restored_messages(stopping.log(), survivor.log()),
        lost=len(sessions) - count_rows(db),
        duplicates=duplicates(stopping.log(), survivor.log()),
    )
    client.close()


def waiting_on_a_lock(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


# A consumer of another queue (so that it takes nothing restored) that restores silent consumers'
# messages slowly when told to: one batch of 100 every 0.3 s.
RESTORER = """
import sys, time
from kombu import Connection, Consumer, Queue
from worker.celery_ext import broker

if sys.argv[2] == "slow":
    broker.RESTORE_BATCH = 100
    restore = broker.Channel._evalsha
    def slowly(self, client, name, source, args):
        if name == "restore":
            time.sleep(0.3)
        return restore(self, client, name, source, args)
    broker.Channel._evalsha = slowly
with Connection(sys.argv[1], transport="worker.celery_ext.broker:Transport") as connection:
    with Consumer(connection, [Queue("elsewhere")], callbacks=[], accept=["json"]):
        print("consuming", flush=True)
        while True:
            try:
                connection.drain_events(timeout=0.5)
            except TimeoutError:
                pass
"""


def start_restorer(url: str, pace: str) -> subprocess.Popen[str]:
    restorer = subprocess.Popen(
        [sys.executable, "-c", RESTORER, url, pace], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert restorer.stdout is not None
    assert restorer.stdout.readline().strip() == "consuming"
    return restorer


def test_a_restorer_killed_mid_restore_delays_the_rest_by_the_heartbeat_timeout_at_most(
    private_redis,
):
    count = 3000
    publish(private_redis.url, count)
    hold_and_die(private_redis.url, "worker.celery_ext.broker:Transport", count)
    client = redis.Redis.from_url(private_redis.url)
    assert client.hlen("unacked") == count

    slow = start_restorer(private_redis.url, "slow")
    wait_for(lambda: client.llen("jobs") > 0, 60, "the restore to begin")
    kill9(slow.pid)
    killed_at = time.monotonic()
    slow.wait(10)
    left = client.hlen("unacked")
    other = start_restorer(private_redis.url, "normal")
    try:
        wait_for(lambda: client.llen("jobs") == count, 60, "every message back")
        back_after = time.monotonic() - killed_at
    finally:
        other.kill()
        other.wait(10)

    assert 0 < left < count, "the kill must come mid-restore"
    assert back_after <= 30, f"the rest came back {back_after:.1f} s after the kill"
    assert client.hlen("unacked") == 0
    report(
        "restorer kill -9'd mid-restore",
        held=count,
        left_at_kill=left,
        back_after_seconds=round(back_after, 1),
        lost=count - client.llen("jobs"),
    )
    client.close()


def test_a_consumer_that_beats_again_mid_restore_keeps_the_rest(private_redis, monkeypatch):
    """The restore script re-checks its consumer: one that beat since it was found silent (a
    stall, a slow loop) keeps what was not restored yet."""
    publish(private_redis.url, 600)
    hold_and_die(private_redis.url, "worker.celery_ext.broker:Transport", 600)
    client = redis.Redis.from_url(private_redis.url)
    (silent,) = client.zrange("unacked_heartbeats", 0, -1)
    client.zadd("unacked_heartbeats", {silent: 0})  # long silent
    monkeypatch.setattr(broker, "RESTORE_BATCH", 200)

    with Connection(private_redis.url, transport=OURS) as connection:
        channel = connection.default_channel
        restore = channel._evalsha

        def evalsha(conn: Any, name: str, source: str, args: list[Any]) -> Any:
            result = restore(conn, name, source, args)
            if name == "restore":  # the consumer beats again after the first batch
                client.zadd("unacked_heartbeats", {silent: redis_time(client)})
            return result

        monkeypatch.setattr(channel, "_evalsha", evalsha)
        channel._restore_consumer(client, silent.decode())

    assert client.llen("jobs") == 200
    assert client.hlen("unacked") == 400
    assert client.zscore("unacked_heartbeats", silent) is not None
    client.close()
