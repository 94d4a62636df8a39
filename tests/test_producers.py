"""Producers: the Python API with only a broker configured, and raw messages in any language."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery.result import AsyncResult

from tests.conftest import count_rows, new_session, run_python, service_env, wait_for
from worker.errors import InvalidPayloadError

NODE_EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "node-producer"


def envelope(body: object, headers: dict, task_id: str) -> str:
    """The JSON string a producer LPUSHes: base64 JSON body, headers, Redis properties."""
    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": "celery"},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def v2_envelope(task: str, task_id: str, args: list) -> str:
    """A Celery protocol v2 message exactly as docs/producers.md specifies it."""
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    headers = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": "raw",
        "kwargsrepr": "{}",
        "origin": "test",
    }
    return envelope([args, {}, embed], headers, task_id)


def v1_envelope(task: str, task_id: str, args: list) -> str:
    """A Celery protocol v1 message: everything in the body, no task headers."""
    body = {
        "task": task,
        "id": task_id,
        "args": args,
        "kwargs": {},
        "retries": 0,
        "eta": None,
        "expires": None,
        "utc": True,
        "callbacks": None,
        "errbacks": None,
        "timelimit": [None, None],
        "taskset": None,
        "chord": None,
    }
    return envelope(body, {}, task_id)


@pytest.mark.parametrize("build", [v2_envelope, v1_envelope], ids=["protocol-v2", "protocol-v1"])
def test_hand_built_message_pushed_into_redis_is_persisted(
    db, redis_url, producer, start_worker, build
):
    start_worker()
    session = new_session(content="raw message")
    task_id = str(uuid.uuid4())
    client = redis.Redis.from_url(redis_url)

    client.lpush("celery", build("writing_sessions.save", task_id, [session]))

    outcome = AsyncResult(task_id, app=producer).get(timeout=30)
    assert outcome == {"id": session["id"], "outcome": "created", "revision": 0}
    assert count_rows(db) == 1
    client.close()


def test_node_example_sends_a_session_that_is_persisted(db, env, start_worker, tmp_path):
    start_worker()
    assert shutil.which("node"), "node is needed for the documented Node.js producer"
    assert (NODE_EXAMPLE / "node_modules" / "redis").is_dir(), "run npm ci in " + str(NODE_EXAMPLE)

    result = subprocess.run(
        ["node", str(NODE_EXAMPLE / "producer.mjs"), "From Node", "こんにちは 世界", "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    sent, outcome = (json.loads(line) for line in result.stdout.splitlines())
    assert outcome == {
        "status": "SUCCESS",
        "result": {"id": sent["id"], "outcome": "created", "revision": 0},
    }
    with db.connect() as connection:
        row = connection.execute(
            sa.text("SELECT topic, word_count, char_count FROM writing_session")
        ).one()
    assert tuple(row) == ("From Node", 2, 7)


PRODUCER_SCRIPT = """
import json, sys, uuid
from worker.producer import send_writing_session, send_writing_sessions, delete_writing_session
assert "sqlalchemy" not in sys.modules, "the producer API must not load SQLAlchemy"
one = send_writing_session(topic="Single", content="one two", confirm=True)
batches = send_writing_sessions([{"topic": f"Batch {i}"} for i in range(1500)], confirm=True)
gone = delete_writing_session(one.result["id"], 1, confirm=True)
print(json.dumps({
    "one": one.result, "batches": [b.result for b in batches], "gone": gone.result,
    "sqlalchemy_loaded": "sqlalchemy" in sys.modules,
}))
"""


def test_producer_process_with_only_the_broker_configured(db, redis_url, start_worker, tmp_path):
    start_worker()
    only_broker = service_env(CELERY_BROKER_URL=redis_url, CELERY_RESULT_BACKEND=redis_url)

    result = run_python(PRODUCER_SCRIPT, env=only_broker, cwd=tmp_path)

    report = json.loads(result.stdout)
    assert report["one"]["outcome"] == "created"
    assert [b["created"] for b in report["batches"]] == [1000, 500]
    assert report["gone"] == {"id": report["one"]["id"], "outcome": "deleted", "revision": 1}
    assert report["sqlalchemy_loaded"] is False
    assert count_rows(db) == 1501
    assert not (tmp_path / "var").exists()


def test_producer_refuses_a_bad_session_before_sending(redis_url, producer):
    from worker.producer import send_writing_session, send_writing_sessions

    with pytest.raises(InvalidPayloadError, match="topic: must not be empty"):
        send_writing_session(topic="   ", app=producer)
    with pytest.raises(InvalidPayloadError, match=r"writing_sessions\[1\]\.revision"):
        send_writing_sessions([{"topic": "ok"}, {"topic": "bad", "revision": -2}], app=producer)

    assert redis.Redis.from_url(redis_url).llen("celery") == 0


def test_confirm_mode_resends_a_message_lost_in_flight(db, redis_url, producer, start_worker):
    from worker.producer import send_writing_session

    client = redis.Redis.from_url(redis_url)
    outcome: dict = {}
    sender = threading.Thread(
        target=lambda: outcome.update(
            send_writing_session(
                topic="Lost once", confirm=True, timeout=3, attempts=3, app=producer
            ).result
        )
    )

    sender.start()
    wait_for(lambda: client.llen("celery") == 1, 10, "the first copy on the queue")
    client.delete("celery")  # the broker loses it, as a kill -9 at the wrong instant can
    start_worker()
    sender.join(timeout=60)

    assert outcome["outcome"] == "created"
    assert count_rows(db) == 1
    client.close()


def test_argument_preview_shows_ids_and_topics_not_content():
    from worker.producer import preview

    big = {"id": "abc", "topic": "Essay", "content": "x" * 1_000_000, "revision": 2}

    shown = preview([[big] * 7])

    assert "Essay" in shown and "<1000000 chars>" in shown and "+2 more" in shown
    assert len(shown) < 600


def test_raw_redis_cli_example_of_the_docs_runs_as_written(db, redis_url, producer, start_worker):
    start_worker()
    doc = (Path(__file__).parent.parent / "docs" / "producers.md").read_text()
    push, get = [line for line in doc.splitlines() if line.startswith("redis-cli -n 0 ")]
    index = redis_url.rsplit("/", 1)[1]

    pushed = subprocess.run(
        ["bash", "-c", push.replace("-n 0", f"-n {index}", 1)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    task_id = get.rsplit("celery-task-meta-", 1)[1]
    outcome = AsyncResult(task_id, app=producer).get(timeout=30)

    assert pushed.returncode == 0, pushed.stderr
    assert outcome == {
        "id": "5f0c3a52-8a57-4b6e-9a53-0d7f4a1b2c3d",
        "outcome": "created",
        "revision": 0,
    }
    stored = subprocess.run(
        ["bash", "-c", get.replace("-n 0", f"-n {index}", 1)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(stored.stdout)["status"] == "SUCCESS"
