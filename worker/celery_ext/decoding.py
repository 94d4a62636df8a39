"""kombu's JSON decoder, made once: the body of every message is decoded in the worker's main
process, and kombu's `loads` builds a new `json.JSONDecoder` for each (it passes `object_hook`,
so `json.loads` cannot use its shared decoder): 6.5% of a draining main process's samples.

`loads` here decodes exactly as `kombu.utils.json.loads` does (the same text, the same
`object_hook` for kombu's typed values: datetimes, UUIDs, decimals, bytes), with one decoder
made at import. Registered for `application/json` in place of kombu's own, encoder unchanged,
in the worker's processes only (app.conf.imports). tests/test_pins.py pins kombu's `loads`;
delete this module if kombu keeps its decoder.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.serialization import registry
from kombu.utils import json as kombu_json

_decode = json.JSONDecoder(object_hook=kombu_json.object_hook).decode


def loads(s: Any) -> Any:
    """kombu.utils.json.loads, with one decoder for every call."""
    if isinstance(s, memoryview):
        s = s.tobytes()
    if isinstance(s, bytes | bytearray):
        s = s.decode("utf-8")
    return _decode(s)


registry.register(
    "json", kombu_json.dumps, loads, content_type="application/json", content_encoding="utf-8"
)
