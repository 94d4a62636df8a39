"""The Celery application: configured from `celeryconfig`, tasks from the `tasks` package."""

from celery import Celery

from worker.settings import VAR_DIR, settings

app = Celery("writing_sessions")
app.config_from_object("celeryconfig")
# worker.db ties the per-process engine to the worker signals; worker.migrate checks the schema
# before consuming. Workers import them; producers never do.
app.conf.imports = ("worker.db", "worker.migrate")
app.conf.include = ("tasks.writing_sessions",)

if settings.embedded:
    # The embedded default keeps its database, broker and results under ./var/.
    VAR_DIR.mkdir(exist_ok=True)
