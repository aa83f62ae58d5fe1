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


class _FakeRedis:
    """The two reads ErasedUsers makes, counted."""

    def __init__(self):
        self.members: set[bytes] = set()
        self.version = None
        self.loads = 0

    def get(self, key):
        assert key.endswith(":erased:version")
        return self.version

    def smembers(self, key):
        assert key.endswith(":erased")
        self.loads += 1
        return set(self.members)

    def erase(self, user_key: str):
        self.members.add(user_key.encode())
        self.version = str(int(self.version or 0) + 1).encode()


def test_erased_users_reload_only_when_an_erasure_moved_the_version_and_at_most_every_refresh():
    from onboardflow.transforms.erasure import ErasedUsers
    from onboardflow.transforms.profile_store.keys import ProfileKeys

    client, now = _FakeRedis(), [0.0]
    erased = ErasedUsers(client, ProfileKeys("t"), refresh_s=5.0, clock=lambda: now[0])
    assert not erased("k1") and client.loads == 0, "nothing erased yet: no load"
    client.erase("k1")
    now[0] = 4.0
    assert not erased("k1"), "checked again before refresh_s"
    now[0] = 5.0
    assert erased("k1") and not erased("k2") and client.loads == 1
    now[0] = 11.0
    assert erased("k1") and client.loads == 1, "version unchanged: no reload"


def test_an_erased_users_event_or_lifecycle_timer_clears_the_state_and_emits_nothing():
    from onboardflow.schemas.units import DAY_MS
    from onboardflow.transforms.profile import ERASED, ClearState, ProfileConfig, ProfileMachine, Store

    gone: set[str] = set()
    machine = ProfileMachine(ProfileConfig(), clock_ms=lambda: 100 * DAY_MS, erased=gone.__contains__)
    event = {"event_id": "e1", "user_key": "u", "event_type": "login", "occurred_at": DAY_MS}
    state = next(d.state for d in machine.on_event(None, event) if type(d) is Store)
    gone.add("u")
    assert machine.on_event(state, dict(event, event_id="e2")) == (ClearState(ERASED),)
    assert machine.on_lifecycle(state, "u", 2 * DAY_MS) == (ClearState(ERASED),)
    assert machine.on_lifecycle(None, "u", 2 * DAY_MS) == ()
    other = {"event_id": "e3", "user_key": "v", "event_type": "login", "occurred_at": DAY_MS}
    assert any(type(d) is Store for d in machine.on_event(None, other)), "another user is untouched"
