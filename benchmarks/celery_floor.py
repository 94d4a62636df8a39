"""Celery's own floor for one message per row: the same worker and settings, a task doing nothing.

    python benchmarks/celery_floor.py --count 10000 -c 2 -P prefork

Pre-fills the queue with `bench.noop` messages carrying the same 200-character session as the
`save` side, starts `writing-sessions worker` with this module included (late acks, events,
results stored: everything of the `save` side but the database), and prints one JSON line:
messages/s from the first message taken to the queue and the unacknowledged set both empty.
No worker of this project can drain `save` faster than this on the same machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from worker.app import app
from worker.bench import bench_session, content, start_worker, stop_worker

ROOT = Path(__file__).resolve().parent.parent


@app.task(name="bench.noop")
def noop(writing_session: Any) -> dict[str, str]:
    """Take the message, store a result like `save`'s, write nothing."""
    return {"id": writing_session["id"], "outcome": "noop"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("-c", "--concurrency", type=int, default=2)
    parser.add_argument("-P", "--pool", default="prefork")
    parser.add_argument("--timeout", type=float, default=600.0)
    options = parser.parse_args()
    text = content(200)
    with app.producer_or_acquire() as producer:
        for _ in range(options.count):
            session = bench_session(text, "bench-floor")
            app.send_task("bench.noop", args=[session], producer=producer, argsrepr="[bench]")
    client = app.connection_for_write().default_channel.client
    # Not waiting for the worker to answer a ping: the drain is timed from the first message
    # taken, which the loop below must see.
    worker = start_worker(
        options.pool, options.concurrency, "-I", "benchmarks.celery_floor", cwd=ROOT, wait=False
    )
    try:
        deadline = time.monotonic() + options.timeout
        started = None
        while True:
            waiting = client.llen("celery")
            if started is None and waiting < options.count:
                started = time.monotonic()
            if waiting == 0 and client.hlen("unacked") == 0:
                break
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit(f"the floor worker did not drain the queue ({waiting} left)")
            time.sleep(0.01)
        finished = time.monotonic()
    finally:
        stop_worker(worker)
    assert started is not None
    print(
        json.dumps(
            {
                "side": f"celery no-op, {options.pool} -c {options.concurrency}",
                "messages": options.count,
                "drain_messages_per_second": round(options.count / (finished - started), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
