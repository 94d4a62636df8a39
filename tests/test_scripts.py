"""The transport's Lua scripts (worker/celery_ext/broker.py: FETCH, REQUEUE, HEARTBEAT, RESTORE,
FORGET), run directly on a Redis database index of the test's own, by their KEYS/ARGV contracts.

No worker and no kombu channel: each test lays out keys as the channel would, calls one script
and reads what it left in Redis. Key names are kombu's (`unacked`, `unacked_index`) and the
channel's (`unacked_by:<consumer>`, `unacked_heartbeats`, `unacked_heartbeats_clock`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from worker.celery_ext import broker

pytestmark = pytest.mark.unit

UNACKED, INDEX = "unacked", "unacked_index"
HEARTBEATS, CLOCK = "unacked_heartbeats", "unacked_heartbeats_clock"
# kombu's priority lists of queue "q": the queue itself (priority 0), then "q\x06\x163", ...
Q0, Q3, Q6 = "q", "q\x06\x163", "q\x06\x166"
TIMEOUT, STALL = 15, 11  # consumer_heartbeat_timeout, and the stall gap the channel derives


def owner(consumer: str) -> str:
    return f"{UNACKED}_by:{consumer}"


def suffix(queue: str) -> str:
    """What FETCH appends to a message to make kombu's unacked record [message, "", queue]."""
    return f',"",{json.dumps(queue)}]'


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def run(client: redis.Redis) -> Callable[..., Any]:
    """Call a script as the channel sends it: with Redis 7's allow-oom flag on the scripts
    that only move messages (broker._MOVING_SCRIPTS)."""
    major = int(str(client.info("server")["redis_version"]).split(".")[0])

    def call(name: str, keys: list[str], args: list[Any]) -> Any:
        source = getattr(broker, name.upper())
        if name in broker._MOVING_SCRIPTS and major >= 7:
            source = broker.ALLOW_OOM + source
        return client.register_script(source)(keys=keys, args=args)

    return call


def redis_now(client: redis.Redis) -> float:
    seconds, microseconds = client.time()
    return seconds + microseconds / 1_000_000


def fetch(
    run: Callable[..., Any],
    lists: list[str],
    limit: int,
    *,
    consumer: str = "c1",
    first: int = 1,
    budget: int = 1_000_000,
    at: float = 1000.0,
) -> list[Any]:
    keys = [UNACKED, INDEX, owner(consumer), *lists]
    args = [limit, at, f"{consumer}.", first, budget, *(suffix(queue_of(key)) for key in lists)]
    return run("fetch", keys, args)


def queue_of(key: str) -> str:
    return key.split("\x06\x16")[0]


def message(name: str, size: int = 0) -> str:
    """A kombu envelope stand-in: JSON, padded to about `size` bytes."""
    return json.dumps({"body": name, "pad": "x" * max(0, size - 30)})


def waiting(client: redis.Redis, key: str) -> list[str]:
    """A list's messages in the order the transport consumes them (RPOP: tail first)."""
    return list(reversed(client.lrange(key, 0, -1)))


# -- FETCH ---------------------------------------------------------------------------------


def test_fetch_takes_up_to_the_limit_in_list_order_across_priority_lists(client, run):
    # Producers LPUSH: the first pushed is consumed first.
    client.lpush(Q0, message("a"), message("b"))
    client.lpush(Q3, message("c"), message("d"), message("e"))

    reply = fetch(run, [Q0, Q3, Q6], limit=4, first=7)

    assert reply == [1, message("a"), 1, message("b"), 2, message("c"), 2, message("d")]
    assert waiting(client, Q0) == [] and waiting(client, Q3) == [message("e")]


def test_fetch_records_each_message_in_the_unacked_hash_index_and_consumer_tag_set(client, run):
    client.lpush(Q0, message("a"))
    client.lpush(Q3, message("b"))

    fetch(run, [Q0, Q3], limit=10, first=7, at=1234.5)

    tags = ["c1.7", "c1.8"]
    records = {tag: json.loads(client.hget(UNACKED, tag)) for tag in tags}
    # kombu's record, [message, exchange, routing key]: a restore puts it back on queue "q".
    assert records == {
        "c1.7": [json.loads(message("a")), "", "q"],
        "c1.8": [json.loads(message("b")), "", "q"],
    }
    assert client.zrange(INDEX, 0, -1, withscores=True) == [("c1.7", 1234.5), ("c1.8", 1234.5)]
    assert client.smembers(owner("c1")) == set(tags)


def test_fetch_stops_once_the_byte_budget_is_taken(client, run):
    client.lpush(Q0, *(message(str(n), size=100) for n in range(5)))
    size = len(message("0", size=100))

    # The message that crosses the budget is taken; none after it.
    assert len(fetch(run, [Q0], limit=10, budget=size + 1)) // 2 == 2
    # A budget smaller than one message still takes one: a large message is never stuck.
    assert len(fetch(run, [Q0], limit=10, budget=1, first=20)) // 2 == 1
    assert client.llen(Q0) == 2
    assert client.hlen(UNACKED) == 3


