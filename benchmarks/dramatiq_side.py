"""The Dramatiq side of the `save` comparison: the same job under another task framework.

One message per session; the actor validates it with the project's own schema and writes it
with the project's own upsert in one Session and one commit, exactly as `writing_sessions.save`
does. Only the framework differs: Dramatiq's Redis broker, N processes x M threads, one engine
(pool of M connections) per process, no result storage (Dramatiq's default).

    python benchmarks/dramatiq_side.py --count 5000 --processes 2 --threads 4

prints one JSON line: drain rows/s of a pre-filled queue, from the first commit to the last.
Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker import store
from worker.bench import (
    bench_session,
    commit_times,
    content,
    delete_rows,
    drain_rate,
    wait_for_rows,
)
from worker.db import make_engine
from worker.schemas import parse_writing_session
from worker.settings import settings

THREADS = int(os.environ.get("BENCH_DRAMATIQ_THREADS", "4"))
broker = RedisBroker(url=os.environ.get("BENCH_DRAMATIQ_BROKER_URL", settings.broker_url))
dramatiq.set_broker(broker)
_sessions: dict[int, sessionmaker[Any]] = {}


def _sessionmaker() -> sessionmaker[Any]:
    # One engine per process, built after the fork on first use, with a connection per thread.
    pid = os.getpid()
    if pid not in _sessions:
        engine = make_engine(settings.database_url, "bench-dramatiq", THREADS)
        _sessions[pid] = sessionmaker(engine, expire_on_commit=False)
    return _sessions[pid]


@dramatiq.actor(queue_name="writing-sessions-bench", max_retries=3)
def save(writing_session: Any) -> None:
    item = parse_writing_session(writing_session)
    with _sessionmaker().begin() as db:
        store.save(db, item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600.0)
    options = parser.parse_args()
    tag = f"bench-dramatiq-{uuid.uuid4().hex[:8]}"
    session_text = content(options.size)
    broker.flush(save.queue_name)
    for _ in range(options.count):
        save.send(bench_session(session_text, tag))
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dramatiq",
            "benchmarks.dramatiq_side",
            "-p",
            str(options.processes),
            "-t",
            str(options.threads),
            "-Q",
            save.queue_name,
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "BENCH_DRAMATIQ_THREADS": str(options.threads)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def alive(_: int) -> None:
        if worker.poll() is not None:
            raise SystemExit(f"the dramatiq side stopped before {options.count} rows")

    try:
        wait_for_rows(tag, options.count, options.timeout, alive)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
    commits = commit_times(tag)
    delete_rows(tag)
    print(
        json.dumps(
            {
                "side": f"dramatiq {options.processes}x{options.threads}",
                "rows": options.count,
                "drain_rows_per_second": round(drain_rate(commits), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
