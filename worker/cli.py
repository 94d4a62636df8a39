"""The `writing-sessions` command: migrate, run a worker, send, and read what was persisted."""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from worker.errors import WritingSessionsError, one_line

F = TypeVar("F", bound=Callable[..., Any])


def clean_errors(func: F) -> F:
    """Turn project and database errors into one line on stderr and exit status 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return func(*args, **kwargs)
        except WritingSessionsError as exc:
            raise click.ClickException(str(exc)) from exc
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None) or exc
            raise click.ClickException(f"database error: {one_line(orig)}") from exc

    return wrapper  # type: ignore[return-value]


def wait_options(func: F) -> F:
    """--wait and --timeout: confirm mode of the producer API (wait, resend on timeout)."""
    func = click.option(
        "--timeout",
        type=float,
        default=30.0,
        show_default=True,
        help="Seconds to wait for the outcome, per attempt.",
    )(func)
    return click.option(
        "--wait", is_flag=True, help="Wait for the outcome and print it; resend on timeout."
    )(func)


@click.group()
def main() -> None:
    """writing-sessions: persist writing sessions sent through Celery into PostgreSQL."""


@main.command()
@clean_errors
def migrate() -> None:
    """Upgrade the database schema to the newest revision (Alembic head)."""
    from worker import migrate as migrations
    from worker.settings import mask_url, settings

    migrations.upgrade()
    click.echo(f"{mask_url(settings.database_url)} is at revision {migrations.head_revision()}")


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker; every argument goes to `celery worker` (try --help)."""
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker as celery_worker

    from worker.app import app

    # Celery's own `worker` command, without Celery's command group around it: the group loads
    # every `celery.commands` plugin (Flower, the REPL) into the parent, about 22 MB that each
    # prefork child would then carry for nothing.
    celery_worker.main(
        args=list(celery_args),
        prog_name="writing-sessions worker",
        obj=CLIContext(app=app, no_color=None, workdir=None),
    )


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(flower_args: tuple[str, ...]) -> None:
    """Run Flower against the configured broker; arguments go to `celery flower`.

    Basic auth comes from FLOWER_BASIC_AUTH (user:password); Flower refuses its API without it.
    """
    from worker.app import app

    app.start(["flower", *flower_args])


@main.command()
@click.option("--topic", help="Topic of the session (required unless --json gives one).")
@click.option("--content", help="Text written in the session.")
@click.option(
    "--content-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the content from this file (UTF-8).",
)
@click.option("--id", help="Session id (a UUID); a new one by default.")
@click.option("--revision", type=int, help="Producer revision (default 0).")
@click.option("--author-id", help="Opaque id of the author.")
@click.option("--started-at", help="ISO 8601 start time (default: now).")
@click.option("--ended-at", help="ISO 8601 end time.")
@click.option(
    "--json",
    "json_file",
    type=click.File("r", encoding="utf-8"),
    help="Read the whole writing-session object from a JSON file ('-' for stdin).",
)
@wait_options
@clean_errors
def send(
    content_file: Path | None, json_file: Any, wait: bool, timeout: float, **fields: Any
) -> None:
    """Enqueue one writing session (writing_sessions.save) and print its task id.

    With --wait it waits for the outcome and resends on timeout (writes are idempotent).
    """
    from worker.producer import send_writing_session_object

    payload: dict[str, Any] = json.load(json_file) if json_file else {}
    if not isinstance(payload, dict):
        raise click.UsageError("--json must hold one writing-session object")
    if content_file is not None:
        if fields["content"] is not None:
            raise click.UsageError("give --content or --content-file, not both")
        fields["content"] = content_file.read_text(encoding="utf-8")
    payload.update({key: value for key, value in fields.items() if value is not None})
    payload.setdefault("id", str(uuid.uuid4()))
    result = send_writing_session_object(payload, confirm=wait, timeout=timeout)
    click.echo(f"sent {payload['id']} as task {result.id}")
    if wait:
        click.echo(json.dumps(result.result))


def _utc(value: datetime | None) -> datetime | None:
    from worker.times import as_utc

    return None if value is None else as_utc(value)


