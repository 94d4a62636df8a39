"""`writing-sessions bench` as a smoke check: it completes, reports, and cleans up after itself.

It asserts completeness only, never speed: speed is measured by benchmarks/, not by tests.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import count_rows, run_cli


@pytest.mark.parametrize(
    "args",
    [("--task", "save"), ("--task", "save_many", "--batch-size", "50", "--producers", "2")],
    ids=["save", "save_many"],
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
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}
    assert 1 <= report["max_db_connections"] <= 2
    assert "main" in report["peak_worker_rss_mb"] and len(report["peak_worker_rss_mb"]) == 3
    assert count_rows(db) == 0
