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

Selected by `worker_consumer` in celeryconfig.py.
"""

from __future__ import annotations

import time

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.common import ignore_errors

EVENT_FLUSH_SECONDS = 0.05
EVENT_BUFFER_LIMIT = 1000


class Consumer(CeleryConsumer):
    """The worker consumer with task events published at most every EVENT_FLUSH_SECONDS."""

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

    def shutdown(self) -> None:
        # The events of the last tasks, before the events step closes the dispatcher.
        ignore_errors(self, self._flush_events)
        super().shutdown()
