"""What `writing-sessions bench` sends and how: the options, and the command line made of them.

Apart from worker/bench.py so that the command line can be built without importing what the
bench needs to run (the settings, the database): a bad environment variable must end in a
clean message, not a traceback at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click


def _option(default: Any, help: str, type: Any = None, short: tuple[str, ...] = ()) -> Any:
    """A BenchOptions field that is also a `writing-sessions bench` option (worker/cli.py)."""
    return field(default=default, metadata={"help": help, "type": type, "short": short})


@dataclass
class BenchOptions:
    """What to send and how; each field with a help text is a `bench` command-line option."""

    count: int = _option(10_000, "Writing sessions to send.", click.IntRange(1), ("-n",))
    size: int = _option(200, "Characters of content per session.", click.IntRange(0, 1_000_000))
    task: str = _option("save", "Task to send.", click.Choice(["save", "save_many"]))
    batch_size: int = _option(100, "Sessions per save_many message.", click.IntRange(1, 1000))
    producers: int = _option(1, "Producer processes.", click.IntRange(1, 64))
    interval: float = _option(
        0.0,
        "Seconds between two sends of a producer (paced load, for latency).",
        click.FloatRange(0),
    )
    start_worker: bool = _option(False, "Start (and stop) a worker of its own.")
    prefill: bool = _option(
        False, "With --start-worker: send everything first, then start the worker (drain rate)."
    )
    concurrency: int = _option(2, "Concurrency of the started worker.", click.IntRange(1), ("-c",))
    pool: str = _option(
        "prefork",
        "Pool of the started worker.",
        click.Choice(["prefork", "threads", "solo"]),
        ("-P",),
    )
    timeout: float = _option(600.0, "Seconds to wait for every row.", float)
    keep: bool = False
