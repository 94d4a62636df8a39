"""kombu's Redis transport with two fixes for a Redis that restarts under load, and one for speed.

1. A message received while Redis goes away is still recorded. kombu takes a message off the
queue (BRPOP) and then records it as unacknowledged (QoS.append, a second round trip,
kombu/transport/redis.py). If Redis restarts between the two, the second step fails and the
message exists nowhere. Here the second step is retried for up to UNACKED_RETRY_SECONDS, long
enough for a restart, so the message is recorded (and later acknowledged or restored). What no
client can fix: a BRPOP whose reply Redis never sent before shutting down, or a kill -9 of the
worker between the two steps; see the README's Guarantees (producers confirm).

2. A lost connection must not kill the worker. When Redis drops while a BRPOP is in flight,
Celery's consumer (celery/worker/consumer/consumer.py, `on_connection_error_after_connected`,
since celery PR #10242) calls `connection.collect()`, which fails to close the default channel
but sets the transport's `client` to None (kombu/connection.py, `_do_close_transport`), and then
`connection.close()`, which closes that channel again: restoring its unacknowledged messages
needs a new Redis pool, built in `Channel._connparams` from `self.connection.client.hostname`
-> AttributeError. That is not a connection error, nothing catches it, and the worker exits with
"Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")" (about
one Redis restart in eight under load).
https://github.com/celery/kombu/blob/v5.7.0/kombu/transport/redis.py (Channel._connparams),
https://github.com/celery/celery/pull/10242, https://github.com/celery/kombu/issues/582

Here a closed transport raises redis' ConnectionError instead, which every caller on those paths
already handles as "the broker is away". The unacknowledged messages stay in Redis' unacked set
and come back through the visibility-timeout sweep, as after any other connection loss.
3. One Redis client object per connection pool, not one per command (see Channel).

Remove this module once kombu checks for a closed transport itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

UNACKED_RETRY_SECONDS = 30.0


class QoS(kombu_redis.QoS):
    """Records a received message as unacknowledged, retrying while Redis is restarting."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        deadline = time.monotonic() + UNACKED_RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                super().append(message, delivery_tag)
                return
            except (RedisConnectionError, RedisTimeoutError):
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "broker unavailable while recording message %s as unacknowledged; "
                    "retrying in %.2fs",
                    delivery_tag,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


class Channel(kombu_redis.Channel):
    """Redis channel with the QoS above, reporting a closed transport as a connection error."""

    QoS = QoS
    _pooled_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu builds a new redis.Redis around the same pool for every publish, acknowledgement
        # and unacked-set update (a fifth of a busy worker's main process went to Redis.__init__).
        # A client holds no connection of its own, so one per pool serves them all.
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


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel
