"""Celery's own floor for one message per row: the same worker and settings, a task doing nothing.

    python benchmarks/celery_floor.py --count 10000 -c 2                  # Redis, as production
    python benchmarks/celery_floor.py --count 10000 -c 2 --broker memory  # no broker cost at all
    python benchmarks/celery_floor.py --count 20000 -c 2 --grouped        # one pool job per group
    python benchmarks/celery_floor.py --count 10000 -c 2 --profile        # py-spy the main process

Fills the queue with `bench.noop` messages carrying the same 200-character session as the `save`
side (on Redis before the worker starts; on kombu's in-memory broker, which lives inside one
process, from the worker's own `worker_ready`), runs `writing-sessions worker` with this module
included, and prints one JSON line: messages/s from the worker being ready to the last message
done, and CPU time per message of the main process and of the children (from /proc).
No worker of this project can drain `save` faster than this on the same machine.

--grouped runs `bench.grouped_noop` instead: a small Batches-style task whose strategy buffers
the messages one event-loop turn delivered (up to GROUP messages) in the main process and hands
the pool one job per group, acknowledging every message of it when the job returns; no events
and no results, like celery-batches. It measures what receiving costs once the per-message work
is paid per group.
--profile samples the main process with py-spy and adds the share of its samples spent in the
Redis transport (kombu's or worker/celery_ext/broker.py, and redis-py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from celery import signals
from celery.worker import state

from worker.app import app
from worker.bench import bench_session, content, start_worker, stop_worker

ROOT = Path(__file__).resolve().parent.parent
GROUP = 100
# Set in the bench worker's environment by main(); nothing here runs in any other worker.
COUNT_VARIABLE, OUT_VARIABLE = "BENCH_FLOOR_COUNT", "BENCH_FLOOR_OUT"
TASK_VARIABLE, NO_EVENTS_VARIABLE = "BENCH_FLOOR_TASK", "BENCH_FLOOR_NO_EVENTS"


if COUNT_VARIABLE in os.environ and app.conf.broker_url.startswith("memory://"):
    # kombu's virtual transports sleep polling_interval (1 s) whenever a poll finds nothing
    # they may take: with a full prefetch that is most polls. The in-memory broker is the
    # "no broker cost" reference, so let it poll without sleeping.
    app.conf.broker_transport_options = {"polling_interval": 0.0001}


@app.task(name="bench.noop")
def noop(writing_session: Any) -> dict[str, str]:
    """Take the message, store a result like `save`'s, write nothing."""
    return {"id": writing_session["id"], "outcome": "noop"}


def _run_group(size: int) -> int:
    return size


_grouped_done = 0


def grouped_strategy(task: Any, app: Any, consumer: Any, **_: Any) -> Any:
    """Buffer messages in the main process; one pool job per group; ack all when it returns."""
    buffered: list[Any] = []

    def flush() -> None:
        if not buffered:
            return
        group = buffered[:]
        buffered.clear()

        def on_return(_result: Any) -> None:
            global _grouped_done
            for message in group:
                message.ack()
            _grouped_done += len(group)

        consumer.pool.apply_async(_run_group, args=(len(group),), callback=on_return)

    if consumer.hub is None:  # no event loop (the in-memory broker): flush on a short timer
        consumer.timer.call_repeatedly(0.005, flush)

    def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **_: Any) -> None:
        buffered.append(message)
        if len(buffered) >= GROUP:
            flush()
        elif len(buffered) == 1 and consumer.hub is not None:
            consumer.hub.call_soon(flush)  # after what this turn of the loop delivered

    return handler


@app.task(name="bench.grouped_noop", Strategy=f"{__name__}:grouped_strategy")
def grouped_noop(writing_session: Any) -> None:
    """Never called: the strategy above hands the pool whole groups."""


def fill(task_name: str, count: int) -> None:
    text = content(200)
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            session = bench_session(text, "bench-floor")
            app.send_task(task_name, args=[session], producer=producer, argsrepr="[bench]")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@signals.worker_ready.connect
def _measure(sender: Any = None, **_: Any) -> None:
    # Only in the bench worker started by main(): fill the in-memory broker, then time the drain
    # from here to the last message done, in a thread of the main process.
    if COUNT_VARIABLE not in os.environ:
        return
    count, task_name = int(os.environ[COUNT_VARIABLE]), os.environ[TASK_VARIABLE]
    if os.environ.get(NO_EVENTS_VARIABLE):
        sender.event_dispatcher.groups.discard("task")  # as `celery control disable_events`
    if app.conf.broker_url.startswith("memory://"):
        fill(task_name, count)
    Path(os.environ[OUT_VARIABLE]).write_text("draining")
    started = time.monotonic()
    children = [child.pid for child in getattr(sender.controller.pool._pool, "_pool", [])]
    main_cpu = time.process_time()  # every thread of this process, at ns resolution
    child_cpu = sum(_cpu_seconds(pid) for pid in children)

    def done() -> int:
        return _grouped_done + sum(state.total_count.values())

    def watch() -> None:
        while done() < count:
            time.sleep(0.005)
        elapsed = time.monotonic() - started
        figures = {
            "messages": count,
            "drain_messages_per_second": round(count / elapsed, 1),
            "main_cpu_us_per_message": round((time.process_time() - main_cpu) / count * 1e6, 1),
            "children_cpu_us_per_message": round(
                (sum(_cpu_seconds(pid) for pid in children) - child_cpu) / count * 1e6, 1
            ),
        }
        Path(os.environ[OUT_VARIABLE]).write_text(json.dumps(figures))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


BROKER_CODE = ("redis/", "kombu/transport/", "worker/celery_ext/broker.py")


def broker_share(raw_profile: Path) -> dict[str, float]:
    """Share of py-spy's samples of the main process spent in the Redis transport.

    A sample counts as the broker's when the innermost frame outside the standard library (a
    socket read is the caller's) is redis-py, a kombu transport or celery_ext/broker.py: Celery's
    handling of a message, which runs inside the transport's delivery callback, is not.
    """
    samples: Counter[str] = Counter()
    for line in raw_profile.read_text().splitlines():
        stack, _, weight = line.rpartition(" ")
        where = "other"
        for frame in reversed(stack.split(";")):
            path = frame.rpartition("(")[2]  # py-spy names files from their package down
            top = path.split("/")[0].removesuffix(".py").split(":")[0]
            if not path or top in sys.stdlib_module_names:
                continue  # the standard library, or a frame without a file
            where = "broker" if path.startswith(BROKER_CODE) else "other"
            break
        samples[where] += int(weight)
    total = sum(samples.values()) or 1
    return {"broker_share_of_main_samples": round(samples["broker"] / total, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("-c", "--concurrency", type=int, default=2)
    parser.add_argument("-P", "--pool", default="prefork")
    parser.add_argument("--broker", choices=["redis", "memory"], default="redis")
    parser.add_argument("--grouped", action="store_true", help="one pool job per group")
    parser.add_argument("--no-events", action="store_true", help="no task events")
    parser.add_argument("--no-results", action="store_true", help="no result backend")
    parser.add_argument("--prefetch-multiplier", type=int, help="worker_prefetch_multiplier")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--profile", action="store_true", help="py-spy the main process")
    parser.add_argument("--timeout", type=float, default=600.0)
    options = parser.parse_args()
    task_name = "bench.grouped_noop" if options.grouped else "bench.noop"
    if options.broker == "redis":
        fill(task_name, options.count)
    out = Path(tempfile.mkstemp(prefix="floor-", suffix=".json")[1])
    env = {COUNT_VARIABLE: str(options.count), OUT_VARIABLE: str(out), TASK_VARIABLE: task_name}
    if options.broker == "memory":
        env["CELERY_BROKER_URL"] = "memory://"
    if options.no_results:
        env["CELERY_RESULT_BACKEND"] = ""
    args = ["-I", "benchmarks.celery_floor"]
    if options.no_events:
        env[NO_EVENTS_VARIABLE] = "1"
    if options.prefetch_multiplier:
        args += ["--prefetch-multiplier", str(options.prefetch_multiplier)]
    worker = start_worker(
        options.pool,
        options.concurrency,
        *args,
        cwd=ROOT,
        wait=False,
        loglevel=options.loglevel,
        env=env,
    )
    profiler = None
    raw = out.with_suffix(".txt")
    try:
        if options.profile:
            # From the start of the drain, not the worker's start-up.
            deadline = time.monotonic() + 120
            while not out.read_text() and worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            profiler = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--pid",
                    str(worker.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "250",
                    "--nonblocking",
                    "-o",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        worker.wait(options.timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit("the floor worker did not drain the queue in time") from None
    finally:
        stop_worker(worker)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
    if not out.read_text().startswith("{"):
        raise SystemExit("the floor worker stopped before it drained the queue")
    figures = json.loads(out.read_text())
    if options.profile and raw.exists():
        figures.update(broker_share(raw))
    side = f"celery {'grouped ' if options.grouped else ''}no-op, {options.broker}"
    flags = [
        f for f, on in (("no events", options.no_events), ("no results", options.no_results)) if on
    ]
    print(
        json.dumps(
            {
                "side": f"{side}, {options.pool} -c {options.concurrency}"
                + "".join(f", {f}" for f in flags),
                **figures,
            }
        )
    )


if __name__ == "__main__":
    main()
