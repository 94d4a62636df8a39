"""`writing-sessions bench` as a smoke check: it completes, reports, and cleans up after itself.

It asserts completeness only, never speed: speed is measured by benchmarks/, not by tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from tests.conftest import ROOT, count_rows, run_cli

# Each runs a benchmark, with worker processes of its own.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "args",
    [
        ("--task", "save"),
        ("--task", "save", "--prefill"),
        ("--task", "save", "--interval", "0.005"),
        ("--task", "save_many", "--batch-size", "50", "--producers", "2"),
    ],
    ids=["save", "save-prefill", "save-paced", "save_many"],
)
def test_bench_with_its_own_worker_reports_every_figure_and_removes_its_rows(
    db, env, tmp_path, args
):
    result = run_cli(
        "bench",
        "--start-worker",
        "-c",
        "2",
        "--count",
        "200",
        "--json",
        *args,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["sessions"] == 200
    assert report["rows_per_second"] > 0 and report["sent_per_second"] > 0
    assert report["drain_rows_per_second"] > 0
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}
    assert 1 <= report["max_db_connections"] <= 2
    assert "main" in report["peak_worker_rss_mb"] and len(report["peak_worker_rss_mb"]) == 3
    # Writing 200 sessions costs the worker's processes some CPU, each kind its own share.
    assert set(report["cpu_us_per_message"]) == {"main", "children"}
    assert all(spent > 0 for spent in report["cpu_us_per_message"].values())
    assert count_rows(db) == 0


def test_benchmarks_run_completes_every_side_and_prints_the_ratios(db, env, rabbit):
    # benchmarks/run.py as documented in benchmarks/README.md, tiny: every side must finish
    # and clean up. The figures of so small a run mean nothing and are not looked at.
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--runs",
            "1",
            "--rows",
            "200",
            "--batch-rows",
            "2000",
            "--rabbitmq",
            rabbit.url,
            "--threads",
            "4",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr
    for side in ("save rows/s", "dramatiq rows/s", "celery no-op floor", "psycopg2 batched"):
        assert side in result.stdout
    for side in ("save on RabbitMQ rows/s", "save -P threads -c 4 rows/s", "save CPU/msg main"):
        assert side in result.stdout
    for ratio in ("save_many / psycopg2 batched", "save: RabbitMQ / Redis", "save / grouped no-op"):
        assert ratio in result.stdout
    assert count_rows(db) == 0


@pytest.mark.parametrize(
    "args",
    [
        ("--count", "300"),
        ("--count", "300", "--broker", "memory"),
        # Grouped drains are fast: enough messages that the drain lasts more than a blink.
        ("--count", "6000", "--grouped", "--prefetch-multiplier", "100"),
        ("--count", "6000", "--grouped", "--prefetch-multiplier", "100", "--broker", "memory"),
        ("--count", "300", "--profile"),
    ],
    ids=["redis", "memory", "grouped-redis", "grouped-memory", "profiled"],
)
def test_the_celery_floor_drains_every_message_and_reports_its_figures(env, redis_url, args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "celery_floor.py"), "-c", "2", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["messages"] == int(args[1])
    assert figures["drain_messages_per_second"] > 0
    assert figures["main_cpu_us_per_message"] > 0
    assert ("broker_share_of_main_samples" in figures) == ("--profile" in args)
    client = redis.Redis.from_url(redis_url)
    assert client.llen("celery") == 0 and client.hlen("unacked") == 0
    client.close()
