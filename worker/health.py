"""Health checks for operators and container orchestrators: broker, database, schema, workers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from worker.errors import SchemaNotCurrentError, one_line
from worker.settings import mask_url, settings


@dataclass(frozen=True)
class Check:
    """The result of one health check."""

    name: str
    ok: bool
    detail: str


def run_checks(workers: bool = False, timeout: float = 5.0) -> Iterator[Check]:
    """Run each check in turn; none raises, each says what it saw."""
    yield _broker(timeout)
    yield _database()
    if workers:
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


def _workers(timeout: float) -> Check:
    from worker.app import app

    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception as exc:  # the broker refusing is a failed check, not a crash
        return Check("workers", False, f"ping failed ({one_line(exc)})")
    nodes = sorted(node for reply in replies for node in reply)
    if not nodes:
        return Check("workers", False, f"no worker answered ping within {timeout:g} s")
    return Check("workers", True, f"{len(nodes)} answered: {', '.join(nodes)}")
