"""The Celery application: configured from `celeryconfig`, tasks from the `tasks` package."""

from celery import Celery

from worker.settings import VAR_DIR, settings

app = Celery("writing_sessions")
app.config_from_object("celeryconfig")
# worker.db ties the per-process engine to the worker signals; worker.migrate checks the schema
# before consuming; worker.logs writes one line per task outcome; worker.celery_ext.stop makes a
# SIGTERM to the whole process group a warm shutdown; worker.metrics serves Prometheus metrics
# when WRITING_SESSIONS_METRICS_PORT is set; worker.celery_ext.decoding decodes message bodies
# with one JSON decoder. Workers import them; producers never do.
app.conf.imports = (
    "worker.db",
    "worker.migrate",
    "worker.logs",
    "worker.celery_ext.stop",
    "worker.metrics",
    "worker.celery_ext.decoding",
)
app.conf.include = ("tasks.writing_sessions",)
# Not a Celery setting but celery_ext/consumer.py's: a message that cannot be turned into a task
# request (a body that is not [args, kwargs, embed], an unknown task name, undecodable content)
# is kept as a dead letter and acknowledged, instead of being dropped or stopping the worker.
app.conf.malformed_message_handler = "worker.dead_letters:keep_malformed"
# redis:// and rediss:// result backends get Celery's Redis backend storing each result in one
# round trip (celery_ext/results.py). Set on the loader, which picks backend classes by URL scheme.
app.loader.override_backends = {
    "redis": "worker.celery_ext.results:RedisBackend",
    "rediss": "worker.celery_ext.results:RedisBackend",
}

if settings.tracing:
    # Producers and workers alike: a producer's send injects the trace context, a worker's
    # message continues it (worker/tracing.py). Children inherit it across the fork.
    from worker import tracing

    tracing.setup()

if any(
    f"sqlite:///{VAR_DIR}/" in (url or "") for url in (app.conf.broker_url, app.conf.result_backend)
):
    # The embedded broker and result store live under ./var/, created on first use.
    VAR_DIR.mkdir(exist_ok=True)
