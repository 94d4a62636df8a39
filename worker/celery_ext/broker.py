"""kombu's Redis transport, receiving in atomic batches and recovering a dead worker's messages.

What kombu's transport (kombu/transport/redis.py, 5.7) does, and what this one does instead:

1. It receives in two steps, one message at a time: BRPOP takes a message off the queue, then
   QoS.append records it as unacknowledged (a MULTI/EXEC carrying the whole message). A kill -9
   of the worker between the two, or a Redis shutdown after a BRPOP whose reply never arrived,
   loses the message (kombu#305, celery#7950, celery#4354). Here one Lua script takes up to the
   consumer's free prefetch slots off the queue's lists and records each message in the same
   call, so no message ever exists only in a worker's memory. On an empty queue the consumer
   waits with BLMOVE of the queue's list onto itself (tail to tail), which leaves the message in
   place, and fetches with the script as soon as it returns.
2. It acknowledges each message in a MULTI/EXEC of its own. Here acknowledgements, rejects and
   requeues are collected and sent in one pipeline every SETTLE_SECONDS (or as soon as
   SETTLE_BATCH wait), and before the channel closes. A crash before that redelivers; it never
   loses.
3. A dead worker's messages come back only after the visibility timeout (an hour). Here each
   consuming channel keeps the tags it holds in a set of its own and refreshes a heartbeat
   (Redis' clock) every `consumer_heartbeat_interval` seconds; any worker restores the messages
   of a consumer silent for `consumer_heartbeat_timeout` seconds. The visibility-timeout sweep
   stays, as the backstop for a live worker whose task overruns.
4. A lost connection must not kill the worker: when Redis drops mid-read, Celery's consumer
   (celery PR #10242) closes the connection twice, and the second close needs
   `self.connection.client.hostname` of a transport whose client is already None ->
   AttributeError, "Unrecoverable error" (kombu/transport/redis.py `Channel._connparams`,
   kombu#582). Here a closed transport raises redis' ConnectionError, which every caller on that
   path handles as "the broker is away".
5. kombu builds a new redis.Redis around the same pool for every command; here one per pool.
6. A Redis at maxmemory (noeviction) stops kombu's worker: its start-up sweep takes a mutex
   (SET NX), it reads queue lengths in a MULTI/EXEC (a full Redis refuses every command queued
   in a transaction), it binds queues (SADD), and its poller lets any refusal escape. Here the
   fetch and requeue scripts, which only move messages, run at maxmemory (Redis 7's allow-oom
   flag), lengths are read without a transaction, and a refused sweep, heartbeat, settlement or
   binding is logged and tried again: the worker drains the backlog that filled Redis, which is
   what frees it. MISCONF (a failing disk) and READONLY (a replica) refusals take the same road.
7. Its envelopes say nothing of when they were sent. Here each is stamped (`ENQUEUED_AT`), and
   `Channel.waiting` reads what waits, for monitoring: how much, and how old.

Messages are recorded in kombu's own format (`unacked`: tag -> [message, exchange, routing key],
`unacked_index`: tag -> time), so workers on kombu's stock transport sharing the Redis restore
this transport's messages after the visibility timeout, and this transport restores theirs the
same way. Producers, Flower and `celery inspect` see Celery's wire format unchanged.
Needs Redis 6.2 or newer (BLMOVE, RPOP with a count); `global_keyprefix` is not supported.

Delete this module when kombu's transport fetches atomically in batches (kombu#305) and
recovers a dead consumer's messages by heartbeat.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from queue import Empty
from typing import Any, cast

from celery import signals
from celery.utils.dispatch import Signal
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

logger = logging.getLogger(__name__)

# Acknowledgements wait at most this long, or until this many are waiting, to go out together.
SETTLE_SECONDS = 0.01
SETTLE_BATCH = 64
# A fetch asks for at most this many messages when the channel has no prefetch limit.
UNLIMITED_FETCH = 100
# The messages a consumer holds (fetched, not yet settled) add up to about this many bytes at
# most: a fetch stops there, and none starts above it. Small messages stop at the prefetch
# count first; a queue of large save_many batches stops here.
HELD_BYTES = 8 * 1024 * 1024
# After Redis refused a fetch (out of memory, say), wait this long before the next one.
FETCH_BACKOFF_SECONDS = 1.0
# A restore pushes back at most this many messages, or about this many bytes, per script call.
RESTORE_BATCH = 500
RESTORE_BYTES = 4 * 1024 * 1024
# A refusal by Redis (OOM at maxmemory, MISCONF, READONLY) is logged as a warning at most this
# often per kind of work; in between at debug level.
REFUSAL_WARNING_SECONDS = 30.0
# Scripts that only move a message (fetch: list to unacked hash; requeue: back) free about as
# much memory as they use: Redis 7 runs them at maxmemory when they say so. (Without the flag a
# script's first write refused by OOM would leave the RPOP before it done: a message lost.)
ALLOW_OOM = "#!lua flags=allow-oom\n"
_MOVING_SCRIPTS = frozenset(("fetch", "requeue", "restore"))

#: The envelope property holding when a message was put on its list (time.time(), the sender's
#: clock): kombu's Redis envelopes carry no send time, and a monitor wants the age of what waits.
ENQUEUED_AT = "x-enqueued-at"

#: Sent with `count` (sender: the Channel) each time a heartbeat restore put messages of a silent
#: consumer back on their queues, in the process that restored them.
messages_restored = Signal(name="messages_restored", providing_args={"count"})

_last_warned: dict[str, float] = {}
# The channels that heartbeat, for the warm shutdown to keep them beating (Channel.keep_beating).
_beating: weakref.WeakSet[Channel] = weakref.WeakSet()


def log_refusal(what: str, exc: Exception) -> None:
    """Redis refused `what` (a full Redis, a replica, a failed disk): keep going, say so."""
    now = time.monotonic()
    if now - _last_warned.get(what, -REFUSAL_WARNING_SECONDS) >= REFUSAL_WARNING_SECONDS:
        _last_warned[what] = now
        logger.warning(
            "Redis refused %s, retrying (warned at most every %g s): %s",
            what,
            REFUSAL_WARNING_SECONDS,
            exc,
        )
    else:
        logger.debug("Redis refused %s: %s", what, exc)


# Takes up to ARGV[1] messages, and once ARGV[5] bytes are taken no more, off the lists KEYS[4..]
# (in that order), and records each as unacknowledged in the same call: in the unacked hash
# KEYS[1] as kombu does ([message, "", queue], so that a restore puts it back on its queue), in
# the unacked index KEYS[2] at time ARGV[2], and in this consumer's tag set KEYS[3]. Tags are
# ARGV[3] followed by a number from ARGV[4]. ARGV[6..] hold each list's JSON suffix
# (`,"",<queue>]`). Returns [list number, message, ...].
FETCH = """
local limit, budget = tonumber(ARGV[1]), tonumber(ARGV[5])
local taken = {}
local count, bytes = 0, 0
for i = 1, #KEYS - 3 do
    while count < limit and bytes < budget do
        local item = redis.call('RPOP', KEYS[3 + i])
        if not item then break end
        local tag = ARGV[3] .. (tonumber(ARGV[4]) + count)
        count = count + 1
        bytes = bytes + #item
        redis.call('HSET', KEYS[1], tag, '[' .. item .. ARGV[5 + i])
        redis.call('ZADD', KEYS[2], ARGV[2], tag)
        redis.call('SADD', KEYS[3], tag)
        taken[#taken + 1] = i
        taken[#taken + 1] = item
    end
end
return taken
"""

# Requeues message ARGV[2] with tag ARGV[1] onto list KEYS[4] (at its head if ARGV[3] is 1, the
# end consumed last; at its tail otherwise), unless someone else already restored or
# acknowledged it: the unacked hash entry is the claim.
REQUEUE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
if ARGV[3] == '1' then
    redis.call('LPUSH', KEYS[4], ARGV[2])
else
    redis.call('RPUSH', KEYS[4], ARGV[2])
end
return 1
"""

# Refreshes consumer ARGV[1]'s heartbeat (unless it is empty) in the sorted set KEYS[1], by
# Redis' clock, and returns the consumers silent for more than ARGV[2] seconds. The hash KEYS[2]
# keeps when anyone last beat and when Redis last stalled: a gap of over ARGV[3] seconds between
# two heartbeats of the whole fleet (DEBUG SLEEP, a slow fsync or fork, a Redis too full to take
# heartbeats) silenced every consumer alike, so no one counts as silent for ARGV[2] seconds after
# it: the live ones beat again meanwhile, and a dead one is found dead ARGV[2] seconds later.
HEARTBEAT = """
local now = redis.call('TIME')
local seconds = tonumber(now[1]) + tonumber(now[2]) / 1000000
local last = tonumber(redis.call('HGET', KEYS[2], 'last') or seconds)
redis.call('HSET', KEYS[2], 'last', seconds)
if seconds - last > tonumber(ARGV[3]) then redis.call('HSET', KEYS[2], 'stall', seconds) end
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[1], seconds, ARGV[1]) end
local silent_since = seconds - tonumber(ARGV[2])
if tonumber(redis.call('HGET', KEYS[2], 'stall') or 0) > silent_since then return {} end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', silent_since)
"""

# Restores messages of consumer ARGV[1] (heartbeats KEYS[1], clock KEYS[2], tag set KEYS[3])
# if it is still silent for more than ARGV[2] seconds, as HEARTBEAT judges it; -1 otherwise.
# ARGV[3..] hold, per message, its tag, its payload, and how many lists it goes to followed by
# their numbers among KEYS[6..]. The unacked hash entry (KEYS[4]) is the claim, as in REQUEUE:
# a message someone else restored or acknowledged meanwhile is left alone. A message that goes to
# no list leaves the tag set; its index entry goes too if its record is gone, and stays with an
# unreadable record, for the visibility-timeout sweep. Returns how many messages it pushed back.
RESTORE = """
local now = redis.call('TIME')
local silent_since = tonumber(now[1]) + tonumber(now[2]) / 1000000 - tonumber(ARGV[2])
local beat = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or 0)
local stall = tonumber(redis.call('HGET', KEYS[2], 'stall') or 0)
if beat > silent_since or stall > silent_since then return -1 end
local restored, i = 0, 3
while i <= #ARGV do
    local tag, payload, lists = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    if lists > 0 and redis.call('HDEL', KEYS[4], tag) == 1 then
        for n = 1, lists do redis.call('RPUSH', KEYS[5 + tonumber(ARGV[i + 2 + n])], payload) end
        restored = restored + 1
    end
    if lists > 0 or redis.call('HEXISTS', KEYS[4], tag) == 0 then
        redis.call('ZREM', KEYS[5], tag)
    end
    redis.call('SREM', KEYS[3], tag)
    i = i + 3 + lists
end
return restored
"""

# Forgets consumer ARGV[1] (heartbeats KEYS[1], tag set KEYS[2]) once the tags ARGV[2..] are
# restored, unless it recorded new ones meanwhile (then it is alive after all).
FORGET = """
if #ARGV > 1 then redis.call('SREM', KEYS[2], unpack(ARGV, 2)) end
if redis.call('SCARD', KEYS[2]) > 0 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


#: The content type of an envelope kombu could not read, delivered as a message of its own.
UNREADABLE = "application/x-unreadable-envelope"


def _envelope(raw: bytes, tag: str, queue: str) -> Any:
    """A message's envelope (properties, headers, the encoded body) as kombu would read it.

    Without kombu's object hook, which turns {"__type__": ...} markers back into datetimes and
    the like: Celery writes none into an envelope (the body, where arguments are, is decoded
    later by Celery with the hook), and the hook is a Python call for every object of every
    message, in the main process that every message goes through.

    What kombu cannot make a Message of (not JSON, no properties, headers that are not a
    mapping, a body that is not base64 as it says) would raise inside kombu, and the stock
    transport would lose it or stop the worker. It becomes an envelope with the raw bytes as
    its body and content type UNREADABLE instead: Celery's consumer cannot decode it and hands
    it to its decode-error handler (worker/celery_ext/consumer.py keeps it as a malformed message).
    """
    try:
        payload = json.loads(raw)
        problem = _unreadable_because(payload)
    except ValueError as exc:
        payload, problem = None, f"not JSON ({exc})"
    if problem is None:
        payload["properties"]["delivery_tag"] = tag
        return payload
    data = raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "surrogateescape")
    return {
        "body": base64.b64encode(data).decode("ascii"),
        "content-type": UNREADABLE,
        "content-encoding": "binary",
        "headers": {"x-unreadable-envelope": f"the message is not a kombu envelope: {problem}"},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": tag,
            "delivery_info": {"exchange": "", "routing_key": queue},
        },
    }


def _unreadable_because(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "no properties object"
    if not isinstance(properties.get("delivery_info", {}), dict | None):
        return "properties.delivery_info is not an object"
    if not isinstance(payload.get("headers"), dict | None):
        return "headers is not an object"
    body = payload.get("body")
    if not isinstance(body, str | None):
        return "body is not a string"
    if body and properties.get("body_encoding") == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not base64, as properties.body_encoding says"
    return None


class QoS(kombu_redis.QoS):
    """Unacknowledged-message bookkeeping for messages the fetch script already recorded."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        if self.channel.take_recorded(delivery_tag):
            virtual.QoS.append(self, message, delivery_tag)  # recorded in Redis by the fetch
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        self.channel.settle_later(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            # At the head of the list: consumed after what is already waiting (kombu's order).
            self.channel.settle_later(delivery_tag, self._delivered[delivery_tag], leftmost=True)
        else:
            self.channel.settle_later(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        # kombu's sweep takes a mutex (SET NX), which a full Redis refuses: at start-up that was
        # the worker's end ("Unrecoverable error: OutOfMemoryError"). Skip the sweep instead.
        try:
            super().restore_visible(start=start, num=num, interval=interval)
        except ResponseError as exc:
            log_refusal("the visibility-timeout sweep", exc)

    def restore_unacked(self, client: Any = None) -> None:
        """Put every message still held back on its queue (warm shutdown, channel close)."""
        self._flush()
        held = list(self._delivered.items())
        self._delivered.clear()
        # Newest first onto the tail, so that the oldest is consumed first again.
        for tag, message in reversed(held):
            self.channel.settle_later(tag, message, leftmost=False)
        try:
            self.channel.flush_settlements()
        except self.channel.connection_errors as exc:
            logger.warning(
                "could not return %d message(s) to the queue (%s); they stay recorded in Redis "
                "and come back within %s s by heartbeat",
                len(held),
                exc,
                self.channel.consumer_heartbeat_timeout,
            )


class Channel(kombu_redis.Channel):
    """A Redis channel that fetches in atomic batches, settles in batches, heartbeats."""

    QoS = QoS

    from_transport_options = (  # type: ignore[assignment]  # kombu types it as fixed-length
        *kombu_redis.Channel.from_transport_options,
        "consumer_heartbeat_interval",
        "consumer_heartbeat_timeout",
    )
    #: Seconds between two heartbeats of a consuming channel.
    consumer_heartbeat_interval = 2.0
    #: A consumer silent for this long is dead: its messages go back on their queues.
    consumer_heartbeat_timeout = 15.0

    _pooled_client: Any = None
    _consumer_id: str | None = None
    #: What the command in flight on the consuming connection is: "fetch", "wait" or None.
    _pending: str | None = None
    _pending_lists: tuple[str, ...] = ()
    _pending_first_tag = 0
    _pending_limit = 0
    _wait_next = False
    _fetch_after = 0.0
    _heartbeat_due = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.global_keyprefix or not self.ack_emulation:
            raise ValueError("worker.celery_ext.broker needs ack_emulation and no global_keyprefix")
        self._settlements: deque[tuple[str, Any, bool]] = deque()
        self._recorded: dict[str, str] = {}
        self._sizes: dict[str, int] = {}
        self._held_bytes = 0
        self._no_ack_queues: set[str] = set()
        self._sources: dict[str, str] = {}
        self._tag_numbers = itertools.count(1)
        self._scripts: dict[str, Any] = {}
        self._unbound: list[tuple[str, str, str, str]] = []
        self._bind_after = 0.0
        self._closed_event = threading.Event()
        self._beat_thread: threading.Thread | None = None

    # -- fetching ---------------------------------------------------------------------------

    @property
    def consumer_id(self) -> str:
        """This channel's name in the heartbeats, made on its first fetch."""
        if self._consumer_id is None:
            self._consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        return self._consumer_id

    def _owner_key(self, consumer_id: str) -> str:
        return f"{self.unacked_key}_by:{consumer_id}"

    @property
    def _heartbeats_key(self) -> str:
        return f"{self.unacked_key}_heartbeats"

    def _lists(self, queues: list[str]) -> list[str]:
        # kombu's BRPOP order: every queue's highest priority first.
        return [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]

    def _fetch_args(self, lists: list[str], limit: int) -> tuple[list[Any], int]:
        first = next(self._tag_numbers)
        # Reserve the numbers this fetch may use; the rest of the range is simply skipped.
        self._tag_numbers = itertools.count(first + limit)
        owner = self._owner_key(self.consumer_id)
        keys = [self.unacked_key, self.unacked_index_key, owner, *lists]
        suffixes = [f',"",{dumps(self._queue_of(key))}]' for key in lists]
        budget = max(1, HELD_BYTES - self._held_bytes)
        args = [limit, time.time(), f"{self.consumer_id}.", first, budget, *suffixes]
        return [len(keys), *keys, *args], first

    def _queue_of(self, key: str) -> str:
        return key.rsplit(self.sep, 1)[0] if self.sep in key else key

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues or time.monotonic() < self._fetch_after:
            return
        lists = self._lists(queues)
        connection = self.client.connection
        free = self.qos.can_consume_max_estimate()
        if self._wait_next:
            timeout = self.brpop_timeout if timeout is None else timeout
            connection.send_command("BLMOVE", lists[0], lists[0], "RIGHT", "RIGHT", timeout or 0)
            self._pending = "wait"
        elif self._held_bytes >= HELD_BYTES or (
            free is not None and free < self.qos.prefetch_count // 2
        ):
            # The queue had more than the last fetch took, and over half of the prefetch (or
            # HELD_BYTES) is still held: fetch again once half of it is free, a batch per trip.
            return
        else:
            limit = UNLIMITED_FETCH if free is None else free
            args, first = self._fetch_args(lists, limit)
            connection.send_command("EVALSHA", self._script_sha("fetch", FETCH), *args)
            self._pending, self._pending_lists = "fetch", tuple(lists)
            self._pending_first_tag, self._pending_limit = first, limit
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu: None

    def _brpop_read(self, **options: Any) -> bool:
        pending, self._pending = self._pending, None
        try:
            if pending is None:
                # Nothing was asked: the server closed the idle connection. Reconnect later.
                self.client.connection.disconnect()
                raise Empty()
            try:
                reply = self.client.parse_response(
                    self.client.connection, "BLMOVE" if pending == "wait" else "EVALSHA", **options
                )
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except NoScriptError:
                self._scripts.clear()  # Redis restarted: load the scripts again
                raise Empty() from None
            except ResponseError as exc:
                log_refusal("to hand out messages", exc)
                if isinstance(exc, ReadOnlyError):
                    # A replica now (a failover): connect again, to wherever the host name (or
                    # Sentinel) points the next time.
                    self.client.connection.disconnect()
                    self.pool.disconnect()
                self._fetch_after = time.monotonic() + FETCH_BACKOFF_SECONDS
                # A refused wait (BLMOVE writes, so a full Redis refuses it) is followed by a
                # fetch, which may run at maxmemory and is what frees memory.
                self._wait_next = False
                raise Empty() from None
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu sets None, types bool
            self._flush_brpop_reauth()
        if pending == "wait":
            self._wait_next = False  # a message arrived, or the wait timed out: fetch now
            raise Empty()
        if not reply:
            self._wait_next = True
            raise Empty()
        # Fewer than asked for: the queue is empty now, so wait for the next message.
        self._wait_next = len(reply) // 2 < self._pending_limit
        self._deliver_fetched(reply)
        return True

    def _deliver_fetched(self, reply: list[Any]) -> None:
        lists, first = self._pending_lists, self._pending_first_tag
        taken = [
            (
                f"{self.consumer_id}.{first + n}",
                self._queue_of(lists[int(reply[2 * n]) - 1]),
                reply[2 * n + 1],
            )
            for n in range(len(reply) // 2)
        ]
        for tag, queue, raw in taken:
            self._recorded[tag] = queue
            self._sizes[tag] = len(raw)
            self._held_bytes += len(raw)
        for index, (tag, queue, raw) in enumerate(taken):
            payload = _envelope(raw, tag, queue)
            self._sources[tag] = queue
            self._queue_cycle.rotate(queue)
            try:
                self.connection._deliver(payload, queue)
                if queue in self._no_ack_queues:
                    self._forget_on_delivery(tag)
            except BaseException:
                if self.take_recorded(tag):
                    self._drop(tag, raw)  # it never reached the QoS: the message is broken
                # The rest go back on their queue at once; the error goes to the event loop.
                for rest_tag, rest_queue, rest_raw in taken[index + 1 :]:
                    self._recorded.pop(rest_tag, None)
                    self._sources[rest_tag] = rest_queue
                    self.settle_later(
                        rest_tag, _envelope(rest_raw, rest_tag, rest_queue), leftmost=False
                    )
                raise

    def _drop(self, tag: str, raw: Any) -> None:
        logger.error("dropping a message that kombu cannot read: %.200r", raw)
        self._recorded.pop(tag, None)
        self._sources.pop(tag, None)
        self.settle_later(tag)

    def _forget_on_delivery(self, tag: str) -> None:
        # A consumer without acknowledgements (Celery's control replies) took the message:
        # it is done with once delivered, so its record goes with the next settlement.
        self._recorded.pop(tag, None)
        self.settle_later(tag)

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        no_ack = kwargs["no_ack"] if "no_ack" in kwargs else (args[0] if args else False)
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self._forget_on_delivery(message.delivery_tag)
        return message

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        # Stamped on every list it goes to; a requeue or a restore keeps the first stamp.
        message["properties"][ENQUEUED_AT] = time.time()
        super()._put(queue, message, **kwargs)

    def waiting(self, queues: list[str]) -> tuple[list[tuple[str, int, int, Any]], int]:
        """What waits, for monitoring: per queue and priority step, its list's length and the
        message it delivers next (raw, None when empty); and how many messages consumers hold
        unacknowledged. One round trip, without a transaction (a full Redis answers it)."""
        lists = [(queue, pri) for queue in queues for pri in self.priority_steps]
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for queue, pri in lists:
                key = self._q_for_pri(queue, pri)
                pipe.llen(key)
                pipe.lindex(key, -1)  # RPOP's end: the fetch takes from the tail
            pipe.hlen(self.unacked_key)
            *replies, unacked = pipe.execute()
        return [
            (queue, pri, replies[2 * index], replies[2 * index + 1])
            for index, (queue, pri) in enumerate(lists)
        ], unacked

    def _size(self, queue: str) -> int:
        # kombu reads the lengths in a MULTI/EXEC, and Redis at maxmemory refuses every command
        # queued in a transaction, reads included: at start-up (the queue's declaration) that
        # was the worker's end. Lengths need no transaction.
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for pri in self.priority_steps:
                pipe.llen(self._q_for_pri(queue, pri))
            return sum(size for size in pipe.execute() if isinstance(size, int))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        # A binding is a write, which a full (or read-only) Redis refuses: consume all the same,
        # and bind again later (retry_bindings); what is queued is drained meanwhile.
        try:
            super()._queue_bind(exchange, routing_key, pattern, queue)
        except ResponseError as exc:
            log_refusal("a queue binding", exc)
            self._unbound.append((exchange, routing_key, pattern, queue))

    def retry_bindings(self) -> None:
        """Try again the bindings Redis refused, at most every FETCH_BACKOFF_SECONDS."""
        if not self._unbound or time.monotonic() < self._bind_after:
            return
        self._bind_after = time.monotonic() + FETCH_BACKOFF_SECONDS
        unbound, self._unbound = self._unbound, []
        for binding in unbound:
            self._queue_bind(*binding)

    def take_recorded(self, tag: str) -> bool:
        """Whether `tag` came from a fetch (already recorded in Redis); forgets it."""
        return self._recorded.pop(tag, None) is not None

    def _get(self, queue: str, timeout: Any = None) -> Any:
        # basic_get (no event loop): one message, fetched and recorded atomically.
        args, first = self._fetch_args(self._lists([queue]), 1)
        with self.conn_or_acquire() as client:
            reply = self._evalsha(client, "fetch", FETCH, args)
        if not reply:
            raise Empty()
        tag = f"{self.consumer_id}.{first}"
        self._recorded[tag] = self._sources[tag] = queue
        self._sizes[tag] = len(reply[1])
        self._held_bytes += len(reply[1])
        return _envelope(reply[1], tag, queue)

    # -- settling ---------------------------------------------------------------------------

    def settle_later(self, tag: str, message: Any = None, leftmost: bool = False) -> None:
        """Acknowledge `tag` (or requeue `message`) with the next batch; thread-safe."""
        self._settlements.append((tag, message, leftmost))

    def flush_settlements(self) -> None:
        """Send every pending acknowledgement and requeue in one pipeline."""
        if not self._settlements:
            return
        batch = []
        while self._settlements:
            batch.append(self._settlements.popleft())
        acked = [tag for tag, message, _ in batch if message is None]
        owner = self._owner_key(self.consumer_id)
        try:
            with self.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
                if acked:
                    pipe.hdel(self.unacked_key, *acked)
                    pipe.zrem(self.unacked_index_key, *acked)
                    pipe.srem(owner, *acked)
                for tag, message, leftmost in batch:
                    if message is not None:
                        payload = message if isinstance(message, dict) else message._raw
                        self._requeue(pipe, owner, tag, payload, leftmost)
                pipe.execute()
        except BaseException:
            # Every step is idempotent: keep the batch for the next attempt.
            self._settlements.extendleft(reversed(batch))
            raise
        for tag, _, _ in batch:
            self._sources.pop(tag, None)
            self._held_bytes -= self._sizes.pop(tag, 0)

    def _requeue(self, pipe: Any, owner: str, tag: str, payload: dict, leftmost: bool) -> None:
        queue = self._sources.get(tag) or payload["properties"]["delivery_info"].get("routing_key")
        # As kombu marks a restored message (Channel._do_restore_message).
        if isinstance(payload.get("headers"), dict):
            payload["headers"]["redelivered"] = True
        payload["properties"].setdefault("delivery_info", {})["redelivered"] = True
        key = self._q_for_pri(queue, self._get_message_priority(payload, reverse=False))
        keys = [self.unacked_key, self.unacked_index_key, owner, key]
        args = [tag, dumps(payload), "1" if leftmost else "0"]
        self._evalsha(pipe, "requeue", REQUEUE, [len(keys), *keys, *args])

    def _script_sha(self, name: str, source: str) -> str:
        sha = self._scripts.get(name)
        if sha is None:
            with self.conn_or_acquire() as client:
                if name in _MOVING_SCRIPTS and self._redis_major(client) >= 7:
                    source = ALLOW_OOM + source
                sha = self._scripts[name] = client.script_load(source)
        return sha

    def _redis_major(self, client: Any) -> int:
        version = str(client.info("server").get("redis_version", "0"))
        return int(version.split(".")[0] or 0)

    def _evalsha(self, client: Any, name: str, source: str, args: list[Any]) -> Any:
        sha = self._script_sha(name, source)
        try:
            return client.execute_command("EVALSHA", sha, *args)
        except NoScriptError:
            self._scripts.clear()
            return client.execute_command("EVALSHA", self._script_sha(name, source), *args)

    # -- heartbeats and recovery ------------------------------------------------------------

    def heartbeat(self) -> None:
        """Refresh this consumer's heartbeat and restore the messages of silent consumers."""
        if time.monotonic() < self._heartbeat_due or not self.active_queues:
            return
        self._heartbeat_due = time.monotonic() + self.consumer_heartbeat_interval
        _beating.add(self)
        with self.conn_or_acquire() as client:
            dead = self._beat(client)
            if not dead:
                return
            # One restorer at a time (others skip this turn). The mutex expires on the scale of
            # the heartbeat timeout, so a restorer killed mid-restore delays the rest by that
            # much at most; every batch re-checks its consumer and claims each message anyway.
            expire = max(1, round(self.consumer_heartbeat_timeout))
            try:
                with kombu_redis.Mutex(client, f"{self.unacked_mutex_key}_heartbeats", expire):
                    for consumer in dead:
                        self._restore_consumer(client, bytes_to_str(consumer))
            except kombu_redis.MutexHeld:
                pass

    def keep_beating(self) -> None:
        """Heartbeat from a thread of its own until the channel closes.

        A warm shutdown stops the event loop, which heartbeats, and then waits for the pool to
        finish what it runs: a shutdown longer than the heartbeat timeout would otherwise have
        those messages restored elsewhere and run twice. Restoring others stays with the loop.
        """
        if self._beat_thread is None and not self._closed_event.is_set():
            self._beat_thread = threading.Thread(
                target=self._beat_until_closed, name="broker-heartbeat", daemon=True
            )
            self._beat_thread.start()

    def _beat_until_closed(self) -> None:
        while not self._closed_event.wait(self.consumer_heartbeat_interval):
            try:
                with self.conn_or_acquire() as client:
                    self._beat(client)
            except self.connection_errors as exc:
                logger.debug("broker away during the shutdown's heartbeat: %s", exc)
            except ResponseError as exc:
                log_refusal("a heartbeat", exc)

    def _beat(self, client: Any) -> list[Any]:
        keys = [self._heartbeats_key, f"{self._heartbeats_key}_clock"]
        timeout, interval = self.consumer_heartbeat_timeout, self.consumer_heartbeat_interval
        # A fleet-wide silence this long can make a live consumer look dead (HEARTBEAT).
        stall = max(timeout - 2 * interval, interval)
        args = [len(keys), *keys, self.consumer_id, timeout, stall]
        return cast(list[Any], self._evalsha(client, "heartbeat", HEARTBEAT, args))

    def _restore_consumer(self, client: Any, consumer: str) -> None:
        owner = self._owner_key(consumer)
        tags = sorted(bytes_to_str(tag) for tag in client.smembers(owner))
        restored = 0
        for batch in self._restore_batches(client, tags):
            lists: dict[str, int] = {}
            args: list[Any] = []
            for tag, payload, queues in batch:
                numbers = [lists.setdefault(key, len(lists) + 1) for key in queues]
                args += [tag, payload, len(numbers), *numbers]
            keys = [
                self._heartbeats_key,
                f"{self._heartbeats_key}_clock",
                owner,
                self.unacked_key,
                self.unacked_index_key,
                *lists,
            ]
            timeout = self.consumer_heartbeat_timeout
            done = self._evalsha(
                client, "restore", RESTORE, [len(keys), *keys, consumer, timeout, *args]
            )
            if done == -1:
                break  # it beat again: alive after all (a stall, a slow loop)
            restored += done
            if done:
                messages_restored.send(sender=self, count=done)
        else:
            keys = [self._heartbeats_key, owner]
            self._evalsha(client, "forget", FORGET, [len(keys), *keys, consumer])
        if restored:
            logger.warning(
                "restored %d message(s) of consumer %s, silent for over %s s",
                restored,
                consumer,
                self.consumer_heartbeat_timeout,
            )

    def _restore_batches(
        self, client: Any, tags: list[str]
    ) -> Iterator[list[tuple[str, str, list[str]]]]:
        """The held messages `tags`, marked redelivered as kombu marks them, in script batches.

        Each is (tag, payload, the lists it goes back to); a tag no longer in the unacked hash
        (acknowledged, or restored by someone else) goes with no list, so that the script still
        clears it from the consumer's tag set.
        """
        batch: list[tuple[str, str, list[str]]] = []
        size = 0
        for start in range(0, len(tags), RESTORE_BATCH):
            chunk = tags[start : start + RESTORE_BATCH]
            for tag, raw in zip(chunk, client.hmget(self.unacked_key, chunk), strict=True):
                payload, queues = self._restorable(raw)
                batch.append((tag, payload, queues))
                size += len(payload)
                if len(batch) >= RESTORE_BATCH or size >= RESTORE_BYTES:
                    yield batch
                    batch, size = [], 0
        if batch:
            yield batch

    def _restorable(self, raw: Any) -> tuple[str, list[str]]:
        if raw is None:
            return "", []
        text = bytes_to_str(raw)
        try:
            payload, exchange, routing_key = json.loads(text)
        except ValueError:
            # A message that is not JSON (kept as a malformed one when delivered) was recorded
            # as '[' + message + ',"",<queue>]' by the fetch: it goes back as it came.
            head, separator, tail = text.rpartition(',"",')
            try:
                queue = json.loads(tail[:-1]) if separator and text[:1] == "[" else None
            except ValueError:
                queue = None
            if not isinstance(queue, str):
                logger.error("cannot restore an unacked record no fetch made: %.200r", text)
                return "", []
            return head[1:], [self._q_for_pri(queue, 0)]
        # As kombu marks a restored message (Channel._do_restore_message).
        with suppress(KeyError, TypeError):
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
        priority = self._get_message_priority(payload, reverse=False)
        queues = self._lookup(exchange, routing_key)
        return dumps(payload), [self._q_for_pri(queue, priority) for queue in queues]

    def _forget_self(self) -> None:
        if self._consumer_id is None:
            return
        with self.conn_or_acquire() as client:
            owner = self._owner_key(self._consumer_id)
            keys = [self._heartbeats_key, owner]
            self._evalsha(client, "forget", FORGET, [len(keys), *keys, self._consumer_id])

    # -- connection handling ----------------------------------------------------------------

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # A client holds no connection of its own: one per pool serves every command.
        if client is not None:
            yield client
            return
        pool = self.pool
        if self._pooled_client is None or self._pooled_client.connection_pool is not pool:
            self._pooled_client = self._create_client()
        yield self._pooled_client

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise RedisConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)

    def close(self) -> None:
        if not self.closed:
            self._closing = True
            self._closed_event.set()
            if self._in_poll:
                with suppress(Empty):
                    self._brpop_read()  # a fetch in flight: its messages are held now
            try:
                self.qos.restore_unacked_once()  # held messages back to their queues
                self.flush_settlements()
                self._forget_self()
            except self.connection_errors as exc:
                logger.debug("could not unregister consumer %s: %s", self._consumer_id, exc)
        super().close()


@signals.worker_shutting_down.connect
def _keep_beating_through_the_warm_shutdown(**_: Any) -> None:
    for channel in list(_beating):
        channel.keep_beating()


class MultiChannelPoller(kombu_redis.MultiChannelPoller):
    """kombu's poller, settling acknowledgements and heartbeating on every turn."""

    _settle_tref: Any = None

    def on_poll_start(self) -> None:
        for channel in self._channels:
            try:
                # With an event loop a timer settles every SETTLE_SECONDS; without one, here.
                if self._settle_tref is None or len(channel._settlements) >= SETTLE_BATCH:
                    channel.flush_settlements()
                channel.heartbeat()
                channel.retry_bindings()
            except channel.connection_errors:
                logger.debug("broker away while settling; retrying next turn", exc_info=True)
            except ResponseError as exc:  # a full, read-only or failing Redis: keep draining
                log_refusal("a settlement or heartbeat", exc)
        super().on_poll_start()

    def flush_settlements(self) -> None:
        """Send the acknowledgements and requeues of every channel (the event loop's timer)."""
        for channel in self._channels:
            try:
                channel.flush_settlements()
            except channel.connection_errors:
                logger.debug("broker away while settling; retrying", exc_info=True)
            except ResponseError as exc:
                log_refusal("a settlement", exc)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel and poller above."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = MultiChannelPoller()  # type: ignore[assignment]  # kombu: its own type

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        cycle = cast(MultiChannelPoller, self.cycle)
        if cycle._settle_tref is not None:
            cycle._settle_tref.cancel()  # from an earlier connection
        cycle._settle_tref = loop.call_repeatedly(SETTLE_SECONDS, cycle.flush_settlements)


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The channel above on a Redis found through Sentinel (`sentinel://h1:26379;sentinel://…`).

    kombu's SentinelChannel finds the master (and finds it again after a failover, when the old
    one drops the connection or answers READONLY); everything else is this module's.
    """

    from_transport_options = (  # type: ignore[assignment]  # kombu types it as fixed-length
        *Channel.from_transport_options,
        "master_name",
        "min_other_sentinels",
        "sentinel_kwargs",
        "sentinel_fanout_compat",
    )


class StayOnTheSentinels:
    """A kombu failover strategy (Celery's `broker_failover_strategy`) that never switches.

    The `;`-separated URLs of a sentinel:// broker are the sentinels of one master, and the
    channel asks them in turn itself. kombu's switching to "the next URL" after a connection
    error would re-parse that URL into kombu's own Sentinel transport (this module's would be
    gone) and fail on a `?master_name=` in it ("unexpected keyword argument").
    """

    def __init__(self, alternates: Any) -> None:
        self.alternates = alternates

    def __iter__(self) -> StayOnTheSentinels:
        return self

    def __next__(self) -> None:
        return None  # kombu skips a first entry at the start

    def __bool__(self) -> bool:
        return False  # kombu's Connection.maybe_switch_next: nothing to switch to


class SentinelTransport(Transport):
    """The transport above, through Redis Sentinel."""

    Channel = SentinelChannel
    default_port = 26379  # type: ignore[assignment]  # kombu types it None
