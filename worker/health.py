"""Health checks for operators and container orchestrators: broker, database, schema, workers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from celery.utils.nodenames import host_format

from worker.errors import SchemaNotCurrentError, one_line
from worker.settings import mask_url, settings


@dataclass(frozen=True)
class Check:
    """The result of one health check."""

    name: str
    ok: bool
    detail: str


def run_checks(
    workers: bool = False, node: str | None = None, timeout: float = 5.0
) -> Iterator[Check]:
    """Run each check in turn; none raises, each says what it saw.

    workers: at least one worker must answer ping. node: this worker node must (`%h` is this
    host's name, as in `celery worker -n`), for a container's own healthcheck.
    """
    yield _broker(timeout)
    yield _database()
    if node:
        yield _workers(timeout, host_format(node))
    elif workers:
        yield _workers(timeout)


def _broker(timeout: float) -> Check:
    from worker.app import app

    name = f"broker {mask_url(settings.broker_url)}"
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # any failure to connect is the answer
        return Check(name, False, f"unreachable ({one_line(exc)})")
    return Check(name, True, "reachable")


def _database() -> Check:
    from worker.migrate import check_schema_current, head_revision

    name = f"database {mask_url(settings.database_url)}"
    try:
        check_schema_current()
    except SchemaNotCurrentError as exc:
        return Check(name, False, str(exc))
    return Check(name, True, f"reachable, schema at head {head_revision()}")


def _workers(timeout: float, node: str | None = None) -> Check:
    from worker.app import app

    name = f"worker {node}" if node else "workers"
    try:
        replies = app.control.ping(destination=[node] if node else None, timeout=timeout) or []
    except Exception as exc:  # the broker refusing is a failed check, not a crash
        return Check(name, False, f"ping failed ({one_line(exc)})")
    nodes = sorted(answered for reply in replies for answered in reply)
    if not nodes:
        return Check(name, False, f"no answer to ping within {timeout:g} s")
    return Check(name, True, f"{len(nodes)} answered: {', '.join(nodes)}")
