"""`writing-sessions bench`: a load generator and meter for a worker, measured end to end.

Rows of a run are tagged with author_id `bench-<run id>`, so counting, latency and clean-up
touch only the run's own rows.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, text

from worker.bench_options import BenchOptions
from worker.db import task_db
from worker.models import WritingSession
from worker.times import as_utc


@dataclass
class BenchReport:
    """The figures of one run."""

    task: str
    sessions: int
    messages: int
    payload_bytes: int
    producers: int
    pool: str | None
    concurrency: int | None
    send_seconds: float
    sent_per_second: float
    end_to_end_seconds: float
    rows_per_second: float
    drain_rows_per_second: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    max_db_connections: int = 0
    peak_worker_rss_mb: dict[str, float] = field(default_factory=dict)
    #: CPU of the started worker per message, µs, by process kind (main, children), from
    #: /proc: what it spent from answering its first ping (start-up excluded) to the last row.
    cpu_us_per_message: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def content(size: int) -> str:
    """The text of every benchmarked session (benchmarks/ use it too): `size` characters."""
    words = "writing sessions persist words 今日は 晴れ "
    return (words * (size // len(words) + 1))[:size]


def bench_session(text: str, tag: str) -> dict[str, str]:
    """A new session of a run: its rows are found (and removed) by their author_id, the tag."""
    return {"id": str(uuid.uuid4()), "topic": "bench", "content": text, "author_id": tag}


# Seconds between two reports of a sending loop: the bar moves, the loop does not slow down.
REPORT_EVERY = 0.1
#: The queue a --prefill worker starts on (nobody sends to it) until everything is sent.
IDLE_QUEUE = "writing-sessions-bench-idle"


class _Every:
    """Passes a sending loop's count on to `report` at most once every `seconds`."""

    def __init__(self, seconds: float, report: Callable[[int], None]) -> None:
        self.seconds = seconds
        self.report = report
        self.due = time.monotonic() + seconds

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now >= self.due:
            self.due = now + self.seconds
            self.report(done)


def _send_share(
    args: tuple[str, str, int, int, int, int, float],
    on_sent: Callable[[int], None] = lambda _: None,
) -> list[tuple[str, float]]:
    """Producer process: send sessions [start, stop) and return (id, send time) pairs; tell
    `on_sent` how many are sent so far every REPORT_EVERY seconds (never the last count)."""
    tag, task, start, stop, size, batch_size, interval = args
    from worker.app import app

    text = content(size)
    sent: list[tuple[str, float]] = []
    tick = _Every(REPORT_EVERY, on_sent)
    with app.producer_or_acquire() as producer:
        if task == "save":
            for _index in range(start, stop):
                tick(len(sent))
                session = bench_session(text, tag)
                sent.append((session["id"], time.time()))
                app.send_task(
                    "writing_sessions.save", args=[session], producer=producer, argsrepr="[bench]"
                )
                if interval:
                    time.sleep(interval)  # paced: the latency of a lightly loaded worker
        else:
            for first in range(start, stop, batch_size):
                tick(len(sent))
                batch = [
                    bench_session(text, tag) for _ in range(first, min(first + batch_size, stop))
                ]
                now = time.time()
                sent.extend((item["id"], now) for item in batch)
                app.send_task(
                    "writing_sessions.save_many",
                    args=[batch],
                    producer=producer,
                    argsrepr=f"[bench x{len(batch)}]",
                )
    return sent


# In a producer process of a run with several: the run's count of sessions sent so far.
_sent_count: Any = None


def _share_count(count: Any) -> None:
    """Producer pool initializer: the shared count goes by inheritance, not through map()."""
    global _sent_count
    _sent_count = count


def _send_counted_share(
    args: tuple[str, str, int, int, int, int, float],
) -> list[tuple[str, float]]:
    """_send_share in a producer process of several, adding its progress to the shared count."""
    counted = 0

    def add(done: int) -> None:
        nonlocal counted
        with _sent_count.get_lock():
            _sent_count.value += done - counted
        counted = done

    return _send_share(args, add)


def _send_shares(
    jobs: list[tuple[str, str, int, int, int, int, float]], on_sent: Callable[[int], None]
) -> list[tuple[str, float]]:
    """Send every share, one producer process per share; report the count sent as it grows."""
    if len(jobs) == 1:
        return _send_share(jobs[0], on_sent)
    context = multiprocessing.get_context("spawn")
    count = context.Value("q", 0)
    with context.Pool(len(jobs), _share_count, (count,)) as pool:
        parts = pool.map_async(_send_counted_share, jobs)
        reported = 0
        while not parts.ready():
            parts.wait(REPORT_EVERY)
            if count.value != reported:
                reported = count.value
                on_sent(reported)
        return [pair for part in parts.get() for pair in part]


def run(options: BenchOptions, progress: Callable[[str, int, int], None]) -> BenchReport:
    """Send, wait for every row, measure, clean up."""
    tag = f"bench-{uuid.uuid4().hex[:12]}"
    worker = None
    if options.start_worker:
        # With --prefill the worker starts consuming only once everything is sent: it starts
        # on a queue nobody sends to, so that its start-up CPU is measured apart.
        idle = ("-Q", IDLE_QUEUE) if options.prefill else ()
        worker = start_worker(options.pool, options.concurrency, *idle)
    cpu_at_start = _cpu_seconds(worker) if worker else {}
    try:
        shares = _split(options.count, options.producers)
        jobs = [
            (tag, options.task, start, stop, options.size, options.batch_size, options.interval)
            for start, stop in shares
        ]
        sampler = _ConnectionSampler()
        first_send = time.time()
        sent = _send_shares(jobs, lambda done: progress("sent", done, options.count))
        send_seconds = time.time() - first_send
        progress("sent", len(sent), options.count)
        if worker and options.prefill:
            consume(worker, "celery")

        def on_count(landed: int) -> None:
            sampler.sample()
            progress("persisted", landed, options.count)

        wait_for_rows(tag, options.count, options.timeout, on_count)
        cpu_at_end = _cpu_seconds(worker) if worker else {}
        created = commit_times(tag)
        sent_at = dict(sent)
        last_commit = max(created.values())
        latencies = sorted((created[i] - sent_at[i]) * 1000 for i in created)
        end_to_end = last_commit - first_send
        messages = (
            options.count if options.task == "save" else -(-options.count // options.batch_size)
        )
        return BenchReport(
            task=options.task,
            sessions=options.count,
            messages=messages,
            payload_bytes=options.size,
            producers=options.producers,
            pool=options.pool if worker else None,
            concurrency=options.concurrency if worker else None,
            send_seconds=round(send_seconds, 3),
            sent_per_second=round(messages / send_seconds, 1),
            end_to_end_seconds=round(end_to_end, 3),
            rows_per_second=round(options.count / end_to_end, 1),
            drain_rows_per_second=round(drain_rate(created), 1),
            latency_ms={
                "p50": round(statistics.quantiles(latencies, n=100)[49], 1),
                "p95": round(statistics.quantiles(latencies, n=100)[94], 1),
                "p99": round(statistics.quantiles(latencies, n=100)[98], 1),
            },
            max_db_connections=sampler.most,
            peak_worker_rss_mb=_peak_rss(worker) if worker else {},
            cpu_us_per_message={
                kind: round((cpu_at_end[kind] - cpu_at_start.get(kind, 0.0)) * 1e6 / messages, 1)
                for kind in cpu_at_end
            },
        )
    finally:
        if worker:
            stop_worker(worker)
            if options.prefill:
                delete_idle_queue()
        if not options.keep:
            delete_rows(tag)


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    step = -(-count // parts)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def wait_for_rows(
    tag: str, count: int, timeout: float, on_count: Callable[[int], None] = lambda _: None
) -> None:
    """Poll until `count` rows of `tag` have landed (TimeoutError after `timeout` seconds).

    A count scans every row landed so far: the wait after one is 20 times what it took (at
    least 0.2 s), so that the meter takes at most a twentieth of a database core from the
    worker it measures. The figures come from the rows' commit times, not from when a count
    saw them.
    """
    deadline = time.monotonic() + timeout
    while True:
        counted = time.monotonic()
        landed = _count(tag)
        took = time.monotonic() - counted
        on_count(landed)
        if landed >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {landed} of {count} rows after {timeout:g} s")
        time.sleep(max(0.2, 20 * took))


def _count(tag: str) -> int:
    with task_db() as db:
        return int(db.scalar(select(func.count()).where(WritingSession.author_id == tag)) or 0)


def commit_times(tag: str) -> dict[str, float]:
    """When each row of `tag` was committed (its created_at), as Unix time, by id."""
    with task_db() as db:
        rows = db.execute(
            select(WritingSession.id, WritingSession.created_at).where(
                WritingSession.author_id == tag
            )
        )
        return {str(row.id): (as_utc(row.created_at)).timestamp() for row in rows}


def drain_rate(commits: dict[str, float]) -> float:
    """Rows/s from the first commit to the last: how fast the worker drained, whatever the
    senders did."""
    times = commits.values()
    return (len(commits) - 1) / max(max(times) - min(times), 1e-6)


def delete_rows(tag: str) -> None:
    """Remove what a run wrote: its own rows only."""
    with task_db() as db:
        db.execute(delete(WritingSession).where(WritingSession.author_id == tag))


class _ConnectionSampler:
    """Largest number of worker connections seen in pg_stat_activity."""

    def __init__(self) -> None:
        self.most = 0

    def sample(self) -> None:
        with task_db() as db:
            if db.get_bind().dialect.name != "postgresql":
                return
            held = db.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'writing-sessions:%' AND pid <> pg_backend_pid() "
                    "AND application_name <> 'writing-sessions:schema-check'"
                )
            )
        self.most = max(self.most, int(held or 0))


