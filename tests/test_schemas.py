"""Every validation rule of docs/contract.md, one bad payload each, and the computed counts."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.errors import InvalidPayloadError
from worker.schemas import parse_delete, parse_writing_session

pytestmark = pytest.mark.quick

ID = "d9a61ec9-bfc3-4bf0-bec9-4af5199f4be7"  # fixed: parametrized test ids must not vary


def valid(**fields):
    return {"id": ID, "topic": "Topic", **fields}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"topic": "t"}, "id: is required"),
        ({"id": ID}, "topic: is required"),
        (valid(id="not-a-uuid"), "id: Input should be a valid UUID"),
        (valid(id=12), "id: UUID input should be a string"),
        (valid(topic=5), "topic: Input should be a valid string"),
        (valid(topic="   \u3000 "), "topic: must not be empty or only whitespace"),
        (valid(topic="t" * 201), "topic: must be at most 200 characters, got 201"),
        (valid(topic="a\x00b"), "topic: contains a NUL character (U+0000)"),
        ({**valid(), "na\x00me": 1}, "na\\u0000me: is not a known field"),
        (
            valid(started_at="0001-01-01T00:30:00+01:00"),
            "started_at: is out of range once converted to UTC",
        ),
        (
            valid(ended_at="9999-12-31T23:30:00-01:00"),
            "ended_at: is out of range once converted to UTC",
        ),
        (
            valid(content="x" * 1_000_001),
            "content: must be at most 1000000 characters, got 1000001",
        ),
        (valid(content=["a"]), "content: Input should be a valid string"),
        (valid(content="\ud83d alone"), "content: contains a lone surrogate (U+D83D)"),
        (valid(author_id="a" * 65), "author_id: must be at most 64 characters, got 65"),
        (valid(author_id=7), "author_id: Input should be a valid string"),
        (valid(started_at="yesterday"), "started_at: Input should be a valid datetime"),
        (valid(started_at=1700000000), "started_at: must be an ISO 8601 string, got int"),
        (valid(ended_at=[]), "ended_at: must be an ISO 8601 string, got list"),
        (
            valid(started_at="2024-01-02T00:00:00Z", ended_at="2024-01-01T23:59:59Z"),
            "ended_at: must not be before started_at",
        ),
        (valid(revision=-1), "revision: Input should be greater than or equal to 0"),
        (
            valid(revision=2_147_483_648),
            "revision: Input should be less than or equal to 2147483647",
        ),
        (valid(revision="3"), "revision: Input should be a valid integer"),
        (valid(revision=1.5), "revision: Input should be a valid integer"),
        (valid(revision=True), "revision: Input should be a valid integer"),
        (valid(words=3), "words: is not a known field"),
        ("text", "writing_session: must be an object, got a string"),
        ([valid()], "writing_session: must be an object, got a list"),
        (None, "writing_session: must be an object, got null"),
    ],
)
def test_bad_payload_is_refused_with_the_field_named(payload, message):
    with pytest.raises(InvalidPayloadError) as raised:
        parse_writing_session(payload)

    assert message in str(raised.value)


def test_topic_is_trimmed_of_unicode_whitespace():
    item = parse_writing_session(valid(topic="\u3000 Essay \t"))

    assert item.topic == "Essay"


def test_topic_of_200_characters_after_trimming_is_accepted():
    item = parse_writing_session(valid(topic=f"  {'t' * 200}  "))

    assert len(item.topic) == 200


def test_naive_timestamps_are_utc_and_aware_ones_are_converted():
    item = parse_writing_session(
        valid(started_at="2024-01-01T09:00:00", ended_at="2024-01-01T19:00:00+09:00")
    )

    assert item.started_at == datetime(2024, 1, 1, 9, 0, tzinfo=UTC)
    assert item.ended_at == datetime(2024, 1, 1, 10, 0, tzinfo=UTC)
    assert item.ended_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("content", "words", "chars"),
    [
        ("", 0, 0),
        ("one two  three", 3, 11),
        ("今日は晴れです", 1, 7),
        ("今日は\u3000晴れ", 2, 5),
        ("tab\tnew\nline\r\nend ", 4, 13),
        ("\u00a0nbsp\u2003em", 2, 6),
    ],
)
def test_word_and_character_counts_follow_unicode_whitespace(content, words, chars):
    item = parse_writing_session(valid(content=content))

    assert item.counts == (words, chars)


def test_error_never_includes_the_value():
    secret = "private text " * 100_000

    with pytest.raises(InvalidPayloadError) as raised:
        parse_writing_session(valid(content=secret))

    assert "private text" not in str(raised.value)


@pytest.mark.parametrize(
    ("id", "revision", "message"),
    [
        ("nope", 1, "id: Input should be a valid UUID"),
        (ID, None, "revision: Input should be a valid integer"),
        (ID, -5, "revision: Input should be greater than or equal to 0"),
    ],
)
def test_bad_delete_arguments_name_the_argument(id, revision, message):
    with pytest.raises(InvalidPayloadError) as raised:
        parse_delete(id, revision)

    assert message in str(raised.value)
