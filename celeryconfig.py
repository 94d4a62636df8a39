"""Celery settings for writing-sessions, taken from `worker.settings`; each says why.

Every lowercase name here is a Celery setting, printed by `celery inspect conf`, `celery report`
and Flower, which mask only the keys Celery knows: anything else (imports, helpers) starts with
an underscore, which Celery leaves out.
"""

import ssl as _ssl

from worker.settings import settings as _settings

broker_url = _settings.broker_url
result_backend = _settings.result_backend

# JSON only: producers in any language can speak it, and no serializer that can run code
# on load is accepted from the broker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# UTC everywhere, so timestamps in results, events and ETAs mean the same on every host.
enable_utc = True
timezone = "UTC"

# At-least-once: acknowledge after the task ran, and redeliver if the child running it dies.
task_acks_late = True
task_reject_on_worker_lost = True
# Messages waiting in a worker are what group commit writes together
# (worker/celery_ext/group_commit.py): 64 per process lets each child take groups of up to 64
# while the next ones arrive. A dead
# worker's held messages come back by heartbeat within seconds (celery_ext/broker.py), and the
# transport holds about 8 MB of large messages at most, whatever the count.
worker_prefetch_multiplier = 64
# With late acks a lost broker connection redelivers running tasks (by heartbeat). Let them
# finish: the copies end `duplicate`. Cancelling would kill the child writing a whole group,
# and Celery 5.7's consumer then may re-register the dying child's pipe with its event loop and
# stop ("Unrecoverable error: ValueError('file descriptor is None')", seen under Redis
# restarts in tests/test_faults.py).
worker_cancel_long_running_tasks_on_connection_loss = False
broker_connection_retry_on_startup = True

# Time limits below the visibility timeout, so Redis never redelivers a task still running.
task_time_limit = min(_settings.task_time_limit, max(1, _settings.visibility_timeout // 2))
task_soft_time_limit = max(1, task_time_limit - max(1, task_time_limit // 10))

# Redis: a dead worker's messages come back by heartbeat within consumer_heartbeat_timeout
# seconds (celery_ext/broker.py). The visibility timeout is the backstop for a live worker whose
# task overruns (and for workers on kombu's stock transport); kombu sweeps for it only every
# unacked_restore_interval x unacked_restore_throttle seconds, so sweep every interval.
_redis_transport_options: dict[str, object] = {
    "visibility_timeout": _settings.visibility_timeout,
    "unacked_restore_interval": max(1, min(10, _settings.visibility_timeout // 4)),
    "unacked_restore_throttle": 1,
    "consumer_heartbeat_interval": 2,
    "consumer_heartbeat_timeout": 15,
}
if _settings.broker_master_name:
    # sentinel:// brokers: the name of the master the sentinels watch (CELERY_BROKER_MASTER_NAME).
    _redis_transport_options["master_name"] = _settings.broker_master_name
# The embedded broker (kombu's SQLAlchemy transport) passes its options to create_engine:
# let SQLite writers wait for each other instead of failing with "database is locked".
_sqlite_transport_options = {"connect_args": {"timeout": 30}}
# kombu's Redis transport, receiving in atomic batches, acknowledging in batches and recovering
# a dead worker's messages by heartbeat (celery_ext/broker.py), for redis://, rediss:// and Redis
# through Sentinel (sentinel://) alike.
broker_transport = (
    "worker.celery_ext.broker:Transport"
    if _settings.broker_url.startswith(("redis://", "rediss://"))
    else "worker.celery_ext.broker:SentinelTransport"
    if _settings.broker_url.startswith("sentinel://")
    else None
)
broker_failover_strategy: object = "round-robin"
if _settings.broker_url.startswith("sentinel://"):
    # The URLs of a sentinel:// broker are sentinels of one master: no switching between them.
    # Imported only then: every process (producers too) imports this module.
    from worker.celery_ext.broker import StayOnTheSentinels as _StayOnTheSentinels

    broker_failover_strategy = _StayOnTheSentinels
# kombu turns a bare rediss:// into TLS only for its own transport, and then without checking
# the server's certificate. Say TLS here, checked against the system's CAs, unless the URL sets
# ssl_cert_reqs (and ssl_ca_certs, ...) itself.
broker_use_ssl = (
    {"ssl_cert_reqs": _ssl.CERT_REQUIRED}
    if _settings.broker_url.startswith("rediss://") and "ssl_cert_reqs=" not in _settings.broker_url
    else None
)
# Celery refuses a bare rediss:// result backend ("must have parameter ssl_cert_reqs"): say
# TLS checked against the system's CAs here too, unless the URL sets ssl_cert_reqs itself.
redis_backend_use_ssl = (
    {"ssl_cert_reqs": _ssl.CERT_REQUIRED}
    if (_settings.result_backend or "").startswith("rediss://")
    and "ssl_cert_reqs=" not in (_settings.result_backend or "")
    else None
)
broker_transport_options = (
    _sqlite_transport_options
    if _settings.broker_url.startswith("sqla+")
    else _redis_transport_options
)
result_backend_transport_options = {"visibility_timeout": _settings.visibility_timeout}
database_engine_options = {"connect_args": {"timeout": 30}}

# Retry publishing when the broker blips, so a producer's send is not lost to a restart.
task_publish_retry = True
task_publish_retry_policy = {
    "max_retries": 10,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 3,
}

# Flower (and `celery events`) needs task events from workers and "sent" events from producers.
worker_send_task_events = True
task_send_sent_event = True
# Celery's consumer, but task events go out in batches every 50 ms instead of about one
# publish per event (worker/celery_ext/consumer.py).
worker_consumer = "worker.celery_ext.consumer:Consumer"

# Results are for producers that wait on them; keep them a day, not forever.
result_expires = 24 * 3600
# Consumed from Celery's default queue (docs/contract.md); producers need no routing.
task_default_queue = "celery"