@main.command()
@click.option("--workers", is_flag=True, help="Also require at least one worker to answer ping.")
@click.option(
    "--node",
    metavar="NAME",
    help="Also require this worker node to answer ping (worker@%h: %h is this host's name); "
    "a container's healthcheck, which must not pass because another node answers.",
)
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds per check.")
def health(workers: bool, node: str | None, timeout: float) -> None:
    """Check broker, database and schema (and workers); one line per check, exit 1 on failure."""
    from worker.health import run_checks

    ok = True
    for check in run_checks(workers=workers, node=node, timeout=timeout):
        ok &= check.ok
        click.echo(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    sys.exit(0 if ok else 1)


@main.command("delete")
@click.argument("session_id", type=click.UUID)
@click.option("--revision", type=int, required=True, help="Revision of the deletion.")
@wait_options
@clean_errors
def delete_(session_id: uuid.UUID, revision: int, wait: bool, timeout: float) -> None:
    """Enqueue writing_sessions.delete: erase the session, keep a tombstone.

    With --wait it waits for the outcome and resends on timeout (writes are idempotent).
    """
    from worker.producer import delete_writing_session

    result = delete_writing_session(session_id, revision, confirm=wait, timeout=timeout)
    click.echo(f"sent delete of {session_id} as task {result.id}")
    if wait:
        click.echo(json.dumps(result.result))


@main.group("dead-letters")
def dead_letters() -> None:
    """Messages the worker could not persist: list, show, replay, purge."""


@dead_letters.command("list")
@click.option("--task", "task_name", help="Only this task name (e.g. writing_sessions.save).")
@click.option("--since", type=click.DateTime(), help="Failed at or after (UTC).")
@click.option("--until", type=click.DateTime(), help="Failed before (UTC).")
@click.option("--pending", is_flag=True, help="Only letters not yet replayed.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@clean_errors
def dead_letters_list(
    task_name: str | None,
    since: datetime | None,
    until: datetime | None,
    pending: bool,
    limit: int,
) -> None:
    """List dead letters, newest first, with their error."""
    from worker import dead_letters as letters

    for letter in letters.find(
        task_name=task_name,
        since=_utc(since),
        until=_utc(until),
        include_replayed=not pending,
        limit=limit,
    ):
        replayed = " (replayed)" if letter.replayed_at else ""
        click.echo(
            f"{letter.id:>6}  {_utc(letter.failed_at):%Y-%m-%d %H:%M:%S}  {letter.task_name}  "
            f"x{letter.attempts}  {letter.error_type}: {letter.error}{replayed}"
        )


@dead_letters.command("show")
@click.argument("letter_id", type=int)
@clean_errors
def dead_letters_show(letter_id: int) -> None:
    """Print one dead letter as JSON, its payload exactly as received."""
    from worker import dead_letters as letters

    letter = letters.get(letter_id)
    if letter is None:
        raise click.ClickException(f"no dead letter {letter_id}")
    data = _as_dict(letter, with_content=True)
    data["payload"] = json.loads(letter.payload)
    click.echo(json.dumps(data, indent=2))


@dead_letters.command("replay")
@click.argument("letter_ids", type=int, nargs=-1)
@click.option(
    "--all", "replay_all", is_flag=True, help="Every letter pending when the replay starts."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=500,
    show_default=True,
    help="Letters read, sent and marked replayed together.",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="A line per letter with --all too (always with ids)."
)
@clean_errors
def dead_letters_replay(
    letter_ids: tuple[int, ...], replay_all: bool, batch_size: int, verbose: bool
) -> None:
    """Re-enqueue the original arguments of dead letters and mark them replayed.

    A progress bar on a terminal (stderr), then one summary line. With ids, a line per letter
    replayed, and an error naming each id that was not.
    """
    from worker import dead_letters as letters

    if bool(letter_ids) == replay_all:
        raise click.UsageError("give dead-letter ids or --all (not both)")
    if replay_all:
        total, last_id = letters.count_pending()
        batches = letters.replay(None, up_to=last_id, batch_size=batch_size)
    else:
        total = len(set(letter_ids))
        batches = letters.replay(letter_ids, batch_size=batch_size)
    each_letter = verbose or not replay_all
    # Lines per letter on the same terminal would break the bar's line: they are the progress.
    show_bar = sys.stderr.isatty() and not (each_letter and sys.stdout.isatty())
    bar = click.progressbar(length=total, label="replaying", file=sys.stderr)
    replayed, malformed, missing = 0, [], []
    try:
        with bar if show_bar else contextlib.nullcontext(bar):
            for batch in batches:
                replayed += len(batch.replayed)
                malformed += batch.malformed
                missing += batch.missing
                if show_bar:
                    bar.update(batch.settled)
                if each_letter:
                    for letter_id, task_id in batch.replayed:
                        click.echo(f"replayed {letter_id} as task {task_id}")
    finally:
        # Also after an error or ^C: what was done so far.
        click.echo(
            f"replayed {replayed}, skipped {len(malformed)} (malformed: nothing to send), "
            f"not found or already replayed: {len(missing)}"
        )
    if not replay_all and (malformed or missing):
        reasons = [
            f"{reason}: {', '.join(map(str, ids))}"
            for reason, ids in (
                ("malformed (nothing to send)", malformed),
                ("not found or already replayed", missing),
            )
            if ids
        ]
        raise click.ClickException(f"not replayed: {'; '.join(reasons)}")


@dead_letters.command("purge")
@click.option(
    "--before",
    type=click.DateTime(),
    required=True,
    help="Delete the letters that failed before this time (UTC).",
)
@click.option("--replayed-only", is_flag=True, help="Only letters already replayed.")
@clean_errors
def dead_letters_purge(before: datetime, replayed_only: bool) -> None:
    """Delete old dead letters (retention); say how many."""
    from worker import dead_letters as letters

    purged = letters.purge(cast(datetime, _utc(before)), replayed_only=replayed_only)
    which = "replayed dead letter(s)" if replayed_only else "dead letter(s)"
    click.echo(f"purged {purged} {which} that failed before {_utc(before):%Y-%m-%d %H:%M:%S} UTC")


def bench_options(func: F) -> F:
    """One click option per BenchOptions field, from the field's type, default and help."""
    from worker.bench_options import BenchOptions

    for option in reversed(fields(BenchOptions)):
        if "help" not in option.metadata:
            continue  # not a command-line option
        names = [f"--{option.name.replace('_', '-')}", *option.metadata.get("short", ())]
        if option.type in (bool, "bool"):
            func = click.option(*names, is_flag=True, help=option.metadata["help"])(func)
        else:
            func = click.option(
                *names,
                type=option.metadata.get("type"),
                default=option.default,
                show_default=True,
                help=option.metadata["help"],
            )(func)
    return func


@main.command()
@bench_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@clean_errors
def bench(as_json: bool, **options: Any) -> None:
    """Send sessions, wait until every row is committed, print throughput and latency.

    Measures a running worker, or one of its own with --start-worker. Removes its rows after.
    """
    from worker import bench as meter

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if as_json:
            return
        if stage not in bars:
            bars[stage] = click.progressbar(length=total, label=f"{stage:>9}", file=sys.stderr)
            bars[stage].__enter__()
        bar = bars[stage]
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    report = meter.run(meter.BenchOptions(**options), progress)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    worker = f"{report.pool} -c {report.concurrency}" if report.pool else "running worker"
    click.echo(
        f"{report.sessions} sessions via {report.task} ({report.messages} messages, "
        f"{report.payload_bytes} chars each, {report.producers} producer(s), {worker})\n"
        f"  sent:           {report.sent_per_second:>10.1f} messages/s "
        f"({report.send_seconds:.2f} s)\n"
        f"  persisted:      {report.rows_per_second:>10.1f} rows/s end to end "
        f"({report.end_to_end_seconds:.2f} s)\n"
        f"  drained:        {report.drain_rows_per_second:>10.1f} rows/s "
        "(first commit to last)\n"
        f"  latency:        p50 {report.latency_ms['p50']} ms, p95 {report.latency_ms['p95']} ms, "
        f"p99 {report.latency_ms['p99']} ms (send to commit)\n"
        f"  db connections: {report.max_db_connections} (most held by workers)\n"
        f"  peak RSS:       "
        + (", ".join(f"{k} {v} MB" for k, v in report.peak_worker_rss_mb.items()) or "n/a")
        + "\n  CPU/message:    "
        + (", ".join(f"{k} {v} µs" for k, v in report.cpu_us_per_message.items()) or "n/a")
    )


@main.command("list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@clean_errors
def list_(limit: int, as_json: bool) -> None:
    """List persisted writing sessions, most recently written first."""
    from sqlalchemy import select

    from worker.db import task_db
    from worker.models import WritingSession

    with task_db() as db:
        rows = db.scalars(
            select(WritingSession).order_by(WritingSession.updated_at.desc()).limit(limit)
        ).all()
        for row in rows:
            if as_json:
                click.echo(json.dumps(_as_dict(row, with_content=False)))
            else:
                state = "deleted" if row.deleted_at else f"{row.word_count} words"
                topic = row.topic if row.topic is not None else "-"
                click.echo(
                    f"{row.id}  r{row.revision:<4} {row.updated_at:%Y-%m-%d %H:%M:%S}  "
                    f"{state:>12}  {topic}"
                )


@main.command()
@click.argument("session_id", type=click.UUID)
@clean_errors
def show(session_id: uuid.UUID) -> None:
    """Print one writing session as JSON."""
    from worker.db import task_db
    from worker.models import WritingSession

    with task_db() as db:
        row = db.get(WritingSession, session_id)
        if row is None:
            raise click.ClickException(f"no writing session {session_id}")
        click.echo(json.dumps(_as_dict(row, with_content=True), ensure_ascii=False, indent=2))


def _as_dict(row: Any, with_content: bool) -> dict[str, Any]:
    from worker.times import as_utc

    data: dict[str, Any] = {}
    for column in row.__table__.columns:
        if column.key == "content" and not with_content:
            continue
        value = getattr(row, column.key)
        if isinstance(value, datetime):
            value = as_utc(value).isoformat()
        elif isinstance(value, uuid.UUID):
            value = str(value)
        data[column.key] = value
    return data


def run() -> None:
    """Entry point that never shows a traceback for a bad configuration."""
    try:
        main()
    except WritingSessionsError as exc:  # e.g. a bad environment variable at import time
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
