"""Erasure requests from the request topic, and what an erasure needs (no services: transforms/erasure.py)."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from onboardflow.runners.cli.erase import erasure_topic
from onboardflow.transforms.erasure import ErasureRequest, erasure_request_from_message


def _pseudonym(user_id: str) -> str:
    return "k-" + user_id[::-1]


def test_a_request_record_becomes_a_request_keyed_by_its_coordinates_with_the_pseudonym_only():
    value = json.dumps({"user_id": "acct-42", "requested_by": "dpo", "requested_at": "2026-12-01T10:00:00Z"})
    request = erasure_request_from_message(value.encode(), "obf.erasures", 2, 17, _pseudonym)
    assert request.user_key == "k-24-tcca" and request.requested_by == "dpo"
    assert request.erasure_id == request.source == "topic:obf.erasures:2:17"
    assert request.requested_at == dt.datetime(2026, 12, 1, 10, tzinfo=dt.timezone.utc)
    assert "acct-42" not in repr(request)


def test_requested_at_is_optional_and_a_naive_time_is_utc():
    request = erasure_request_from_message(b'{"user_id": "u", "requested_by": "x"}', "t", 0, 0, _pseudonym)
    assert request.requested_at.tzinfo is not None
    value = b'{"user_id": "u", "requested_by": "x", "requested_at": "2026-01-02T03:04:05"}'
    naive = erasure_request_from_message(value, "t", 0, 1, _pseudonym)
    assert naive.requested_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("value", [
    b"", b"not json", b"[]", b'"acct-1"', b'{"user_id": "acct-1"}', b'{"requested_by": "dpo"}',
    b'{"user_id": 42, "requested_by": "dpo"}', b'{"user_id": "", "requested_by": "dpo"}',
    b'{"user_id": "a", "requested_by": ""}', b'{"user_id": "a", "requested_by": "d", "requested_at": "yesterday"}',
    b"\xff\xfe", b'{"user_id": "a", "requested_by": ["d"]}',
])
def test_a_malformed_request_is_refused_not_raised(value):
    assert erasure_request_from_message(value, "t", 0, 0, _pseudonym) is None


def test_an_erasure_needs_a_pseudonym_and_a_requester():
    with pytest.raises(ValueError):
        ErasureRequest("", "dpo")
    with pytest.raises(ValueError):
        ErasureRequest("k", "")
    assert ErasureRequest("k", "dpo").erasure_id != ErasureRequest("k", "dpo").erasure_id


def test_the_request_topic_sits_beside_the_events_topic():
    assert erasure_topic("onboarding.events") == "onboarding.erasures"
    assert erasure_topic("acme.events") == "acme.erasures"
    assert erasure_topic("raw") == "raw.erasures"
