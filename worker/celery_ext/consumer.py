"""Celery's worker consumer, publishing task events in batches of up to EVENT_FLUSH_SECONDS.

Celery buffers task events (received, started, succeeded, ...) and publishes the buffer as one
`task.multi` message on the next turn of the event loop. Under load a turn holds about one
event, so that is a publish (a Redis round trip through kombu's producer) per event, in the
main process that every message goes through (figures: benchmarks/README.md).

Here the buffer is published EVENT_FLUSH_SECONDS after the first event put in it (or as soon as
it holds EVENT_BUFFER_LIMIT events: Celery's limit of 24 would publish every few messages of a
group), and before the consumer shuts down. Every event is still sent; Flower and `celery
events` see it up to EVENT_FLUSH_SECONDS later.

At close (warm shutdown, or a lost connection) Celery flushes the prefork pool, which forgets
every job that no child has acknowledged yet, "since the broker redelivers it". A job already
written to a child's pipe runs all the same: forgotten, its result is never read (the child then
waits 30 s for that before it exits) and its messages, a whole group, are never acknowledged
and run again as `duplicate`. `on_close` keeps those jobs, so the pool's join reads their results.

A message that cannot be turned into a task request (an unknown format or task name, an invalid
task, a body that cannot be decoded) is, with the `malformed_message_handler` setting, described
and handed to that handler in a pool child, then acknowledged (worker/celery_ext/malformed.py)
instead of being dropped with an error line.

Selected by `worker_consumer` in celeryconfig.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.common import ignore_errors

from worker.celery_ext import group_commit, malformed

logger = logging.getLogger(__name__)

EVENT_FLUSH_SECONDS = 0.05
EVENT_BUFFER_LIMIT = 1000


class Consumer(CeleryConsumer):
    """The worker consumer with task events published at most every EVENT_FLUSH_SECONDS, and
    malformed messages kept by the `malformed_message_handler` instead of dropped."""

    _event_flush_at = 0.0

    def on_send_event_buffered(self) -> None:
        if not self.hub:
            return
        # The dispatcher is made anew on every reconnection, with Celery's limit.
        self.event_dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
        now = time.monotonic()
        # A flush is already due: it publishes this event too. No flag that a lost timer entry
        # (a consumer restart) could leave set: once that time has passed, schedule anew.
        if now < self._event_flush_at:
            return
        self._event_flush_at = now + EVENT_FLUSH_SECONDS
        self.hub.call_later(EVENT_FLUSH_SECONDS, self._flush_events_promise)

    # -- malformed messages -----------------------------------------------------------------

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if not self._keep_malformed(message, "not a task message: no task name in it"):
            super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task") if isinstance(message.headers, dict) else None
        if not self._keep_malformed(message, f"no task named {name!r} is registered"):
            super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if not self._keep_malformed(message, f"invalid task message: {exc}"):
            super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        # celery_ext/broker.py delivers what is not even an envelope with this header, saying why.
        error = headers.get("x-unreadable-envelope") or f"cannot decode the message: {exc}"
        if not self._keep_malformed(message, error):
            super().on_decode_error(message, exc)

    def _keep_malformed(self, message: Any, error: str) -> bool:
        """Hand a malformed message to the configured handler in a pool child; False if none is
        configured (Celery's own handling then) or it is not a task queue's message."""
        handler = self.app.conf.get("malformed_message_handler")
        exchange = (getattr(message, "delivery_info", None) or {}).get("exchange") or ""
        if not handler or self.pool is None or exchange.endswith(".pidbox"):
            return False
        record = malformed.describe(message, error)
        logger.error(
            "malformed message (task id %s): %s; kept by %s", record.task_id, error, handler
        )

        def kept(ok: Any) -> None:
            if ok is not True:
                requeue_later(ok if isinstance(ok, ExceptionInfo) else None)
                return
            message.ack_log_error(logger, self.connection_errors)
            if record.task_id and self.event_dispatcher and self.event_dispatcher.enabled:
                self.event_dispatcher.send(
                    "task-failed", uuid=record.task_id, exception=error, traceback=""
                )

        def requeue_later(_: Any = None) -> None:
            self.timer.call_after(
                malformed.RETRY_SECONDS,
                lambda: message.reject_log_error(logger, self.connection_errors, requeue=True),
            )

        try:
            self.pool.apply_async(
                malformed.run_handler,
                args=(handler, record),
                callback=kept,
                error_callback=requeue_later,
            )
        except Exception:
            logger.exception("could not hand malformed message %s to the pool", record.task_id)
            requeue_later()
        return True

    def on_close(self) -> None:
        cache = getattr(getattr(self.pool, "_pool", None), "_cache", None)  # prefork only
        written = {
            key: job
            for key, job in (cache or {}).items()
            if getattr(job, "_write_to", None) is not None and not job._accepted
        }
        super().on_close()
        if cache is not None:
            cache.update(written)
        # Celery dropped its reserved requests; group commit drops what waits for a process and
        # stops counting the jobs the pool forgot.
        group_commit.connection_closed(self, cache)

    def shutdown(self) -> None:
        # The events of the last tasks, before the events step closes the dispatcher.
        ignore_errors(self, self._flush_events)
        super().shutdown()
