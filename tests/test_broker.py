"""The Redis transport (celery_ext/broker.py): atomic batch fetch, batched acks, heartbeat recovery.

Each test talks to a private redis-server of its own, so that the command counts it reads from
`INFO commandstats` are its own.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.conftest import ROOT, count_rows, run_cli, run_python, service_env, wait_for
from tests.faults import free_port

QUEUE = Queue("jobs", Exchange("jobs", type="direct"), routing_key="jobs")


OURS = "worker.celery_ext.broker:Transport"


def ours(url: str, **options: Any) -> Connection:
    return Connection(url, transport=OURS, transport_options=options)


def stock(url: str, **options: Any) -> Connection:
    return Connection(url, transport_options=options)


def publish(url: str, count: int, priority: int = 0) -> list[str]:
    """Publish `count` messages with kombu's stock transport, as any producer does."""
    bodies = [f"message {n} {uuid.uuid4().hex[:6]}" for n in range(count)]
    with stock(url) as connection:
        producer = Producer(connection)
        for body in bodies:
            producer.publish(
                body,
                exchange=QUEUE.exchange,
                routing_key="jobs",
                declare=[QUEUE],
                priority=priority,
                serializer="json",
            )
    return bodies


def calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


def called(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        name: after[name] - before.get(name, 0)
        for name in after
        if after[name] != before.get(name, 0)
    }