def start_worker(
    pool: str,
    concurrency: int,
    *args: str,
    cwd: Path | None = None,
    wait: bool = True,
    loglevel: str = "INFO",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`writing-sessions worker` (the production command, README) in a process group of its own.

    args: more worker options. wait: return once the worker answers a ping (60 s at most);
    a caller timing the drain from the first message taken passes False. loglevel: INFO, as
    docker-compose runs it. env: variables to set on top of this process's environment.
    """
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"writing-sessions-bench-{os.getpid()}.log"
    node = f"bench-{os.getpid()}"
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("writing-sessions")),
            "worker",
            *args,
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-n",
            f"{node}@%h",
            "-l",
            loglevel,
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if not wait:
        return process
    from worker.app import app

    deadline = time.monotonic() + 60
    while not app.control.ping(destination=[f"{node}@{os.uname().nodename}"], timeout=0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the bench worker did not start; see {log}")
    return process


def consume(process: subprocess.Popen[bytes], queue: str) -> None:
    """Have the worker started by start_worker consume `queue` too (Celery's add_consumer)."""
    from worker.app import app

    node = f"bench-{os.getpid()}@{os.uname().nodename}"
    if not app.control.add_consumer(queue, destination=[node], reply=True, timeout=10):
        raise RuntimeError(f"the bench worker did not start consuming {queue}")
    app.control.cancel_consumer(IDLE_QUEUE, destination=[node], reply=True, timeout=10)


def delete_idle_queue() -> None:
    """No empty queue left behind on RabbitMQ (deleted once no worker consumes it: deleting a
    queue cancels its consumers, which makes a worker reconnect)."""
    from worker.app import app

    with app.connection_for_write() as connection:
        connection.default_channel.queue_delete(IDLE_QUEUE)


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL of its process group after 60 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _worker_pids(process: subprocess.Popen[bytes]) -> list[int]:
    """The worker's main process, then its pool children."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    try:
        return [process.pid] + [int(p) for p in children.read_text().split()]
    except FileNotFoundError:
        return []


def _cpu_seconds(process: subprocess.Popen[bytes]) -> dict[str, float]:
    """CPU seconds so far of the worker's main process and of its children together, each
    thread's time on a CPU in nanoseconds (/proc/<pid>/task/<tid>/schedstat), not the clock
    ticks of /proc/<pid>/stat. Children replaced meanwhile are not counted: the bench worker
    replaces none."""
    spent = {"main": 0.0, "children": 0.0}
    for pid in _worker_pids(process):
        kind = "main" if pid == process.pid else "children"
        for schedstat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                spent[kind] += int(schedstat.read_text().split()[0]) / 1e9
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue  # a thread that ended meanwhile
    return spent


def _peak_rss(process: subprocess.Popen[bytes]) -> dict[str, float]:
    """VmHWM (peak resident set) of the worker's main process and of each child, in MB."""
    peaks: dict[str, float] = {}
    for pid in _worker_pids(process):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                name = "main" if pid == process.pid else f"child-{pid}"
                peaks[name] = round(int(line.split()[1]) / 1024, 1)
    return peaks