def test_fetch_from_empty_lists_takes_and_records_nothing(client, run):
    assert fetch(run, [Q0, Q3], limit=10) == []
    assert client.exists(UNACKED, INDEX, owner("c1")) == 0


# -- REQUEUE -------------------------------------------------------------------------------


def requeue(run: Callable[..., Any], tag: str, payload: str, key: str, head: bool) -> int:
    keys = [UNACKED, INDEX, owner("c1"), key]
    return run("requeue", keys, [tag, payload, "1" if head else "0"])


@pytest.mark.parametrize(
    ("head", "order"),
    [(True, ["waiting", "requeued"]), (False, ["requeued", "waiting"])],
    ids=["head: consumed last", "tail: consumed next"],
)
def test_requeue_pushes_the_message_back_at_the_end_it_is_told(client, run, head, order):
    client.lpush(Q0, message("requeued"))
    fetch(run, [Q0], limit=1)
    client.lpush(Q0, message("waiting"))

    assert requeue(run, "c1.1", message("requeued"), Q0, head) == 1

    assert waiting(client, Q0) == [message(name) for name in order]
    assert client.exists(UNACKED, INDEX, owner("c1")) == 0  # no longer held


def test_requeue_of_an_already_acknowledged_tag_is_a_no_op(client, run):
    client.lpush(Q0, message("a"))
    fetch(run, [Q0], limit=1)
    client.hdel(UNACKED, "c1.1")  # acknowledged (or restored) by someone else meanwhile

    assert requeue(run, "c1.1", message("a"), Q0, head=True) == 0

    assert client.llen(Q0) == 0


def test_a_second_requeue_of_the_same_tag_pushes_nothing(client, run):
    client.lpush(Q0, message("a"))
    fetch(run, [Q0], limit=1)

    assert requeue(run, "c1.1", message("a"), Q0, head=False) == 1
    assert requeue(run, "c1.1", message("a"), Q0, head=False) == 0

    assert waiting(client, Q0) == [message("a")]


# -- HEARTBEAT -----------------------------------------------------------------------------


def heartbeat(run: Callable[..., Any], consumer: str) -> list[str]:
    return run("heartbeat", [HEARTBEATS, CLOCK], [consumer, TIMEOUT, STALL])


def test_heartbeat_records_the_consumer_by_redis_clock_and_returns_the_silent_ones(client, run):
    now = redis_now(client)
    client.zadd(HEARTBEATS, {"dead": now - TIMEOUT - 5, "alive": now - 1})

    assert heartbeat(run, "me") == ["dead"]

    assert abs(client.zscore(HEARTBEATS, "me") - redis_now(client)) < 5
    assert abs(float(client.hget(CLOCK, "last")) - redis_now(client)) < 5


def test_a_heartbeat_without_a_consumer_only_looks_for_silent_ones(client, run):
    client.zadd(HEARTBEATS, {"dead": redis_now(client) - TIMEOUT - 5})

    assert heartbeat(run, "") == ["dead"]

    assert client.zrange(HEARTBEATS, 0, -1) == ["dead"]


def test_after_a_fleet_wide_gap_longer_than_the_stall_no_consumer_counts_as_silent(client, run):
    now = redis_now(client)
    client.zadd(HEARTBEATS, {"dead": now - TIMEOUT - 60})
    # Nobody beat for a minute (Redis stalled): everyone looks silent, the live ones too.
    client.hset(CLOCK, "last", now - 60)

    assert heartbeat(run, "me") == []
    assert heartbeat(run, "me") == []  # still within TIMEOUT of the stall

    assert float(client.hget(CLOCK, "stall")) >= now
    # TIMEOUT seconds after the stall a consumer still silent is dead after all.
    client.hset(CLOCK, "stall", redis_now(client) - TIMEOUT - 1)
    assert heartbeat(run, "me") == ["dead"]


def test_a_gap_shorter_than_the_stall_is_no_stall(client, run):
    now = redis_now(client)
    client.zadd(HEARTBEATS, {"dead": now - TIMEOUT - 60})
    client.hset(CLOCK, "last", now - STALL + 2)

    assert heartbeat(run, "me") == ["dead"]
    assert client.hget(CLOCK, "stall") is None


# -- RESTORE -------------------------------------------------------------------------------


def hold(client: redis.Redis, consumer: str, tags: dict[str, str]) -> None:
    """Record messages as `consumer`'s held ones, as FETCH does."""
    for tag, payload in tags.items():
        client.hset(UNACKED, tag, f"[{payload}{suffix('q')}")
        client.zadd(INDEX, {tag: 1000.0})
        client.sadd(owner(consumer), tag)


def restore(
    run: Callable[..., Any],
    consumer: str,
    items: list[tuple[str, str, list[int]]],
    lists: list[str],
) -> int:
    """RESTORE for `items` (tag, payload, the numbers of its lists among `lists`, from 1)."""
    keys = [HEARTBEATS, CLOCK, owner(consumer), UNACKED, INDEX, *lists]
    args: list[Any] = [consumer, TIMEOUT]
    for tag, payload, numbers in items:
        args += [tag, payload, len(numbers), *numbers]
    return run("restore", keys, args)