class Received:
    """The messages a consumer got, in order."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def __call__(self, body: Any, message: Any) -> None:
        self.messages.append(message)

    @property
    def bodies(self) -> list[Any]:
        return [message.decode() for message in self.messages]


def drain(connection: Connection, until: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out draining"
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=0.5)


def test_one_script_call_takes_a_batch_and_records_every_message_of_it(private_redis):
    bodies = publish(private_redis.url, 10)
    client = redis.Redis.from_url(private_redis.url)
    received = Received()

    with (
        ours(private_redis.url) as connection,
        Consumer(connection, [QUEUE], callbacks=[received], prefetch_count=8, accept=["json"]),
    ):
        before = calls(client)
        drain(connection, lambda: len(received.messages) >= 8)
        during = calls(client)
        held_in_redis = client.hlen("unacked")
        waiting = client.llen("jobs")
        owners = list(client.scan_iter("unacked_by:*"))
        owned = client.scard(owners[0])

    fetched = called(before, during)
    assert received.bodies == bodies[:8]
    # One script call (plus the consumer's first heartbeat, another script, whose HSET is the
    # fleet's heartbeat clock) took all eight.
    assert fetched.get("rpop") == 8 and fetched.get("hset") == 8 + 1
    assert fetched.get("evalsha") == 2
    assert not {"brpop", "multi", "exec"} & set(fetched)
    assert (held_in_redis, waiting, len(owners), owned) == (8, 2, 1, 8)


def test_a_consumer_holds_about_held_bytes_of_large_messages_at_most(private_redis, monkeypatch):
    monkeypatch.setattr("worker.celery_ext.broker.HELD_BYTES", 4000)
    client = redis.Redis.from_url(private_redis.url)
    with stock(private_redis.url) as connection:
        producer = Producer(connection)
        for n in range(10):
            producer.publish(
                "x" * 1500 + str(n),
                exchange=QUEUE.exchange,
                routing_key="jobs",
                declare=[QUEUE],
                serializer="json",
            )
    held_at_each_delivery: list[int] = []

    def note_and_ack(body: Any, message: Any) -> None:
        held_at_each_delivery.append(client.hlen("unacked"))
        message.ack()

    with (
        ours(private_redis.url) as connection,
        Consumer(connection, [QUEUE], callbacks=[note_and_ack], prefetch_count=10, accept=["json"]),
    ):
        drain(connection, lambda: len(held_at_each_delivery) == 10)

    # About 1,800 bytes each: a fetch stops once 4,000 are taken, at three messages.
    assert max(held_at_each_delivery) <= 3
    assert client.llen("jobs") == 0


def test_an_idle_consumer_waits_without_taking_and_wakes_at_once(private_redis):
    client = redis.Redis.from_url(private_redis.url)
    received = Received()
    # A 30 s wait: a message that arrives sooner is handed out by the wake-up, not a timeout.
    with (
        ours(private_redis.url, polling_interval=30) as connection,
        Consumer(connection, [QUEUE], callbacks=[received], prefetch_count=4, accept=["json"]),
    ):
        connection.transport.brpop_timeout = 30
        waiter = threading.Thread(target=drain, args=(connection, lambda: received.messages, 20))
        waiter.start()
        wait_for(lambda: any(c["cmd"] == "blmove" for c in client.client_list()), 10, "the wait")
        waiting_before = client.llen("jobs")
        sent_at = time.monotonic()
        (body,) = publish(private_redis.url, 1)
        waiter.join(25)
        woke_after = time.monotonic() - sent_at

    assert received.bodies == [body]
    assert waiting_before == 0
    assert woke_after < 15
    assert calls(client).get("brpop", 0) == 0


def test_acknowledgements_of_a_batch_go_in_one_round_trip(private_redis):
    publish(private_redis.url, 8)
    client = redis.Redis.from_url(private_redis.url)
    received = Received()

    with (
        ours(private_redis.url) as connection,
        Consumer(connection, [QUEUE], callbacks=[received], prefetch_count=8, accept=["json"]),
    ):
        drain(connection, lambda: len(received.messages) == 8)
        before = calls(client)
        for message in received.messages:
            message.ack()
        held_before_flush = client.hlen("unacked")
        connection.transport.cycle.on_poll_start()
        acked = called(before, calls(client))
        held_after = client.hlen("unacked")

    assert held_before_flush == 8
    assert held_after == 0
    assert acked.get("hdel") == 1 and acked.get("zrem") == 1 and acked.get("srem") == 1


def test_a_consumer_without_acknowledgements_leaves_nothing_recorded(private_redis):
    # Celery's control replies (inspect, ping) are consumed this way.
    publish(private_redis.url, 3)
    client = redis.Redis.from_url(private_redis.url)
    received = Received()

    with (
        ours(private_redis.url) as connection,
        Consumer(connection, [QUEUE], callbacks=[received], no_ack=True, accept=["json"]),
    ):
        drain(connection, lambda: len(received.messages) == 3)
        connection.transport.cycle.on_poll_start()
        connection.default_channel.flush_settlements()
        held = client.hlen("unacked")
        with ours(private_redis.url) as other:
            publish(private_redis.url, 1)
            got = other.default_channel.basic_get("jobs", no_ack=True)
            other.default_channel.flush_settlements()
            held_after_get = client.hlen("unacked")

    assert len(received.messages) == 3 and got is not None
    assert held == 0 and held_after_get == 0


def test_closing_returns_held_messages_to_the_queue_in_their_order(private_redis):
    bodies = publish(private_redis.url, 6)
    client = redis.Redis.from_url(private_redis.url)
    received = Received()

    with (
        ours(private_redis.url) as connection,
        Consumer(connection, [QUEUE], callbacks=[received], prefetch_count=6, accept=["json"]),
    ):
        drain(connection, lambda: len(received.messages) == 6)
        for message in received.messages[:2]:
            message.ack()
    again = Received()
    with (
        ours(private_redis.url) as connection,
        Consumer(connection, [QUEUE], callbacks=[again], prefetch_count=6, accept=["json"]),
    ):
        drain(connection, lambda: len(again.messages) == 4)
        redelivered = [m.delivery_info.get("redelivered") for m in again.messages]
        for message in again.messages:
            message.ack()

    assert again.bodies == bodies[2:]
    assert redelivered == [True] * 4
    assert client.hlen("unacked") == 0
    assert client.zcard("unacked_heartbeats") == 0
    assert list(client.scan_iter("unacked_by:*")) == []


def test_a_rejected_message_goes_back_to_the_end_of_its_queue(private_redis):
    bodies = publish(private_redis.url, 3)
    received = Received()

    def reject_the_first_ack_the_rest(body: Any, message: Any) -> None:
        received(body, message)
        if len(received.messages) == 1:
            message.reject(requeue=True)
        else:
            message.ack()

    with (
        ours(private_redis.url) as connection,
        Consumer(
            connection,
            [QUEUE],
            callbacks=[reject_the_first_ack_the_rest],
            prefetch_count=1,
            accept=["json"],
        ),
    ):
        drain(connection, lambda: len(received.messages) == 4)

    assert received.bodies == [bodies[0], bodies[1], bodies[2], bodies[0]]


def test_higher_priority_lists_are_fetched_first(private_redis):
    low = publish(private_redis.url, 2, priority=6)
    high = publish(private_redis.url, 2, priority=0)
    received = Received()

    with (
        ours(private_redis.url) as connection,
        Consumer(connection, [QUEUE], callbacks=[received], prefetch_count=4, accept=["json"]),
    ):
        drain(connection, lambda: len(received.messages) == 4)

    assert received.bodies == high + low


HOLDER = """
import sys, time
from kombu import Connection, Consumer, Exchange, Queue
queue = Queue("jobs", Exchange("jobs", type="direct"), routing_key="jobs")
held = []
with Connection(sys.argv[1], transport=sys.argv[2]) as connection:
    with Consumer(connection, [queue], callbacks=[lambda b, m: held.append(m)],
                  prefetch_count=int(sys.argv[3]), accept=["json"]):
        while len(held) < int(sys.argv[3]):
            try:
                connection.drain_events(timeout=1)
            except TimeoutError:
                pass
        print("holding", flush=True)
        time.sleep(600)
