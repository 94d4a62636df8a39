"""The Celery and kombu internals this project overrides are still the ones it was written for.

worker/celery_ext/ (docs/internals.md): broker.py, consumer.py and results.py subclass kombu and
Celery classes and replace some of their methods; group_commit.py is a task Strategy that does
what Celery's default one does, builds and settles Celery's Requests itself, and subclasses
Request to settle hard time limits; stop.py relies on billiard's child signal handling.
pyproject.toml and requirements.lock pin the versions they were written for; when the pins move,
these tests say which overridden method, used name or private attribute changed, so that its
override is read again against the new code before anything ships.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re

import pytest

pytestmark = pytest.mark.quick

# (module:Class.method, signature, first 16 hex digits of the sha256 of its source)
OVERRIDDEN = [
    ("kombu.transport.redis:QoS.append", "(self, message, delivery_tag)", "35c655f6ecc62fe6"),
    ("kombu.transport.redis:QoS.ack", "(self, delivery_tag)", "1bc15a4ddf541af6"),
    ("kombu.transport.redis:QoS.reject", "(self, delivery_tag, requeue=False)", "747a02434344d1a6"),
    ("kombu.transport.redis:QoS.restore_unacked", "(self, client=None)", "8954efef014d546e"),
    (
        "kombu.transport.redis:QoS.restore_visible",
        "(self, start=0, num=10, interval=10)",
        "d4a4a40a3eaf9f23",
    ),
    ("kombu.transport.redis:Channel.__init__", "(self, *args, **kwargs)", "f189bdebe2436ccd"),
    ("kombu.transport.redis:Channel._size", "(self, queue)", "7cc839b42fdc5e3b"),
    (
        "kombu.transport.redis:Channel._put",
        "(self, queue, message, **kwargs)",
        "1c0cf9749576614c",
    ),
    (
        "kombu.transport.redis:Channel._queue_bind",
        "(self, exchange, routing_key, pattern, queue)",
        "29b73e023af67e47",
    ),
    ("kombu.transport.redis:Channel._brpop_start", "(self, timeout=None)", "06723d707ddf2240"),
    ("kombu.transport.redis:Channel._brpop_read", "(self, **options)", "c42518699709f2df"),
    ("kombu.transport.redis:Channel._get", "(self, queue)", "be26a9f1eb4cf8da"),
    ("kombu.transport.redis:Channel.conn_or_acquire", "(self, client=None)", "25883caca6c4121e"),
    ("kombu.transport.redis:Channel._connparams", "(self, asynchronous=False)", "e9a4295085a8fb90"),
    ("kombu.transport.redis:Channel.close", "(self)", "101e9b9cdad44b88"),
    (
        "kombu.transport.redis:Channel.basic_consume",
        "(self, queue, *args, **kwargs)",
        "34e0da85e689ff98",
    ),
    (
        "kombu.transport.virtual.base:Channel.basic_get",
        "(self, queue, no_ack=False, **kwargs)",
        "ba4884c15b6bed6d",
    ),
    ("kombu.transport.redis:MultiChannelPoller.on_poll_start", "(self)", "414f76caaa675bc0"),
    ("kombu.transport.redis:Transport.__init__", "(self, *args, **kwargs)", "4fc30e8fa54df374"),
    (
        "kombu.transport.redis:Transport.register_with_event_loop",
        "(self, connection, loop)",
        "4b835642e4a99425",
    ),
    (
        "celery.worker.consumer.consumer:Consumer.on_send_event_buffered",
        "(self)",
        "0429cadc8bf9dc54",
    ),
    ("celery.worker.consumer.consumer:Consumer.shutdown", "(self)", "a081dc7db4a98b33"),
    ("celery.worker.consumer.consumer:Consumer.on_close", "(self)", "e96d425dce0ae6a3"),
    # Not overridden, but Consumer.on_close above undoes part of what it does.
    ("celery.concurrency.asynpool:AsynPool.flush", "(self)", "a7671d710b578e35"),
    (
        "celery.backends.redis:RedisBackend._store_result",
        "(self, task_id, result, state, traceback=None, request=None, **kwargs)",
        "c0214af4c66e2999",
    ),
    (
        "celery.worker.strategy:default",
        "(task, app, consumer, info, error, task_reserved, to_system_tz, bytes, proto1_to_proto2)",
        "7d90575ada5eb1dc",
    ),
    ("celery.worker.request:Request.on_timeout", "(self, soft, timeout)", "3d26ce896008646d"),
    (
        "celery.worker.request:Request.on_failure",
        "(self, exc_info, send_failed_event=True, return_ok=False)",
        "21736ec661cd60d7",
    ),
    # Not overridden: group_commit.Message.context finds a request's custom headers itself (the
    # keys this leaves out), because this is most of what a Context costs.
    (
        "celery.app.task:Context._get_custom_headers",
        "(self, *args, **kwargs)",
        "2b0196d4ec67c628",
    ),
    # Not overridden, but the group's error callback calls it for a terminated member, and the
    # group is re-sent on what it does (announce revoked, then kill the child).
    ("celery.worker.request:Request.terminate", "(self, pool, signal=None)", "5ee69325b498e311"),
    (
        "celery.worker.consumer.consumer:Consumer.on_unknown_message",
        "(self, body, message)",
        "213bd3ee55cb5ca6",
    ),
    (
        "celery.worker.consumer.consumer:Consumer.on_unknown_task",
        "(self, body, message, exc)",
        "35e6cbe564947a25",
    ),
    (
        "celery.worker.consumer.consumer:Consumer.on_invalid_task",
        "(self, body, message, exc)",
        "9893e7a4eee33a33",
    ),
    (
        "celery.worker.consumer.consumer:Consumer.on_decode_error",
        "(self, message, exc)",
        "e3538c586a7ffa75",
    ),
    # Not overridden: it decides which exceptions of a Strategy reach the handlers above
    # (InvalidTaskError, ContentDisallowed, DecodeError); any other stops the worker.
    (
        "celery.worker.consumer.consumer:Consumer.create_task_handler",
        "(self, promise)",
        "292c5a681f10ade7",
    ),
    # Not overridden: how the solo and threads pools run a job (an exception escapes them).
    (
        "celery.concurrency.base:apply_target",
        "(target, args, kwargs, callback, accept_callback, pid, getpid, propagate, monotonic, _)",
        "587f70580295464c",
    ),
    # Task.retry(throw=False) publishes a group member's retry, as the per-task path's does.
    (
        "celery.app.task:Task.retry",
        "(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None, "
        "max_retries=None, **options)",
        "82cd910b59663a00",
    ),
    (
        "celery.worker.request:create_request_cls",
        "(base, task, pool, hostname, eventer, ref, revoked_tasks, task_ready, trace, app)",
        "871f30fe1cfee4bf",
    ),
    # Not overridden, but they decide whether a group member's message is acknowledged or
    # requeued once group_commit settles it through them.
    (
        "celery.worker.request:Request.on_success",
        "(self, failed__retval__runtime, **kwargs)",
        "8d11e320facdb072",
    ),
    (
        "celery.worker.request:Request.on_failure",
        "(self, exc_info, send_failed_event=True, return_ok=False)",
        "21736ec661cd60d7",
    ),
    ("celery.worker.request:Request.acknowledge", "(self)", "60dad9ce9c39f54c"),
    ("celery.worker.request:Request.reject", "(self, requeue=False)", "08be2378bcc6c017"),
    # StayOnTheSentinels (broker.py) relies on `if self.cycle:` here: a falsy cycle never
    # switches hosts.
    ("kombu.connection:Connection.maybe_switch_next", "(self)", "4224624771e9d4cf"),
    # stop.py: a pool child's SIGTERM handler is billiard's Python-level one, installed after
    # worker_process_init (which blocks SIGTERM) by after_fork, and handed the signals that come
    # from the main process.
    ("billiard.pool:Worker.after_fork", "(self)", "2210e993814bfebb"),
    # celery_ext/decoding.py: the same decoding, one decoder made once.
    (
        "kombu.utils.json:loads",
        "(s, _loads, decode_bytes, object_hook)",
        "40ae6ffb3239b070",
    ),
    ("billiard.common:_shutdown_cleanup", "(signum, frame)", "5b2da17a84fa0320"),
    ("celery.concurrency.prefork:process_initializer", "(app, hostname)", "15a8b226f8e00eee"),
    # logs.py, LOG_FORMAT=json: replaced by a function writing one JSON object (module global,
    # looked up by the shutdown, SIGUSR1 and SIGHUP handlers at each call).
    ("celery.apps.worker:safe_say", "(msg, f)", "2a997ad5affebd35"),
    # Not overridden: it sends celeryd_init (logs.py's JSON set-up) before check_privileges warns.
    (
        "celery.apps.worker:Worker.on_before_init",
        "(self, quiet=False, **kwargs)",
        "64c3e837332aa449",
    ),
    # Not overridden: it sends celeryd_after_setup, where logs.py logs the banner and sets
    # `quiet`, before it prints the banner unless `quiet`.
    ("celery.apps.worker:Worker.on_start", "(self)", "0e5a488e2f0bb8af"),
    # Not overridden: logs.banner logs what these print.
    ("celery.apps.worker:Worker.startup_info", "(self, artlines=True)", "da84c5ac8f58507e"),
    ("celery.apps.worker:Worker.extra_info", "(self)", "5a3279849698eef0"),
    # Not overridden: a root logger marked `_rudimentary_setup` (logs.py's early JSON handler)
    # still gets Celery's handler.
    ("celery.app.log:Logging._is_configured", "(self, logger)", "222ac0adc0f89392"),
]

# Internals the overrides call or read: each must still exist with this signature.
USED = [
    ("kombu.transport.virtual.base:QoS.append", "(self, message, delivery_tag)"),
    ("kombu.transport.virtual.base:QoS.ack", "(self, delivery_tag)"),
    ("kombu.transport.virtual.base:QoS._flush", "(self)"),
    ("kombu.transport.virtual.base:QoS.can_consume_max_estimate", "(self)"),
    ("kombu.transport.virtual.base:QoS.restore_unacked_once", "(self, stderr=None)"),
    ("kombu.transport.redis:Channel._q_for_pri", "(self, queue, pri)"),
    # worker/tracing.py finds each message's consumer span where CeleryInstrumentor keeps it.
    ("opentelemetry.instrumentation.celery.utils:retrieve_context", "(task, task_id, is_publish)"),
    ("kombu.transport.redis:Channel._get_message_priority", "(self, message, reverse=False)"),
    ("kombu.transport.redis:Channel._flush_brpop_reauth", "(self)"),
    ("kombu.transport.redis:Channel._create_client", "(self, asynchronous=False)"),
    ("kombu.transport.redis:Transport._deliver", "(self, message, queue)"),
    ("kombu.transport.redis:MultiChannelPoller._register_BRPOP", "(self, channel)"),
    ("kombu.transport.redis:Mutex", "(client, name, expire)"),
    ("kombu.transport.virtual.base:Channel._lookup", "(self, exchange, routing_key, default=None)"),
    ("kombu.transport.redis:SentinelChannel._get_pool", "(self, asynchronous=False)"),
    # worker/metrics.py: the value class of multiprocess mode, chosen after the import.
    (
        "prometheus_client.values:MultiProcessValue",
        "(process_identifier=<built-in function getpid>)",
    ),
    ("celery.worker.consumer.consumer:Consumer._flush_events", "(self)"),
    (
        "celery.backends.redis:RedisBackend._get_result_meta",
        "(self, result, state, traceback, request, format_date=True, encode=False)",
    ),
    ("celery.backends.redis:RedisBackend.ensure", "(self, fun, args, **policy)"),
    ("celery.backends.redis:RedisBackend.get_key_for_task", "(self, task_id, key='')"),
    ("celery.worker.request:Request.on_accepted", "(self, pid, time_accepted)"),
    ("celery.worker.request:Request.send_event", "(self, type, **fields)"),
    ("celery.worker.request:Request.revoked", "(self)"),
    ("celery.worker.request:Request._payload", None),
    ("celery.worker.request:Request._already_revoked", None),
    ("celery.worker.request:Request._already_cancelled", None),
    ("celery.worker.request:Request.request_dict", None),
    ("celery.app.task:Context", "(*args, **kwargs)"),
    ("celery.app.task:Task.pop_request", "(self)"),
    ("billiard.exceptions:Terminated", None),
    ("billiard.exceptions:TimeLimitExceeded", None),
    ("billiard.exceptions:WorkerLostError", None),
    (
        "celery.worker.state:task_ready",
        "(request, successful, remove_request, "
        "discard_active_request, discard_reserved_request, discard_scheduled_request)",
    ),
    (
        "celery.worker.state:task_reserved",
        "(request, add_request, add_reserved_request, discard_scheduled_request)",
    ),
    (
        "celery.concurrency.base:BasePool.apply_async",
        "(self, target, args=None, kwargs=None, **options)",
    ),
    ("celery:_original_os_write", None),
    ("celery.utils.log:LoggingProxy.__init__", "(self, logger, loglevel=None)"),
    ("celery.utils.log:get_multiprocessing_logger", "()"),
]


def signature_of(obj: object, expected: str | None) -> str | None:
    """The signature as written in the tables: in full, or by parameter names only where the
    defaults are objects (whose repr holds an address); None for an attribute (it exists)."""
    if expected is None:
        return None
    signature = inspect.signature(obj)  # type: ignore[arg-type]
    if "=" in expected or "*" in expected:
        return str(signature)
    return f"({', '.join(signature.parameters)})"


def resolve(path: str) -> object:
    module_name, _, qualname = path.partition(":")
    found: object = importlib.import_module(module_name)
    for part in qualname.split(".") if qualname else ():
        found = getattr(found, part, None)
        if found is None:
            pytest.fail(f"{path} is gone: a project override relies on it; read the override again")
    return found


@pytest.mark.parametrize(
    ("path", "signature", "digest"), OVERRIDDEN, ids=[o[0] for o in OVERRIDDEN]
)
def test_an_overridden_method_is_the_one_the_override_was_written_for(path, signature, digest):
    method = resolve(path)
    source = inspect.getsource(method)  # type: ignore[arg-type]

    now = signature_of(method, signature)
    changed = hashlib.sha256(source.encode()).hexdigest()[:16]

    assert now == signature, f"{path} changed its signature from {signature} to {now}"
    assert changed == digest, (
        f"{path} changed upstream (source digest {changed}, was {digest}): read its override in "
        "worker/celery_ext/ (docs/internals.md) against the new code, then update this digest and "
        "the pins in pyproject.toml and requirements.lock"
    )


@pytest.mark.parametrize(("path", "signature"), USED, ids=[u[0] for u in USED])
def test_an_internal_the_overrides_call_still_has_its_signature(path, signature):
    now = signature_of(resolve(path), signature)

    assert now == signature, f"{path} changed its signature from {signature} to {now}"


# Private attributes the extensions read or write: each must still be assigned where it was, by
# the class (or module) that owns it. (owner, attribute, where the owner assigns it)
ATTRIBUTES = [
    ("kombu.transport.virtual.base:QoS", "_delivered", "kombu.transport.virtual.base:QoS"),
    ("kombu.transport.redis:Channel", "_in_poll", "kombu.transport.redis:Channel"),
    ("kombu.transport.redis:Channel", "_brpop_sent_at", "kombu.transport.redis:Channel"),
    ("kombu.transport.redis:Channel", "_closing", "kombu.transport.redis:Channel"),
    ("kombu.transport.redis:Channel", "_queue_cycle", "kombu.transport.redis:Channel"),
    (
        "kombu.transport.redis:MultiChannelPoller",
        "_channels",
        "kombu.transport.redis:MultiChannelPoller",
    ),
    ("kombu.transport.virtual.base:Message", "_raw", "kombu.transport.virtual.base:Message"),
    (
        "celery.worker.consumer.consumer:Consumer",
        "_flush_events_promise",
        "celery.worker.consumer.consumer:Consumer",
    ),
    ("celery.concurrency.prefork:TaskPool", "_pool", "celery.concurrency.prefork:TaskPool"),
    ("billiard.pool:Pool", "_cache", "billiard.pool:Pool"),
    ("billiard.pool:ApplyResult", "_accepted", "billiard.pool:ApplyResult"),
    # celery_ext/decoding.py registers its decoder where kombu's registry looks it up.
    (
        "kombu.serialization:SerializerRegistry",
        "_decoders",
        "kombu.serialization:SerializerRegistry",
    ),
    # group_commit.Grouper.closed: a job the pool forgot is no longer under its id in `_cache`.
    ("billiard.pool:ApplyResult", "_job", "billiard.pool:ApplyResult"),
    ("billiard.pool:ApplyResult", "_write_to", "celery.concurrency.asynpool"),
    ("celery.worker.request:Request", "_apply_result", "celery.worker.request:Request"),
    ("celery.backends.redis:RedisBackend", "_MAX_STR_VALUE_SIZE", "celery.backends.redis"),
    # worker/metrics.py replaces this module global (picked at import from
    # PROMETHEUS_MULTIPROC_DIR) before it makes its metrics.
    ("prometheus_client.values", "ValueClass", "prometheus_client.values"),
]


@pytest.mark.parametrize(
    ("owner", "attribute", "where"), ATTRIBUTES, ids=[a[1] for a in ATTRIBUTES]
)
def test_a_private_attribute_the_extensions_use_is_still_assigned_upstream(owner, attribute, where):
    source = inspect.getsource(resolve(where))  # type: ignore[arg-type]

    assert re.search(rf"\.{attribute}\s*=", source) or re.search(
        rf"^\s*{attribute}\s*=", source, re.M
    ), f"{where} no longer assigns {attribute}: read the extension that uses {owner}.{attribute}"


def test_prometheus_metrics_take_the_value_class_when_they_are_made():
    # worker/metrics.py switches values.ValueClass after prometheus_client was imported:
    # only metrics that look the module global up when made get the new class.
    source = inspect.getsource(importlib.import_module("prometheus_client.metrics"))

    assert "values.ValueClass(" in source and "import ValueClass" not in source, (
        "prometheus_client.metrics no longer reads values.ValueClass when a metric is made: "
        "read worker/metrics.py serve() again"
    )


def test_the_sentinel_channel_keeps_every_option_kombus_sentinel_channel_takes():
    from kombu.transport.redis import SentinelChannel as KombuSentinelChannel

    from worker.celery_ext.broker import SentinelChannel

    missing = set(KombuSentinelChannel.from_transport_options) - set(
        SentinelChannel.from_transport_options
    )
    assert not missing, f"transport options kombu's SentinelChannel takes and ours drops: {missing}"


def test_every_upstream_method_the_extensions_override_is_pinned():
    from worker.celery_ext import broker, consumer, group_commit, results

    pinned = {id(resolve(path)) for path, *_ in OVERRIDDEN + USED}
    unpinned = [
        f"{cls.__module__}.{cls.__qualname__}.{name}"
        for module in (broker, consumer, results, group_commit)
        for cls in vars(module).values()
        if inspect.isclass(cls) and cls.__module__ == module.__name__
        for name, value in vars(cls).items()
        if inspect.isfunction(value)
        for base in [next((b for b in cls.__mro__[1:] if name in vars(b)), None)]
        if base is not None
        and not base.__module__.startswith(("worker.", "builtins"))
        and id(vars(base)[name]) not in pinned
    ]

    assert not unpinned, f"overrides without a pin in OVERRIDDEN: {unpinned}"
