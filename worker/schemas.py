"""Pydantic models of task payloads: every validation rule of docs/contract.md lives here."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    computed_field,
    model_validator,
)

from worker.errors import InvalidPayloadError
from worker.times import as_utc

MAX_TOPIC_LENGTH = 200
MAX_CONTENT_LENGTH = 1_000_000
MAX_AUTHOR_ID_LENGTH = 64
MAX_REVISION = 2_147_483_647
MAX_BATCH = 1000

# PostgreSQL text cannot hold U+0000, and UTF-8 cannot encode lone surrogates.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """`text` with what PostgreSQL cannot store (NUL, lone surrogates) written as \\uXXXX, for
    error messages and names that quote what a producer sent."""
    return _UNSTORABLE.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def _storable(value: str) -> str:
    found = _UNSTORABLE.search(value)
    if found:
        char = found.group()
        what = (
            "a NUL character (U+0000)"
            if char == "\x00"
            else f"a lone surrogate (U+{ord(char):04X})"
        )
        raise ValueError(f"contains {what}, which PostgreSQL cannot store")
    return value


def _iso_string(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO 8601 string, got {type(value).__name__}")
    return value


def _at_most(limit: int) -> AfterValidator:
    def check(value: str) -> str:
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters, got {len(value)}")
        return value

    return AfterValidator(check)


def _not_blank(value: str) -> str:
    if not value:
        raise ValueError("must not be empty or only whitespace")
    return value


StorableStr = Annotated[StrictStr, AfterValidator(_storable)]


def _in_utc(value: datetime) -> datetime:
    try:
        return as_utc(value)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


Timestamp = Annotated[datetime, BeforeValidator(_iso_string), AfterValidator(_in_utc)]
Revision = Annotated[StrictInt, Field(ge=0, le=MAX_REVISION)]


class WritingSessionIn(BaseModel):
    """A writing-session object as producers send it to `writing_sessions.save`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    # str.strip() trims Unicode whitespace, U+3000 included; limits apply after trimming.
    topic: Annotated[
        StorableStr,
        AfterValidator(str.strip),
        AfterValidator(_not_blank),
        _at_most(MAX_TOPIC_LENGTH),
    ]
    content: Annotated[StorableStr, _at_most(MAX_CONTENT_LENGTH)] = ""
    author_id: Annotated[StorableStr, _at_most(MAX_AUTHOR_ID_LENGTH)] | None = None
    started_at: Timestamp | None = None
    ended_at: Timestamp | None = None
    revision: Revision = 0

    @model_validator(mode="after")
    def _ended_not_before_started(self) -> WritingSessionIn:
        if self.started_at and self.ended_at and self.ended_at < self.started_at:
            raise ValueError("ended_at: must not be before started_at")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def counts(self) -> tuple[int, int]:
        """(word_count, char_count): tokens of content separated by Unicode whitespace, as
        str.split() counts them, and non-whitespace characters (for unspaced scripts)."""
        words = self.content.split()
        return len(words), sum(map(len, words))


class DeleteIn(BaseModel):
    """The arguments of `writing_sessions.delete`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    revision: Revision


def describe(error: ValidationError, prefix: str = "") -> str:
    """One line naming each failing field and what is wrong with it (never its value)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        field = storable_text(".".join(str(p) for p in item["loc"]))
        message = item["msg"]
        if item["type"] == "missing":
            message = "is required"
        elif item["type"] == "extra_forbidden":
            message = "is not a known field"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        if not field and ": " in message:
            field, message = message.split(": ", 1)
        name = f"{prefix}{field}" if field else prefix.rstrip(".") or "payload"
        parts.append(f"{name}: {message}")
    return "; ".join(parts)


def parse_writing_session(payload: Any, prefix: str = "") -> WritingSessionIn:
    """Validate one writing-session object, raising InvalidPayloadError that names the field."""
    if not isinstance(payload, dict):
        name = prefix.rstrip(".") or "writing_session"
        raise InvalidPayloadError(f"{name}: must be an object, got {_json_type(payload)}")
    try:
        return WritingSessionIn.model_validate(payload)
    except ValidationError as exc:
        raise InvalidPayloadError(describe(exc, prefix)) from exc


@dataclass(frozen=True)
class Rejected:
    """One item of a batch that failed validation, kept as received."""

    index: int
    item: Any
    error: str


@dataclass(frozen=True)
class Batch:
    """A validated `save_many` batch: the valid items (with their positions) and the rejected."""

    items: list[WritingSessionIn]
    positions: list[int]
    rejected: list[Rejected]


_batch_adapter = TypeAdapter(list[WritingSessionIn])


def parse_batch(payload: Any, name: str = "writing_sessions") -> Batch:
    """Validate each item of a save_many batch on its own; the batch shape itself must be right."""
    if not isinstance(payload, list) or not 1 <= len(payload) <= MAX_BATCH:
        got = f"a list of {len(payload)}" if isinstance(payload, list) else _json_type(payload)
        raise InvalidPayloadError(
            f"{name}: must be a list of 1 to {MAX_BATCH} writing-session objects, got {got}"
        )
    try:
        # The common case, every item valid, in one call into pydantic's core.
        items = _batch_adapter.validate_python(payload)
    except ValidationError:
        pass  # validate item by item below, to name and keep each invalid one
    else:
        return Batch(items, list(range(len(items))), [])
    batch = Batch([], [], [])
    for index, raw in enumerate(payload):
        try:
            batch.items.append(parse_writing_session(raw, prefix=f"{name}[{index}]."))
        except InvalidPayloadError as exc:
            batch.rejected.append(Rejected(index, raw, str(exc)))
        else:
            batch.positions.append(index)
    return batch


def parse_delete(id: Any, revision: Any) -> DeleteIn:
    """Validate the arguments of a delete, raising InvalidPayloadError that names the argument."""
    try:
        return DeleteIn.model_validate({"id": id, "revision": revision})
    except ValidationError as exc:
        raise InvalidPayloadError(describe(exc)) from exc


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)