"""


def hold_and_die(url: str, transport: str, count: int) -> None:
    """A consumer process that takes `count` messages and is killed before acknowledging."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, transport, str(count)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ},
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "holding"
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)


def test_a_dead_consumers_messages_come_back_by_heartbeat(private_redis):
    bodies = publish(private_redis.url, 5)
    hold_and_die(private_redis.url, "worker.celery_ext.broker:Transport", 5)
    client = redis.Redis.from_url(private_redis.url)
    received = Received()
    held_at_death = client.hlen("unacked")

    with (
        ours(
            private_redis.url, consumer_heartbeat_timeout=2, consumer_heartbeat_interval=0.5
        ) as connection,
        Consumer(connection, [QUEUE], callbacks=[received], prefetch_count=10, accept=["json"]),
    ):
        started = time.monotonic()
        drain(connection, lambda: len(received.messages) == 5, timeout=20)
        back_after = time.monotonic() - started
        for message in received.messages:
            message.ack()
        connection.transport.cycle.on_poll_start()

    assert held_at_death == 5
    assert sorted(received.bodies) == sorted(bodies)
    assert back_after < 10
    assert client.hlen("unacked") == 0 and client.zcard("unacked_heartbeats") == 0


@pytest.mark.parametrize(
    ("dies", "restores"),
    [(OURS, "redis"), ("redis", OURS)],
    ids=["stock restores ours", "ours restores stock"],
)
def test_a_mixed_fleet_restores_each_others_messages_after_the_visibility_timeout(
    private_redis, dies, restores
):
    bodies = publish(private_redis.url, 4)
    hold_and_die(private_redis.url, dies, 4)
    received = Received()

    client = redis.Redis.from_url(private_redis.url)
    options = {"visibility_timeout": 1, "unacked_restore_throttle": 1}
    with Connection(private_redis.url, transport=restores, transport_options=options) as connection:
        qos = connection.default_channel.qos

        def restored() -> bool:
            qos.restore_visible()  # what the worker's sweep calls every few seconds
            return client.llen("jobs") == 4

        wait_for(restored, 10, "the visibility-timeout sweep to restore the four", interval=0.2)
        with Consumer(connection, [QUEUE], callbacks=[received], prefetch_count=4, accept=["json"]):
            drain(connection, lambda: len(received.messages) == 4)

    assert sorted(received.bodies) == sorted(bodies)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server speaking TLS only, with a certificate from a CA of the test's own."""
    run = functools.partial(subprocess.run, cwd=tmp_path, check=True, capture_output=True)
    run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=writing-sessions test CA",
        ]
    )
    run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]
    )
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.cnf",
        ]
    )
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.pem",
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(
        host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(tmp_path / "ca.pem")
    )

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(answers, 20, "the TLS Redis to answer")
    client.close()
    yield port, tmp_path / "ca.pem"
    server.terminate()
    server.wait(30)


