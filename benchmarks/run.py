"""Run the project's bench and the database's own limit on one machine, and print ratios.

    DATABASE_URL=postgresql://postgres@127.0.0.1/ws_bench \\
    CELERY_BROKER_URL=redis://127.0.0.1:6379/10 CELERY_RESULT_BACKEND=redis://127.0.0.1:6379/10 \\
    .venv/bin/python benchmarks/run.py --runs 3

Sides, each at the same concurrency (2 processes by default) and with the same rows; the queue
sides drain a pre-filled queue (rows/s from the first commit to the last):
- `save`: writing-sessions bench --prefill, prefork worker, one message per row, results stored;
- `dramatiq`: the same job (the project's validation and upsert, one commit per message) under
  Dramatiq, N processes x 4 threads (benchmarks/dramatiq_side.py; pip install -e '.[bench]');
- `celery floor`: the same worker and settings draining a task that does nothing
  (benchmarks/celery_floor.py): the most any Celery `save` can reach here; also on kombu's
  in-memory broker (no broker cost at all), and grouped (one pool job per group of what a
  turn of the event loop delivered, no events or results) on Redis and in memory;
- `save_many`: writing-sessions bench --prefill, batches of 1,000;
- light load: 200 `save` messages sent 20 ms apart to an idle worker, latency send to commit;
- `save` again on RabbitMQ (--rabbitmq) and with `-P threads` (--threads);
- `psycopg2 loop`: one upsert and one commit per row, N processes;
- `psycopg2 batched`: multi-row upserts of 1,000 rows, N processes.
The table is vacuumed before every side (deleted rows of the previous side slow the next).
Medians of --runs runs are printed; the figures are a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import cast

import psycopg2
from psycopg2.extras import execute_values
from sqlalchemy import Table, literal
from sqlalchemy.dialects import postgresql

from worker.bench import content
from worker.models import WritingSession
from worker.upsert import COLUMNS, ColumnsOutOfStep, empty_values

CLI = str(Path(sys.executable).parent / "writing-sessions")
# The psycopg2 sides write the rows the worker would, in plain SQL. The columns each row's tuple
# gives (in _loop and _batched), in the model's order, as the statement lists them:
GIVEN = ("id", "topic", "content", "author_id", "word_count", "char_count")
# A save without started_at takes the time of the write, as the two stamps do.
SET = {"started_at": "now()", "revision": "0", "created_at": "now()", "updated_at": "now()"}


def values_of(table: Table) -> dict[str, str]:
    """The SQL value of each column: GIVEN and SET, and for every other column what a row that
    says nothing of it holds (NULL, else the model's default), so a new column needs no edit
    here."""
    names = [c.name for c in table.columns]
    unknown = [name for name in (*GIVEN, *SET) if name not in names]
    if unknown:
        raise ColumnsOutOfStep(
            f"benchmarks/run.py gives {', '.join(unknown)}, which {table.name} has no column"
            " for: remove them from GIVEN (and from the tuples of _loop and _batched) or SET"
        )
    if [name for name in names if name in GIVEN] != list(GIVEN):
        raise ColumnsOutOfStep(
            "benchmarks/run.py: GIVEN (and the tuples of _loop and _batched) must follow the"
            f" order of {table.name}'s columns in worker/models.py"
        )
    rest = [name for name in names if name not in GIVEN and name not in SET]
    derived = empty_values(table, rest, instead="give it a value in SET in benchmarks/run.py")
    values = dict.fromkeys(GIVEN, "%s") | SET
    for name, value in derived.items():
        values[name] = "NULL" if value is None else _sql_literal(table, name, value)
    return values


def _sql_literal(table: Table, name: str, value: object) -> str:
    bound = literal(value, table.c[name].type)
    return str(bound.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


VALUES = values_of(cast(Table, WritingSession.__table__))
UPSERT = (
    f"INSERT INTO writing_session ({', '.join(COLUMNS)}) VALUES {{values}} "
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in COLUMNS if name not in ("id", "created_at"))
    + " WHERE writing_session.revision < excluded.revision RETURNING id, revision, (xmax = 0)"
)
ONE_ROW = "(" + ", ".join(VALUES[name] for name in COLUMNS) + ")"
CONTENT = content(200)


def dsn() -> str:
    url = os.environ["DATABASE_URL"]
    return url.replace("postgresql+psycopg2://", "postgresql://")


def _loop(args: tuple[str, int]) -> tuple[float, float]:
    tag, rows = args
    connection = psycopg2.connect(dsn())
    started = time.time()
    with connection.cursor() as cursor:
        for _ in range(rows):
            cursor.execute(
                UPSERT.format(values=ONE_ROW), (str(uuid.uuid4()), "bench", CONTENT, tag, 7, 40)
            )
            cursor.fetchall()
            connection.commit()
    finished = time.time()
    connection.close()
    return started, finished


def _batched(args: tuple[str, int]) -> tuple[float, float]:
    tag, rows = args
    connection = psycopg2.connect(dsn())
    started = time.time()
    template = ONE_ROW
    with connection.cursor() as cursor:
        for start in range(0, rows, 1000):
            batch = [
                (str(uuid.uuid4()), "bench", CONTENT, tag, 7, 40)
                for _ in range(start, min(start + 1000, rows))
            ]
            execute_values(
                cursor,
                UPSERT.format(values="%s"),
                batch,
                template=template,
                page_size=1000,
                fetch=True,
            )
            connection.commit()
    finished = time.time()
    connection.close()
    return started, finished


def direct(kind: str, rows: int, processes: int) -> float:
    """rows/s of a plain psycopg2 side, then delete its rows.

    Timed from the first process's first statement to the last one's last commit, as the queue
    sides are timed from their first commit to their last: starting processes is not the limit.
    """
    vacuum()
    tag = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    share = rows // processes
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        spans = pool.map(_loop if kind == "loop" else _batched, [(tag, share)] * processes)
    elapsed = max(finished for _, finished in spans) - min(started for started, _ in spans)
    connection = psycopg2.connect(dsn())
    with connection, connection.cursor() as cursor:
        cursor.execute("DELETE FROM writing_session WHERE author_id = %s", (tag,))
    connection.close()
    return share * processes / elapsed


def vacuum() -> None:
    connection = psycopg2.connect(dsn())
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE writing_session")
    connection.close()


def last_json_line(*command: str) -> dict:
    """Run one side as a subprocess and read the figures it prints last, as JSON."""
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def bench(*args: str, broker: str | None = None) -> dict:
    vacuum()
    command = (CLI, "bench", "--json", "--start-worker", "--prefill", *args)
    if broker is None:
        return last_json_line(*command)
    # The same side on another broker: the producer and the worker it starts both read it.
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CELERY_BROKER_URL": broker},
    )
    return json.loads(result.stdout.splitlines()[-1])


def celery_floor(rows: int, concurrency: str, pool: str, *options: str) -> float:
    script = str(Path(__file__).parent / "celery_floor.py")
    figures = last_json_line(
        sys.executable, script, "--count", str(rows), "-c", concurrency, "-P", pool, *options
    )
    return float(figures["drain_messages_per_second"])


def dramatiq_side(rows: int, processes: int) -> float:
    vacuum()
    script = str(Path(__file__).parent / "dramatiq_side.py")
    figures = last_json_line(
        sys.executable, script, "--count", str(rows), "--processes", str(processes)
    )
    return float(figures["drain_rows_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10_000, help="rows per `save` run")
    parser.add_argument("--batch-rows", type=int, default=100_000, help="rows per batched run")
    parser.add_argument("-c", "--concurrency", type=int, default=2)
    parser.add_argument("--pool", default="prefork")
    parser.add_argument(
        "--rabbitmq",
        default="amqp://guest:guest@127.0.0.1:5672//",
        help="broker URL of the `save` side on RabbitMQ ('' leaves it out)",
    )
    parser.add_argument(
        "--threads", type=int, default=8, help="threads of the `save -P threads` side (0: none)"
    )
    options = parser.parse_args()
    c = str(options.concurrency)
    grouped_rows = options.rows * 4  # a grouped drain is short: give it more to time
    figures: dict[str, list[float]] = {}
    for run in range(options.runs):
        save = bench("-c", c, "-P", options.pool, "--count", str(options.rows))
        many = bench(
            "-c",
            c,
            "-P",
            options.pool,
            "--task",
            "save_many",
            "--batch-size",
            "1000",
            "--count",
            str(options.batch_rows),
        )
        light = last_json_line(
            CLI,
            "bench",
            "--json",
            "--start-worker",
            "-c",
            c,
            "-P",
            options.pool,
            "--count",
            "200",
            "--interval",
            "0.02",
        )
        rabbit = (
            bench(
                "-c", c, "-P", options.pool, "--count", str(options.rows), broker=options.rabbitmq
            )
            if options.rabbitmq
            else None
        )
        threads = (
            bench("-c", str(options.threads), "-P", "threads", "--count", str(options.rows))
            if options.threads
            else None
        )
        results = {
            "save rows/s": save["drain_rows_per_second"],
            "save CPU/msg main us": save["cpu_us_per_message"]["main"],
            "save CPU/msg children us": save["cpu_us_per_message"]["children"],
            "light load p50 ms": light["latency_ms"]["p50"],
            "light load p99 ms": light["latency_ms"]["p99"],
            "dramatiq rows/s": dramatiq_side(options.rows, options.concurrency),
            "celery no-op floor msgs/s": celery_floor(options.rows, c, options.pool),
            "celery no-op in-memory msgs/s": celery_floor(
                options.rows, c, options.pool, "--broker", "memory"
            ),
            "grouped no-op msgs/s": celery_floor(
                grouped_rows, c, options.pool, "--grouped", "--prefetch-multiplier", "100"
            ),
            "grouped no-op in-memory msgs/s": celery_floor(
                grouped_rows,
                c,
                options.pool,
                "--grouped",
                "--prefetch-multiplier",
                "100",
                "--broker",
                "memory",
            ),
            "save_many(1000) rows/s": many["drain_rows_per_second"],
            "psycopg2 loop rows/s": direct("loop", options.rows, options.concurrency),
            "psycopg2 batched rows/s": direct("batched", options.batch_rows, options.concurrency),
            "worker peak RSS MB (largest child)": max(
                (v for k, v in save["peak_worker_rss_mb"].items() if k != "main"), default=0
            ),
            "db connections (most)": save["max_db_connections"],
        }
        if rabbit:
            results["save on RabbitMQ rows/s"] = rabbit["drain_rows_per_second"]
        if threads:
            results[f"save -P threads -c {options.threads} rows/s"] = threads[
                "drain_rows_per_second"
            ]
        print(
            f"run {run + 1}: " + json.dumps({k: round(v, 1) for k, v in results.items()}),
            flush=True,
        )
        for key, value in results.items():
            figures.setdefault(key, []).append(value)
    medians = {key: statistics.median(values) for key, values in figures.items()}
    print(f"\nmedians of {options.runs} runs (concurrency {c}, pool {options.pool}):")
    for key, value in medians.items():
        print(f"  {key:<36} {value:>10.1f}")
    print("ratios:")
    print(
        f"  save / dramatiq                       "
        f"{medians['save rows/s'] / medians['dramatiq rows/s']:>10.3f}"
    )
    print(
        f"  celery no-op floor / dramatiq         "
        f"{medians['celery no-op floor msgs/s'] / medians['dramatiq rows/s']:>10.3f}"
    )
    print(
        f"  no-op floor: redis / in-memory        "
        f"{medians['celery no-op floor msgs/s'] / medians['celery no-op in-memory msgs/s']:>10.3f}"
    )
    print(
        f"  grouped no-op: redis / in-memory      "
        f"{medians['grouped no-op msgs/s'] / medians['grouped no-op in-memory msgs/s']:>10.3f}"
    )
    print(
        f"  save / grouped no-op floor            "
        f"{medians['save rows/s'] / medians['grouped no-op msgs/s']:>10.3f}"
    )
    if "save on RabbitMQ rows/s" in medians:
        print(
            f"  save: RabbitMQ / Redis                "
            f"{medians['save on RabbitMQ rows/s'] / medians['save rows/s']:>10.3f}"
        )
    print(
        f"  save / psycopg2 loop                  "
        f"{medians['save rows/s'] / medians['psycopg2 loop rows/s']:>10.3f}"
    )
    print(
        f"  save_many / psycopg2 batched          "
        f"{medians['save_many(1000) rows/s'] / medians['psycopg2 batched rows/s']:>10.3f}"
    )


if __name__ == "__main__":
    main()
