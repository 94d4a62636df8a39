"""The group-commit Strategy's checks of what a message holds (worker/celery_ext/group_commit.py):
whatever it is, a request or InvalidTaskError that says what is wrong, never another exception."""

from __future__ import annotations

import pytest
from celery.exceptions import InvalidTaskError

from worker.celery_ext.group_commit import check_body, check_headers, check_protocol1

pytestmark = pytest.mark.quick

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"just": "a mapping"}, "body: must be [args, kwargs, embed], got dict"),
        ([[], {}], "body: must be [args, kwargs, embed], got 2 items"),
        ("text", "body: must be [args, kwargs, embed], got str"),
        ([5, {}, {}], "body: args must be a list, got int"),
        ([[], [], {}], "body: kwargs must be a mapping, got list"),
        ([[], {}, 7], "body: embed must be a mapping, got int"),
    ],
)
def test_a_body_that_is_not_args_kwargs_embed_is_an_invalid_task_naming_the_part(body, error):
    with pytest.raises(InvalidTaskError, match=error.replace("[", r"\[").replace("]", r"\]")):
        check_body(body)


def test_a_well_formed_body_gives_its_embed():
    assert check_body([[{"id": "x"}], {}, EMBED]) == EMBED
    assert check_body(([], {}, None)) == {}


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ([1, 2], "headers: must be a mapping, got list"),
        ({"task": "t", "id": 42}, "headers.id: must be a non-empty string"),
        ({"task": "t", "id": ""}, "headers.id: must be a non-empty string"),
        ({"task": "t", "id": "i", "timelimit": [1]}, r"headers.timelimit: must be \[hard, soft\]"),
        ({"task": "t", "id": "i", "timelimit": ["a", 1]}, "headers.timelimit"),
        ({"task": "t", "id": "i", "retries": -1}, "headers.retries: must be a whole number"),
        ({"task": "t", "id": "i", "retries": "2"}, "headers.retries: must be a whole number"),
    ],
)
def test_header_values_celery_cannot_use_are_an_invalid_task(headers, error):
    with pytest.raises(InvalidTaskError, match=error):
        check_headers(headers)


def test_usable_headers_and_protocol_1_bodies_pass():
    check_headers({"task": "t", "id": "i", "timelimit": [None, 5], "retries": 3})
    check_headers({})  # protocol 1: the body says
    check_protocol1({"task": "t", "id": "i", "args": [1], "kwargs": {}})
    with pytest.raises(InvalidTaskError, match="body: args must be a list"):
        check_protocol1({"args": 5})
