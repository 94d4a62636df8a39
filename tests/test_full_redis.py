"""A Redis at maxmemory (noeviction) is drained, never a reason to stop: a backlog that filled it
before any worker ran is written whole by a worker started afterwards."""

from __future__ import annotations

import json

import redis
from redis.exceptions import OutOfMemoryError

from tests.conftest import count_rows, new_session, service_env, wait_for
from tests.test_malformed import EMBED, envelope


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


def test_a_backlog_that_filled_redis_is_drained_by_a_worker_started_after_it(
    db, database_url, redis_url, private_redis, start_worker
):
    accepted = fill_until_full(private_redis.url)
    env = service_env(
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=private_redis.url,
        CELERY_RESULT_BACKEND=redis_url,
    )

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
