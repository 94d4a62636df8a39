"""Flower watches the workers for real: its HTTP API, its Prometheus metrics, its pages."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CELERY, send_save, wait_for
from tests.faults import free_port

USER, PASSWORD = "ops", "flower-pw"
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# The metrics docs/operating.md tells Prometheus to scrape (the histogram by its _count).
DOCUMENTED = {
    "flower_events_total",
    "flower_task_runtime_seconds_count",
    "flower_worker_online",
    "flower_worker_number_of_currently_executing_tasks",
}


class Flower:
    """A Flower process of a test, read over HTTP with its basic auth."""

    def __init__(
        self,
        port: int,
        process: subprocess.Popen[bytes],
        log: Path,
        credentials: str = f"{USER}:{PASSWORD}",
    ) -> None:
        self.port, self.process, self.log = port, process, log
        self.url = f"http://127.0.0.1:{port}"
        self.credentials = credentials

    def get(self, path: str, auth: bool = True) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path)
        if auth:
            token = base64.b64encode(self.credentials.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""


@pytest.fixture
def flower(env: dict[str, str], tmp_path: Path) -> Iterator[Flower]:
    port = free_port()
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [CELERY, "-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1"],
            env={**env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"},
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Flower(port, process, log)
    wait_for(lambda: server.get("/healthcheck", auth=False)[0] == 200, 60, "Flower to answer")
    yield server
    process.terminate()
    process.wait(30)


def send_mixed(producer) -> list:
    from worker.producer import send_writing_session

    valid = [
        send_writing_session(topic=f"Flower {i}", content="x" * 100_000, app=producer)
        for i in range(3)
    ]
    invalid = [send_save(producer, {"id": str(uuid.uuid4())}) for _ in range(2)]
    for result in valid + invalid:
        result.get(timeout=30, propagate=False)
    return valid + invalid


def test_flower_api_lists_the_worker_and_its_successes_and_failures(producer, start_worker, flower):
    worker = start_worker()
    results = send_mixed(producer)

    def tasks() -> dict:
        status, body = flower.get("/api/tasks")
        found = json.loads(body) if status == 200 else {}
        return (
            found
            if len([t for t in found.values() if t["state"] in ("SUCCESS", "FAILURE")]) == 5
            else {}
        )

    found = wait_for(tasks, 60, "Flower to see the five tasks")

    def listed() -> bool:
        # Flower answers a refresh with what its inspect heard within its own timeout; a
        # reply that comes later is there on the next refresh.
        workers = json.loads(flower.get("/api/workers?refresh=1")[1])
        return any(name.startswith(worker.node.split("@")[0]) for name in workers)

    wait_for(listed, 30, "Flower to list the worker")
    assert sorted(t["state"] for t in found.values()) == ["FAILURE"] * 2 + ["SUCCESS"] * 3
    assert {t["name"] for t in found.values()} == {"writing_sessions.save"}
    preview = found[results[0].id]["args"]
    assert "Flower 0" in preview and "<100000 chars>" in preview and "xxxx" not in preview
    assert "topic: is required" in found[results[3].id]["exception"]
    assert flower.get("/api/tasks", auth=False)[0] == 401


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text exposition: name, labels and value of each."""
    found = []
    for line in text.splitlines():
        if match := SAMPLE.match(line):
            name, labels, value = match.groups()
            found.append((name, dict(LABEL.findall(labels or "")), float(value)))
    return found


def test_flower_metrics_count_the_task_events(producer, start_worker, flower):
    worker = start_worker()
    node = worker.node.replace("%h", socket.gethostname())
    send_mixed(producer)

    def counts() -> dict:
        _, body = flower.get("/metrics")
        found: dict[str, float] = {}
        for line in body.splitlines():
            if line.startswith("flower_events_total{") and 'task="writing_sessions.save"' in line:
                kind = line.split('type="', 1)[1].split('"', 1)[0]
                found[kind] = found.get(kind, 0) + float(line.rsplit(" ", 1)[1])
        return found if found.get("task-succeeded") == 3 and found.get("task-failed") == 2 else {}

    found = wait_for(counts, 60, "metrics for 3 successes and 2 failures")

    # A labelled metric shows only its HELP and TYPE lines until it has a sample: look for the
    # worker's samples. Its two gauges come from its heartbeats (every 2 s), which can follow
    # the task events by a beat.
    def documented() -> list[tuple[str, dict[str, str], float]]:
        status, body = flower.get("/metrics")
        scraped = samples(body) if status == 200 else []
        names = {name for name, labels, _ in scraped if labels.get("worker") == node}
        return scraped if names >= DOCUMENTED else []

    scraped = wait_for(documented, 30, f"the documented metrics for {node}")
    events = [labels for name, labels, _ in scraped if name == "flower_events_total"]
    runtimes = [
        value
        for name, labels, value in scraped
        if name == "flower_task_runtime_seconds_count"
        and labels == {"task": "writing_sessions.save", "worker": node}
    ]
    executing = [
        labels
        for name, labels, _ in scraped
        if name == "flower_worker_number_of_currently_executing_tasks"
    ]

    assert found["task-received"] == 5
    assert {frozenset(labels) for labels in events} == {frozenset({"task", "type", "worker"})}
    assert {labels["worker"] for labels in events} == {node}
    assert runtimes == [found["task-succeeded"]], "one runtime per success"
    assert ("flower_worker_online", {"worker": node}, 1.0) in scraped
    assert executing == [{"worker": node}]


def test_flower_tasks_page_in_a_real_browser_shows_our_task(producer, start_worker, flower):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    start_worker()
    send_mixed(producer)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
        )

        driver.get(flower.url + "/tasks")
        wait_for(
            lambda: driver.page_source.count("writing_sessions.save") >= 5,
            60,
            "the tasks table to list writing_sessions.save",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "flower-tasks.png"
        driver.save_screenshot(str(screenshot))
        page = driver.page_source
    finally:
        driver.quit()

    assert "SUCCESS" in page and "FAILURE" in page
    assert screenshot.stat().st_size > 10_000


def test_writing_sessions_flower_command_serves_flower_with_basic_auth(env, tmp_path):
    from tests.conftest import CLI

    port = free_port()
    process = subprocess.Popen(
        [CLI, "flower", f"--port={port}", "--address=127.0.0.1"],
        env={**env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Flower(port, process, tmp_path / "unused.log")
    try:
        wait_for(lambda: server.get("/healthcheck", auth=False)[0] == 200, 60, "Flower to answer")

        assert server.get("/api/workers", auth=False)[0] == 401
        assert server.get("/api/workers")[0] == 200
    finally:
        process.terminate()
        process.wait(30)
