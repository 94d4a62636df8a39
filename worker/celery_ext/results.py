"""Celery's Redis result backend, storing a result in one round trip instead of two.

It also stores the results of a whole group of messages (worker/celery_ext/group_commit.py) in
one pipelined round trip: `store_results`.

Celery's key-value backends read the stored result before writing a new one, so that a
redelivered task cannot overwrite a SUCCESS (celery/backends/base.py, `_store_result`): a GET,
a decode in Python, then the write: two round trips and a decode per result. Here the same
rule runs inside Redis as one script, which also closes the gap between the read and the write
that Celery's version leaves open. Figures: benchmarks/README.md.

Chosen for redis:// result backends by the loader's `override_backends` (worker/app.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend as CeleryRedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

# KEYS[1]: the result key; ARGV: the encoded result, its expiry in seconds (0: none).
_STORE_UNLESS_SUCCEEDED = """
local stored = redis.call('GET', KEYS[1])
if stored then
    local ok, meta = pcall(cjson.decode, stored)
    if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
        return 0
    end
end
if tonumber(ARGV[2]) > 0 then
    redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
else
    redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class RedisBackend(CeleryRedisBackend):
    """Celery's Redis backend; a result is stored unless a SUCCESS is, in one script call."""

    def _store_result(
        self,
        task_id: Any,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self.serializer != "json":
            # The script reads the stored result as JSON; anything else takes Celery's path.
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        entry = self._entry(task_id, result, state, traceback, request)
        self.ensure(self._run_store_script, entry)
        return result

    def store_results(self, results: Sequence[tuple[str, Any, str]]) -> None:
        """Store many (task id, result, state) in one round trip, each by the rule above."""
        if self.serializer != "json":
            for task_id, result, state in results:
                self.store_result(task_id, result, state)
            return
        # What Celery's meta holds besides the result (date_done, children, the extended
        # fields) is the same for every message settled here at once: built once per state.
        shared: dict[str, dict[str, Any]] = {}
        entries = []
        for task_id, result, state in results:
            if state not in shared:
                shared[state] = self._get_result_meta(
                    result=None, state=state, traceback=None, request=None
                )
            meta = {**shared[state], "result": self.encode_result(result, state)}
            entries.append(self._encoded(task_id, meta, state))
        if entries:
            self.ensure(self._run_store_scripts, (entries,))

    def _entry(
        self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None
    ) -> tuple[bytes, str, int]:
        """The key, the encoded meta (as Celery writes it) and the expiry of one result."""
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        return self._encoded(task_id, meta, state)

    def _encoded(self, task_id: Any, meta: dict[str, Any], state: str) -> tuple[bytes, str, int]:
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = self.failure_expires if state == states.FAILURE else self.expires
        return self.get_key_for_task(task_id), value, int(expires or 0)

    def _run_store_scripts(self, entries: list[tuple[bytes, str, int]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value, expires in entries:
            self._store_script(keys=[key], args=[value, expires], client=pipe)
        pipe.execute()

    def _run_store_script(self, key: bytes, value: str, expires: int) -> None:
        self._store_script(keys=[key], args=[value, expires])

    @cached_property
    def _store_script(self) -> Any:
        return self.client.register_script(_STORE_UNLESS_SUCCEEDED)


def store_results(backend: Any, results: Sequence[tuple[str, Any, str]]) -> None:
    """Store (task id, result, state) triples: in one round trip on Redis, else one by one."""
    store_many = getattr(backend, "store_results", None)
    if store_many is not None:
        store_many(results)
        return
    for task_id, result, state in results:
        backend.store_result(task_id, result, state)
