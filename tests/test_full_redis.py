"""A Redis that refuses writes is drained, never a reason to stop: at maxmemory (noeviction) a
backlog that filled it before any worker ran is written whole by a worker started afterwards;
a Redis that cannot persist (MISCONF) or became a replica (READONLY) loses nothing either."""

from __future__ import annotations

import json

import pytest
import redis
from redis.exceptions import OutOfMemoryError

from tests.conftest import count_rows, new_session, service_env, wait_for
from tests.faults import PrivateRedis, stopped
from tests.test_malformed import EMBED, envelope

pytestmark = pytest.mark.faults


def fill_until_full(url: str) -> list[str]:
    """Queue `save` messages of 2 KB until Redis refuses one; the ids of those accepted."""
    client = redis.Redis.from_url(url)
    client.config_set("maxmemory", "6mb")
    accepted = []
    while True:
        session = new_session(content="x" * 2000)
        try:
            client.lpush("celery", envelope([[session], {}, EMBED]))
        except OutOfMemoryError:
            break
        accepted.append(session["id"])
    client.close()
    return accepted


def on_private_broker(database_url: str, broker_url: str, results_url: str) -> dict[str, str]:
    """A worker's environment with the test's private Redis as broker (results elsewhere: a full
    broker must not be what refuses them)."""
    return service_env(
        DATABASE_URL=database_url, CELERY_BROKER_URL=broker_url, CELERY_RESULT_BACKEND=results_url
    )


def test_a_backlog_that_filled_redis_is_drained_by_a_worker_started_after_it(
    db, database_url, redis_url, private_redis, start_worker
):
    accepted = fill_until_full(private_redis.url)
    env = on_private_broker(database_url, private_redis.url, redis_url)

    worker = start_worker(base_env=env)
    wait_for(lambda: count_rows(db) == len(accepted), 120, "every accepted message written")
    client = redis.Redis.from_url(private_redis.url)
    wait_for(lambda: client.llen("celery") == 0 and client.hlen("unacked") == 0, 30, "empty")

    assert len(accepted) > 1000, "the backlog must have filled Redis"
    assert worker.alive(), worker.log()
    assert "Unrecoverable error" not in worker.log()
    assert count_rows(db, "dead_letter") == 0
    info = client.info("memory")
    assert info["used_memory"] < info["maxmemory"]
    client.close()
    print(json.dumps({"accepted": len(accepted)}))


def test_a_redis_that_fills_up_under_a_running_worker_is_drained_and_the_worker_lives(
    db, database_url, redis_url, private_redis, start_worker
):
    env = on_private_broker(database_url, private_redis.url, redis_url)
    worker = start_worker(base_env=env, concurrency=1)
    client = redis.Redis.from_url(private_redis.url)
    client.config_set("maxmemory", "6mb")
    accepted, refused = [], 0
    while len(accepted) < 4000:  # a producer faster than the worker, until Redis refuses
        session = new_session(content="x" * 2000)
        try:
            client.lpush("celery", envelope([[session], {}, EMBED]))
        except OutOfMemoryError:
            refused += 1
            if refused >= 50:
                break
            continue
        accepted.append(session["id"])

    wait_for(lambda: count_rows(db) == len(accepted), 120, "every accepted message written")
    wait_for(lambda: client.llen("celery") == 0 and client.hlen("unacked") == 0, 30, "empty")

    assert refused >= 50, "Redis must have filled up under the worker"
    assert worker.alive(), worker.log()
    assert "Unrecoverable error" not in worker.log()
    assert count_rows(db, "dead_letter") == 0
    client.close()


def test_a_redis_refusing_writes_after_a_failed_save_misconf_loses_nothing(
    db, database_url, redis_url, private_redis, start_worker
):
    env = on_private_broker(database_url, private_redis.url, redis_url)
    client = redis.Redis.from_url(private_redis.url)
    first = [new_session() for _ in range(3000)]
    for session in first:
        client.lpush("celery", envelope([[session], {}, EMBED]))
    worker = start_worker(base_env=env, concurrency=1)
    wait_for(lambda: count_rows(db) >= 100, 60, "100 rows before the disk fails")
    # The child stopped until the worker has met the refusal: it would otherwise drain the
    # queue first (its main process still fetches, settles and beats meanwhile).
    with stopped(worker.children()):
        # A snapshot that cannot be written (as on a failing disk: here its name is a
        # directory's): with a save point set, Redis refuses every write (MISCONF).
        blocker = private_redis.directory / "dump.rdb"
        (blocker / "in-the-way").mkdir(parents=True)
        client.config_set("save", "3600 1")
        client.config_set("stop-writes-on-bgsave-error", "yes")
        client.bgsave()
        wait_for(
            lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err", 30, "MISCONF"
        )
        queued = client.llen("celery")  # a read: still answered
        wait_for(lambda: "MISCONF" in worker.log(), 30, "the worker to meet the refusal")
    (blocker / "in-the-way").rmdir()
    blocker.rmdir()
    client.config_set("stop-writes-on-bgsave-error", "no")

    wait_for(lambda: count_rows(db) == 3000, 120, "every message written")
    assert queued > 0, "the refusal must come while messages wait"
    assert worker.alive(), worker.log()
    assert "Unrecoverable error" not in worker.log()
    wait_for(lambda: client.llen("celery") == 0 and client.hlen("unacked") == 0, 30, "empty")
    client.close()


def test_a_redis_demoted_to_a_replica_mid_load_readonly_loses_nothing(
    db, database_url, redis_url, private_redis, tmp_path, start_worker
):
    env = on_private_broker(database_url, private_redis.url, redis_url)
    client = redis.Redis.from_url(private_redis.url)
    sessions = [new_session() for _ in range(15000)]
    with client.pipeline(transaction=False) as pipe:
        for session in sessions:
            pipe.lpush("celery", envelope([[session], {}, EMBED]))
        pipe.execute()
    worker = start_worker(base_env=env, concurrency=1)
    wait_for(lambda: count_rows(db) >= 100, 60, "100 rows before the failover")

    # A failover, as Sentinel or a managed Redis makes one: a replica that has every message
    # takes over, and the broker the worker talks to becomes a (read-only) replica of it. The
    # child stopped until then: the worker would otherwise drain the queue first.
    (tmp_path / "other").mkdir()
    other = PrivateRedis(tmp_path / "other")
    promoted = redis.Redis(port=other.port)
    with stopped(worker.children()):
        try:
            promoted.replicaof("127.0.0.1", private_redis.port)
            wait_for(lambda: in_sync(promoted), 30, "the replica in sync")
            promoted.replicaof("NO", "ONE")
            client.replicaof("127.0.0.1", other.port)
            wait_for(lambda: "read only replica" in worker.log(), 30, "the worker to meet READONLY")
            queued = client.llen("celery")  # a read: still answered
        finally:
            client.replicaof("NO", "ONE")  # and back (the worker's URL names this one)
            assert other.process is not None
            other.process.kill()
            other.process.wait(10)

    wait_for(lambda: count_rows(db) == len(sessions), 180, "every message written")
    assert queued > 0, "the refusal must come while messages wait"
    assert worker.alive(), worker.log()
    assert "Unrecoverable error" not in worker.log()
    assert count_rows(db, "dead_letter") == 0
    wait_for(lambda: client.llen("celery") == 0, 30, "the queue empty")
    client.close()


def in_sync(replica: redis.Redis) -> bool:
    info = replica.info("replication")
    return info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == 0
