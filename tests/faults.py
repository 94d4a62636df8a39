"""Fault-test helpers: a private Redis with persistence, RabbitMQ vhosts, kills, a report."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tests.conftest import wait_for

REPORT = Path(__file__).parent.parent / "test-artifacts" / "faults.jsonl"


def report(fault: str, **figures: Any) -> None:
    """Append what a fault test saw to test-artifacts/faults.jsonl (for the Guarantees section)."""
    REPORT.parent.mkdir(exist_ok=True)
    with REPORT.open("a") as out:
        out.write(json.dumps({"fault": fault, **figures}) + "\n")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, with append-only persistence, that can be restarted."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--maxmemory-policy",
                "noeviction",
                "--enable-debug-command",  # DEBUG SLEEP, to stall it (tests/test_stalls.py)
                "local",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 20, "the private Redis to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def restart(self) -> None:
        """A clean restart: SHUTDOWN writes the append-only file, then the same server returns."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # redis-server shuts down cleanly on TERM
            self.process.wait(30)


class RabbitVhost:
    """A RabbitMQ virtual host of the test's own (guest has all rights on it)."""

    def __init__(self) -> None:
        self.name = f"ws-test-{uuid.uuid4().hex[:10]}"
        ctl("add_vhost", self.name)
        ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        self.url = f"amqp://guest:guest@127.0.0.1:5672/{self.name}"

    def delete(self) -> None:
        ctl("delete_vhost", self.name)

    def unacknowledged(self, queue: str = "celery") -> int:
        """Messages of `queue` delivered to a consumer and not yet acknowledged."""
        listed = subprocess.run(
            [
                "rabbitmqctl",
                "-q",
                "list_queues",
                "-p",
                self.name,
                "name",
                "messages_unacknowledged",
                "--no-table-headers",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        for line in listed.splitlines():
            name, _, count = line.partition("\t")
            if name == queue:
                return int(count)
        return 0


@contextlib.contextmanager
def stopped(pids: Iterable[int]) -> Iterator[None]:
    """The processes `pids` stopped (SIGSTOP) for the block, continued after it, whatever
    happens in it."""
    pids = list(pids)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def held_by(client: Any, pid: int) -> int:
    """Messages recorded as unacknowledged by the worker (main process) `pid` (celery_ext/broker.py
    tags them `<host>:<pid>:<channel>.<n>`)."""
    pattern = f"{socket.gethostname()}:{pid}:*"
    return sum(1 for _ in client.hscan_iter("unacked", match=pattern, count=1000))


def duplicates(*logs: str) -> int:
    """Task runs that found their message already written (a redelivered copy)."""
    return sum(log.count("outcome=duplicate") for log in logs)


def restored_messages(*logs: str) -> int:
    """Messages that workers restored from consumers they found silent (celery_ext/broker.py logs
    `restored N message(s) of consumer ...`)."""
    return sum(int(n) for log in logs for n in re.findall(r"restored (\d+) message\(s\)", log))


def kill9(pid: int) -> None:
    """SIGKILL one process, no questions asked."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def wait_gone(pids: set[int], timeout: float = 30) -> None:
    """Wait until none of `pids` runs any more; SIGKILL the ones that linger."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = {pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)}
        if not alive:
            return
        time.sleep(0.05)
    for pid in pids:
        kill9(pid)


def _zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
