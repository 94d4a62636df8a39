"""Redis through Sentinel (`sentinel://…;sentinel://…`): the project's transport with every
guarantee, through a failover under load (worker/celery_ext/broker.py SentinelTransport).

One master, one replica and three sentinels (redis-server --sentinel), all of the test's own.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import count_rows, new_session, run_cli, service_env, wait_for
from tests.faults import PrivateRedis, duplicates, free_port, kill9, report
from tests.test_full_redis import in_sync
from tests.test_malformed import EMBED, envelope

pytestmark = pytest.mark.faults

MASTER = "ws-master"


class Sentinels:
    """Three sentinels watching `MASTER`: a failover needs two of them to agree."""

    def __init__(self, directory: Path, master_port: int) -> None:
        self.ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []
        for port in self.ports:
            config = directory / f"sentinel-{port}.conf"  # sentinels rewrite their own
            config.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {directory}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
            )
            self.processes.append(
                subprocess.Popen(
                    ["redis-server", str(config), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self.url = ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.ports)

    def master(self) -> tuple[str, int] | None:
        try:
            client = redis.Redis(port=self.ports[0], socket_timeout=2, decode_responses=True)
            host, port = client.sentinel_get_master_addr_by_name(MASTER)
            return host, int(port)
        except (redis.RedisError, TypeError):
            return None

    def all_see_a_replica(self) -> bool:
        try:
            return all(
                redis.Redis(port=port, socket_timeout=2).sentinel_master(MASTER)["num-slaves"] >= 1
                and redis.Redis(port=port, socket_timeout=2).sentinel_master(MASTER)[
                    "num-other-sentinels"
                ]
                >= 2
                for port in self.ports
            )
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(10)


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[tuple[PrivateRedis, PrivateRedis, Sentinels]]:
    directories = [tmp_path / name for name in ("master", "replica", "sentinels")]
    for directory in directories:
        directory.mkdir()
    master, replica = PrivateRedis(directories[0]), PrivateRedis(directories[1])
    redis.Redis(port=replica.port).replicaof("127.0.0.1", master.port)
    wait_for(lambda: in_sync(redis.Redis(port=replica.port)), 30, "the replica in sync")
    sentinels = Sentinels(directories[2], master.port)
    wait_for(sentinels.all_see_a_replica, 30, "three sentinels that see the replica")
    yield master, replica, sentinels
    sentinels.stop()
    for server in (master, replica):
        if server.process and server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def test_a_sentinel_url_without_a_master_name_is_refused_with_a_clear_error(tmp_path):
    env = service_env(
        CELERY_BROKER_URL="sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380",
        DATABASE_URL="sqlite:///x.db",
    )
    result = run_cli("health", env=env, cwd=tmp_path)

    assert result.returncode != 0
    assert "CELERY_BROKER_MASTER_NAME" in result.stderr


def test_a_failover_under_load_loses_nothing_and_the_worker_follows_the_new_master(
    db, database_url, redis_url, sentinel_set, start_worker
):
    master, replica, sentinels = sentinel_set
    client = redis.Redis(port=master.port)
    sessions = [new_session() for _ in range(10000)]
    with client.pipeline(transaction=False) as pipe:
        for session in sessions:
            pipe.lpush("celery", envelope([[session], {}, EMBED]))
        pipe.execute()
    assert client.wait(1, 10000) == 1, "the backlog must be on the replica before the kill"
    # The master's name in the URL here; CELERY_BROKER_MASTER_NAME is the other way.
    env = service_env(
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=f"{sentinels.url}?master_name={MASTER}",
        CELERY_RESULT_BACKEND=redis_url,
    )
    worker = start_worker(base_env=env, concurrency=2)
    wait_for(lambda: count_rows(db) >= 1000, 60, "1000 rows before the failover")
    assert client.zcard("unacked_heartbeats") >= 1, "the worker must consume with our transport"

    held = client.hlen("unacked")
    kill9(master.process.pid)
    killed_at, rows_at_kill = time.monotonic(), count_rows(db)
    wait_for(lambda: sentinels.master() == ("127.0.0.1", replica.port), 60, "the failover")
    promoted_after = time.monotonic() - killed_at
    wait_for(lambda: count_rows(db) > rows_at_kill + 200, 120, "writing on the new master")
    writing_after = time.monotonic() - killed_at
    wait_for(lambda: count_rows(db) == len(sessions), 240, "every message written")

    new_master = redis.Redis(port=replica.port)
    wait_for(lambda: new_master.hlen("unacked") == 0, 60, "nothing left held on the new master")
    assert worker.alive(), worker.log()
    assert "Unrecoverable error" not in worker.log()
    assert new_master.zcard("unacked_heartbeats") >= 1
    assert count_rows(db, "dead_letter") == 0
    report(
        "Sentinel failover: kill -9 of the master under load",
        sent=len(sessions),
        held_at_kill=held,
        lost=len(sessions) - count_rows(db),
        replica_promoted_after_seconds=round(promoted_after, 1),
        writing_again_after_seconds=round(writing_after, 1),
        duplicates=duplicates(worker.log()),
    )
