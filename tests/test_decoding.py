"""celery_ext/decoding.py: kombu's JSON decoding, with one decoder for every message."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from kombu.exceptions import DecodeError
from kombu.serialization import loads as kombu_registry_loads
from kombu.serialization import registry
from kombu.utils import json as kombu_json

from worker.celery_ext import decoding

pytestmark = pytest.mark.unit

VALUES = [
    [
        [{"id": str(uuid.uuid4()), "topic": "A topic", "content": "今日は 晴れ"}],
        {},
        {"chain": None},
    ],
    {"when": datetime(2026, 12, 2, 1, 2, 3, tzinfo=UTC), "id": uuid.uuid4()},
    {"amount": Decimal("12.50"), "raw": b"\x00\x01bytes", "nested": [{"a": [1, 2.5, None]}]},
]


@pytest.mark.parametrize("value", VALUES, ids=["task body", "datetime and uuid", "decimal, bytes"])
@pytest.mark.parametrize("form", [str, str.encode, lambda s: bytearray(s.encode()),
                                  lambda s: memoryview(s.encode())],
                         ids=["str", "bytes", "bytearray", "memoryview"])  # fmt: skip
def test_it_decodes_what_kombu_encodes_exactly_as_kombu_does(value, form):
    encoded = form(kombu_json.dumps(value))

    assert decoding.loads(encoded) == kombu_json.loads(encoded) == value


def test_it_is_the_decoder_of_json_messages_once_imported():
    assert registry._decoders["application/json"] is decoding.loads
    body = kombu_json.dumps({"when": datetime(2026, 1, 1, tzinfo=UTC)}).encode()
    assert kombu_registry_loads(body, "application/json", "utf-8") == {
        "when": datetime(2026, 1, 1, tzinfo=UTC)
    }


def test_undecodable_content_is_the_decode_error_kombu_raises():
    with pytest.raises(DecodeError):
        kombu_registry_loads(b"{not json", "application/json", "utf-8")
    with pytest.raises(json.JSONDecodeError):
        decoding.loads("[1, 2")
