"""The fuzzer's seed corpus: generated valid events and the known kinds of malformed record.

``seed_records()`` yields ``(name, envelope bytes)`` (``harness.record_to_bytes``):

* valid events of ``runners/sim/generator.py`` ``JourneyGenerator``, framed as
  the generator frames them (schema v1) and as v2 (with a referrer), so both
  writer schemas and the v1 -> v2 resolution are covered;
* the generator's malformed kinds (``MALFORMATION_KINDS``: garbage, truncated,
  unknown schema id, missing identity, bad timestamp, empty event id);
* the hand-made bad records of tests/unit/test_decode.py (tombstone, empty,
  text, JSON, other subjects' schema ids, trailing bytes, over-long event id,
  skew, ...) and a few edge records (keys and timestamps at their limits).
"""
from __future__ import annotations

from collections.abc import Iterator

from onboardflow.runners.sim.generator import MALFORMATION_KINDS, VALID, GeneratorConfig, JourneyGenerator
from onboardflow.schemas import EVENTS_SUBJECT, default_registry, load_schema
from onboardflow.schemas.units import DAY_MS
from onboardflow.schemas.wire import AvroSerializer, frame
from onboardflow.tests.fuzz.harness import record_to_bytes

T0 = 1_717_000_000_000


def _serializer(version: int):
    return AvroSerializer(default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", version)).serialize


def seed_records(users: int = 12) -> Iterator[tuple[str, bytes]]:
    """Seeds for the fuzzer (module docstring); deterministic."""
    v2 = _serializer(2)
    generator = JourneyGenerator(GeneratorConfig(seed=18, users=users, horizon_days=3.0, malformed_fraction=0.2,
                                                 personalization_consent_rate=0.7, analytics_consent_rate=0.7))
    valid = []
    per_kind: dict[str, int] = {}
    for message in generator.messages(max_messages=400):
        n = per_kind.get(message.kind, 0)
        per_kind[message.kind] = n + 1
        if n < (12 if message.kind == VALID else 3):
            yield f"gen-{message.kind}-{n}", record_to_bytes(message.key, message.value, T0 + n)
    assert set(MALFORMATION_KINDS) <= set(per_kind), "every malformed kind is seeded"
    for i, (_, event) in enumerate(generator.events()):
        if i >= 8:
            break
        event = {**event, "referrer": f"https://partner{i}.example/landing?utm_source=mail&u={event['user_id']}"}
        valid.append(event)
        yield f"v2-valid-{i}", record_to_bytes((event["user_id"] or "").encode(), v2(event), T0 + i)
    event = valid[0]
    hand_made = {
        "tombstone": None,
        "empty": b"",
        "text": b"hello world, not avro",
        "json": b'{"event_id": "e-1"}',
        "unknown-id": frame(77, b"\x00" * 30),
        "segment-change-schema": frame(4, b"\x00" * 30),
        "dead-letter-schema": frame(3, b"\x00" * 30),
        "profile-schema": frame(7, b"\x02" * 30),
        "trailing-byte": v2(event) + b"\x00",
        "garbage-payload": frame(2, b"\xff" * 40),
        "no-identity": v2({**event, "user_id": None, "anonymous_id": None}),
        "empty-identity": v2({**event, "user_id": "", "anonymous_id": ""}),
        "epoch-zero": v2({**event, "occurred_at": 0, "received_at": 0}),
        "too-far-in-future": v2({**event, "occurred_at": T0 + DAY_MS + 1, "received_at": T0}),
        "overlong-event-id": v2({**event, "event_id": "x" * 129}),
        "pii-in-properties": v2({**event, "properties": {"Email": "a@b.example", "note": str(event["user_id"])}}),
        "no-consent": v2({**event, "consent": {"analytics": False, "personalization": False, "marketing": True}}),
        "analytics-only": v2({**event, "consent": {"analytics": True, "personalization": False, "marketing": False}}),
        "decorated-ip": v2({**event, "context": {**event["context"], "ip": "[2001:db8::7]:443"}}),
    }
    for name, value in hand_made.items():
        yield f"hand-{name}", record_to_bytes(b"k", value, T0)
    yield "key-none", record_to_bytes(None, v2(event), T0)
    yield "timestamp-none", record_to_bytes(b"k", b"\x07junk", -1)