def test_restore_leaves_a_consumer_that_beat_recently_alone(client, run):
    client.zadd(HEARTBEATS, {"c1": redis_now(client) - 1})
    hold(client, "c1", {"c1.1": message("a")})

    assert restore(run, "c1", [("c1.1", message("a"), [1])], [Q0]) == -1

    assert client.llen(Q0) == 0
    assert client.hexists(UNACKED, "c1.1") and client.sismember(owner("c1"), "c1.1")


def test_restore_leaves_a_silent_consumer_alone_right_after_a_stall(client, run):
    now = redis_now(client)
    client.zadd(HEARTBEATS, {"c1": now - TIMEOUT - 60})
    client.hset(CLOCK, "stall", now - 1)
    hold(client, "c1", {"c1.1": message("a")})

    assert restore(run, "c1", [("c1.1", message("a"), [1])], [Q0]) == -1
    assert client.hexists(UNACKED, "c1.1")


@pytest.mark.parametrize("beat", ["silent", "never beat"])
def test_restore_pushes_a_silent_consumers_messages_back_and_clears_its_tags(client, run, beat):
    if beat == "silent":
        client.zadd(HEARTBEATS, {"c1": redis_now(client) - TIMEOUT - 5})
    hold(client, "c1", {"c1.1": message("a"), "c1.2": message("b")})

    restored = restore(
        run, "c1", [("c1.1", message("a"), [1]), ("c1.2", message("b"), [2])], [Q0, Q3]
    )

    assert restored == 2
    assert waiting(client, Q0) == [message("a")] and waiting(client, Q3) == [message("b")]
    assert client.exists(UNACKED, INDEX, owner("c1")) == 0


def test_restore_pushes_a_message_to_every_list_it_is_given(client, run):
    hold(client, "c1", {"c1.1": message("fanout")})

    assert restore(run, "c1", [("c1.1", message("fanout"), [1, 3])], [Q0, Q3, Q6]) == 1

    assert waiting(client, Q0) == waiting(client, Q6) == [message("fanout")]
    assert client.llen(Q3) == 0


def test_restore_skips_tags_whose_record_is_gone_and_still_clears_them(client, run):
    hold(client, "c1", {"c1.1": message("a"), "c1.2": message("b"), "c1.3": message("c")})
    # Acknowledged by their consumer after the channel read the tag set: c1.2 before the
    # channel read the records too (so it names no list), c1.3 after (it names one).
    client.hdel(UNACKED, "c1.2", "c1.3")
    items = [("c1.1", message("a"), [1]), ("c1.2", "", []), ("c1.3", message("c"), [1])]

    assert restore(run, "c1", items, [Q0]) == 1

    assert waiting(client, Q0) == [message("a")]
    assert client.exists(UNACKED, INDEX, owner("c1")) == 0


def test_a_record_given_no_list_keeps_its_hash_entry_and_leaves_the_tag_set(client, run):
    # What the channel does with a record it cannot read (no fetch made it): nothing to push.
    hold(client, "c1", {"c1.1": message("unreadable")})

    assert restore(run, "c1", [("c1.1", "", [])], [Q0]) == 0

    assert client.llen(Q0) == 0
    assert client.hkeys(UNACKED) == ["c1.1"]  # only a claim (a list to go to) deletes it
    # ... and its index entry stays too, so that kombu's visibility-timeout sweep still sees it.
    assert client.zrange(INDEX, 0, -1) == ["c1.1"]
    assert client.smembers(owner("c1")) == set()


# -- FORGET --------------------------------------------------------------------------------


def forget(run: Callable[..., Any], consumer: str, *tags: str) -> int:
    return run("forget", [HEARTBEATS, owner(consumer)], [consumer, *tags])


def test_forget_removes_a_consumer_whose_tags_are_all_restored(client, run):
    client.zadd(HEARTBEATS, {"c1": 1.0, "c2": 1.0})
    client.sadd(owner("c1"), "c1.1", "c1.2")

    assert forget(run, "c1", "c1.1", "c1.2") == 1

    assert client.zrange(HEARTBEATS, 0, -1) == ["c2"]
    assert client.exists(owner("c1")) == 0


def test_forget_keeps_a_consumer_that_recorded_new_tags_meanwhile(client, run):
    client.zadd(HEARTBEATS, {"c1": 1.0})
    client.sadd(owner("c1"), "c1.1", "c1.9")  # c1.9: fetched after the restore read the set

    assert forget(run, "c1", "c1.1") == 0

    assert client.zrange(HEARTBEATS, 0, -1) == ["c1"]
    assert client.smembers(owner("c1")) == {"c1.9"}


def test_forget_of_a_consumer_holding_nothing_needs_no_tags(client, run):
    client.zadd(HEARTBEATS, {"c1": 1.0})

    assert forget(run, "c1") == 1
    assert client.zcard(HEARTBEATS) == 0