@pytest.mark.parametrize("bare_url", [False, True], ids=["url-with-ca", "bare-rediss-url"])
def test_rediss_brokers_get_this_transport_over_verified_tls(
    db, database_url, tls_redis, start_worker, bare_url
):
    port, ca = tls_redis
    query = f"ssl_cert_reqs=required&ssl_ca_certs={ca}"
    broker_url = f"rediss://127.0.0.1:{port}/0" + ("" if bare_url else f"?{query}")
    env = service_env(
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=broker_url,
        CELERY_RESULT_BACKEND=f"rediss://127.0.0.1:{port}/1?{query}",
        # A bare rediss:// URL is checked against the system's CAs: make ours one of them.
        **({"SSL_CERT_FILE": str(ca)} if bare_url else {}),
    )
    start_worker(concurrency=1, base_env=env)
    client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca))

    sent = run_cli("send", "--topic", "Over TLS", "--wait", env=env)
    heartbeats = client.zcard("unacked_heartbeats")

    assert '"outcome": "created"' in sent.stdout, sent.stderr
    assert heartbeats == 1, "the worker must consume with worker/celery_ext/broker.py's transport"
    client.close()


def test_a_worker_that_does_not_trust_the_rediss_brokers_certificate_never_consumes(
    db, database_url, tls_redis, start_worker
):
    port, ca = tls_redis
    query = f"ssl_cert_reqs=required&ssl_ca_certs={ca}"
    env = service_env(
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=f"rediss://127.0.0.1:{port}/0",
        CELERY_RESULT_BACKEND=f"rediss://127.0.0.1:{port}/1?{query}",
    )
    # The bare URL is checked against the system's CAs only, which do not hold the test's CA.
    untrusted = {k: v for k, v in env.items() if k != "SSL_CERT_FILE"}
    # A message waiting: a worker that connected without checking the certificate would take it.
    sent = run_cli("send", "--topic", "Untrusted TLS", env={**env, "SSL_CERT_FILE": str(ca)})
    assert sent.returncode == 0, sent.stderr
    worker = start_worker(concurrency=1, base_env=untrusted, wait_ready=False)
    client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca))

    # Refused twice: the worker tried again after the first refusal and was refused again.
    wait_for(
        lambda: (
            worker.log().count("CERTIFICATE_VERIFY_FAILED") >= 2
            or " ready." in worker.log()
            or not worker.alive()
        ),
        60,
        "the worker to be refused twice",
    )
    log = worker.log()
    heartbeats, held, waiting = (
        client.zcard("unacked_heartbeats"),
        client.hlen("unacked"),
        client.llen("celery"),
    )

    assert "certificate verify failed" in log, log[-3000:]
    assert "Cannot connect to worker.celery_ext.broker:Transport://" in log, log[-3000:]
    assert " ready." not in log, log[-3000:]
    assert worker.alive(), "the worker waits for a broker it can trust, it does not exit"
    assert (heartbeats, held, waiting) == (0, 0, 1), "the worker must not consume"
    assert count_rows(db) == 0
    client.close()


BACKEND_PING = (
    "from worker.app import app; print(type(app.backend).__module__, app.backend.client.ping())"
)


def test_a_bare_rediss_result_backend_is_the_projects_and_checks_the_certificate(tls_redis):
    port, ca = tls_redis
    url = f"rediss://127.0.0.1:{port}/1"
    env = service_env(CELERY_BROKER_URL=url, CELERY_RESULT_BACKEND=url)

    trusted = run_python(BACKEND_PING, env={**env, "SSL_CERT_FILE": str(ca)}, cwd=ROOT)
    untrusted = subprocess.run(
        [sys.executable, "-c", BACKEND_PING],
        env={k: v for k, v in env.items() if k != "SSL_CERT_FILE"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert trusted.stdout.split() == ["worker.celery_ext.results", "True"]
    assert untrusted.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
